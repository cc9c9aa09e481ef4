"""The benchmark record: what ``coreml-sd bench`` writes and ``coreml-sd report`` reads.

One JSON object per run of bench, documented field by field in benchmarks/README.md and declared
below as TypedDicts: ``Record`` (version 3, written now), ``RecordV2`` and ``RecordV1`` (earlier
records, still read). ``validate`` checks a parsed record against the declaration of its version and returns the
problems (path and what is wrong); ``load_record`` raises ``RecordError`` naming the file.

Every declared key is required; a record may carry more (readers ignore what they do not know).
In JSON terms ``float`` is any number and ``tuple[int, int]`` a list of exactly two integers.
"""

from __future__ import annotations

import json
import types
from itertools import repeat
from pathlib import Path
from typing import Annotated, Any, Literal, TypedDict, Union, get_args, get_origin, get_type_hints, is_typeddict

SCHEMA_VERSION = 3  # what bench writes; SCHEMAS (below) holds every version read
NON_EMPTY = "non-empty"  # Annotated[list[X], NON_EMPTY]: a list of at least one X

# ------------------------------------------------------------------ version 3 (written now)
# Each object as it looks in JSON. Those that differ between the versions are classes built on
# what the versions share (Machine, _ResultOkCommon, _RecordCommon, ...), so the difference shows.

class Tool(TypedDict):
    name: str
    version: str
Software = TypedDict("Software", {"coreml-sd": str, "coremltools": str, "numpy": str, "python": str})
class Machine(TypedDict):
    os: str
    os_version: str | None
    os_build: str | None
    arch: str
    chip: str | None
    performance_cores: int | None
    efficiency_cores: int | None
    cpu_cores: int | None
    gpu_cores: int | None
    memory_bytes: int | None
class MachineConditions(TypedDict):
    power_source: str | None
    thermal_warning: str | None
class Conditions(TypedDict):
    before: MachineConditions
    after: MachineConditions | None
class Component(TypedDict):
    precision: str | None
    compression: str | None
class Bundle(TypedDict):
    model: str
    layout: str
    family: str
    image_size: tuple[int, int]
    attention: str | None
    unet_batch: int
    components: dict[str, Component]
    manifest_sha256: str | None
class Settings(TypedDict):
    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    guidance_scale: float
    scheduler: str
    rng: str
    runs: int
    warmup: int
    backend: str
class Stats(TypedDict):
    median: float
    iqr: float
    count: int
class Run(TypedDict):
    end_to_end_s: float
    text_encoder_s: float
    denoise_s: float
    vae_decoder_s: float
class Energy(TypedDict):
    # each j_per_step is null where powermetrics printed no such line (e.g. no ANE line)
    cpu_j_per_step: float | None
    gpu_j_per_step: float | None
    ane_j_per_step: float | None
    coverage: float
    interval_ms: int
    sampler: str
class ResultFailed(TypedDict):
    compute_units: str
    backend: str
    status: Literal["failed"]
    error: str
class _ResultOkCommon(TypedDict):
    compute_units: str
    backend: str
    status: Literal["ok"]
    error: None
    load_cold_s: float
    load_warm_s: float
    text_encoder_s: float
    vae_decoder_s: float
    denoise_s: float
    end_to_end_s: float
    runs: Annotated[list[Run], NON_EMPTY]
    unet_ms_per_step: Stats
    host_ms_per_step: Stats
    iterations_per_second: float
    peak_rss_bytes: int
class _RecordCommon(TypedDict):
    tool: Tool
    created_at: str
    software: Software
    bundle: Bundle
    settings: Settings


class ResultOkV2(_ResultOkCommon):
    import_s: float
    energy: Energy | None
    thermal_pressure: list[str] | None
class _RecordV2Common(_RecordCommon):
    machine: Machine
    conditions: Conditions
    interrupted: bool
class _Size(TypedDict):
    width: int  # pixels: the size this configuration generated (a bundle may have several)
    height: int


class ResultOk(ResultOkV2, _Size):
    pass


class ResultFailedSized(ResultFailed, _Size):
    pass


class Record(_RecordV2Common):
    schema_version: Literal[3]
    results: Annotated[list[ResultOk | ResultFailedSized], NON_EMPTY]


# ------------------------------------------------------------------ version 2 (read only)
# Differences: results carry no size (each was measured at bundle.image_size, one per compute unit).

class RecordV2(_RecordV2Common):
    schema_version: Literal[2]
    results: Annotated[list[ResultOkV2 | ResultFailed], NON_EMPTY]


# ------------------------------------------------------------------ version 1 (read only)
# Differences: power source and thermal state (pmset) inside machine; load_cold_s included
# importing the backend's modules and there is no import_s; energy had no coverage or interval
# (and 0.0 where no sample overlapped); no thermal pressure; no interrupted flag.

class EnergyV1(TypedDict):
    cpu_j_per_step: float
    gpu_j_per_step: float
    ane_j_per_step: float
    sampler: str


class MachineV1(Machine):
    power_source: str | None
    thermal_state: str | None


class ResultOkV1(_ResultOkCommon):
    energy: EnergyV1 | None


class RecordV1(_RecordCommon):
    schema_version: Literal[1]
    machine: MachineV1
    results: Annotated[list[ResultOkV1 | ResultFailed], NON_EMPTY]


SCHEMAS = {1: RecordV1, 2: RecordV2, 3: Record}

# ------------------------------------------------------------------ checking a JSON value against a declaration

NoneType = type(None)
NAMES = {dict: "an object", list: "a list", int: "integer", float: "number", str: "string", bool: "boolean", NoneType: "null"}


def _json_type(tp: Any) -> type:
    """The JSON kind of value a declared type stands for (dict for a TypedDict, list for a tuple...)."""
    base = dict if is_typeddict(tp) else get_origin(tp) or tp
    return list if base is tuple else base


def _is(value: Any, json_type: type) -> bool:
    if isinstance(value, bool):  # JSON true is not a number here
        return json_type is bool
    return isinstance(value, (int, float) if json_type is float else json_type)


def _kind(value: Any) -> str:
    kinds = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


def _one_of(value: Any, literals: tuple) -> bool:
    return any(type(value) is type(a) and value == a for a in literals)  # so that true is not 1


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _check(value: Any, tp: Any, path: str) -> list[str]:
    """What is wrong with the JSON ``value`` as a ``tp``: one "path: problem" each."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is Annotated:
        empty = NON_EMPTY in args[1:] and value == []
        return _check(value, args[0], path) + ([f"{path}: expected at least 1 item(s), got 0"] if empty else [])
    if origin in (Union, types.UnionType):
        return _check_union(value, args, path)
    if origin is Literal:
        return [] if _one_of(value, args) else [f"{path}: expected {' or '.join(map(repr, args))}, got {value!r}"]
    if not _is(value, _json_type(tp)):
        return [f"{path or 'record'}: expected {NAMES[_json_type(tp)]}, got {_kind(value)}"]
    problems: list[str] = []
    if is_typeddict(tp):
        for key, sub in get_type_hints(tp, include_extras=True).items():
            problems += _check(value[key], sub, _join(path, key)) if key in value else [f"{_join(path, key)}: missing"]
    elif origin is dict:
        for key, item in value.items():
            problems += _check(item, args[1], _join(path, key))
    elif origin in (list, tuple):
        if origin is tuple and len(value) != len(args):
            problems.append(f"{path}: expected {len(args)} items, got {len(value)}")
        for i, (item, sub) in enumerate(zip(value, args if origin is tuple else repeat(args[0]))):
            problems += _check(item, sub, f"{path}[{i}]")
    return problems


def _check_union(value: Any, options: tuple, path: str) -> list[str]:
    """``X | None``, or TypedDicts told apart by a Literal field (a result's ``status``)."""
    if all(is_typeddict(option) for option in options):
        hints = [get_type_hints(option) for option in options]
        tag = next(key for key in hints[0] if all(get_origin(h.get(key)) is Literal for h in hints))
        got = value.get(tag) if isinstance(value, dict) else None
        chosen = [option for option, h in zip(options, hints) if _one_of(got, get_args(h[tag]))]
        if chosen:
            return _check(value, chosen[0], path)
        expected = " or ".join(repr(literal) for h in hints for literal in get_args(h[tag]))
        return [f"{_join(path, tag)}: expected {expected}, got {got!r}"]
    fitting = [option for option in options if _is(value, _json_type(option))]
    if fitting:
        return _check(value, fitting[0], path)
    return [f"{path}: expected {' or '.join(NAMES[_json_type(option)] for option in options)}, got {_kind(value)}"]


# ------------------------------------------------------------------ reading records


class RecordError(Exception):
    """An unreadable or invalid record (one-line message naming the file and the field)."""


def validate(record: Any) -> list[str]:
    """Problems of a parsed record (empty when valid), against the declaration of its schema_version."""
    if not isinstance(record, dict):
        return [f"record: expected a JSON object, got {_kind(record)}"]
    version = record.get("schema_version")
    if type(version) is not int or version not in SCHEMAS:
        readable = ", ".join(map(str, SCHEMAS))
        return [f"schema_version: {version!r}, this coreml-sd reads {readable}"]
    return _check(record, SCHEMAS[version], "")


def validate_result(result: Any) -> list[str]:
    """Problems of one entry of a record's ``results`` as bench writes it now (empty when valid)."""
    return _check(result, ResultOk | ResultFailedSized, "result")


def load_record(path: str | Path) -> dict[str, Any]:
    """A validated record from a file; ``RecordError`` names the file and the first problems."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except OSError as exc:
        raise RecordError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise RecordError(f"{path}: not JSON ({exc})") from None
    problems = validate(record)
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise RecordError(f"{path}: not a coreml-sd benchmark record: {'; '.join(problems[:3])}{more}")
    return record
