"""The benchmark record: what ``coreml-sd bench`` writes and ``coreml-sd report`` reads.

One JSON object per run of bench, documented field by field in benchmarks/README.md. Version 2
is written; version 1 records (the first ones committed) are still read. ``validate`` checks a
parsed record against the spec of its version and returns the problems (path and what is
wrong); ``load_record`` raises ``RecordError`` naming the file.

A spec is a small nested value: a type or tuple of types (``opt(str)`` is "string or null"), a
dict (an object with exactly those required keys; extra keys are allowed and ignored), ``Each``
(an object with arbitrary keys), ``ListOf`` (a list, with an optional length), or ``ByStatus``
(a result object whose spec depends on its ``status``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 2  # what bench writes; SCHEMAS (below) holds every version read

NUM = (int, float)
NONE = type(None)


def opt(t):
    """``t`` or null."""
    return (t, NONE) if isinstance(t, type) else (*t, NONE) if isinstance(t, tuple) else Nullable(t)


@dataclass(frozen=True)
class Nullable:
    """A structured spec (object, list) that may also be null."""

    spec: Any


@dataclass(frozen=True)
class Each:
    """A dict with arbitrary keys whose values all follow ``spec``."""

    spec: Any


@dataclass(frozen=True)
class ListOf:
    """A list of items following ``spec``: exactly ``length`` items if given, else at least ``min_length``."""

    spec: Any
    length: int | None = None
    min_length: int = 0


@dataclass(frozen=True)
class ByStatus:
    """An object whose ``status`` names the spec it follows."""

    specs: dict[str, Any]


# ------------------------------------------------------------------ version 2 (written now)

STATS = {"median": NUM, "iqr": NUM, "count": int}
RUN = {"end_to_end_s": NUM, "text_encoder_s": NUM, "denoise_s": NUM, "vae_decoder_s": NUM}
ENERGY = {
    "cpu_j_per_step": opt(NUM),  # null: powermetrics printed no such line (e.g. no ANE line)
    "gpu_j_per_step": opt(NUM),
    "ane_j_per_step": opt(NUM),
    "coverage": NUM,
    "interval_ms": int,
    "sampler": str,
}
RESULT_FAILED = {"compute_units": str, "backend": str, "status": str, "error": str}
RESULT_OK = {
    "compute_units": str,
    "backend": str,
    "status": str,
    "error": NONE,
    "import_s": NUM,
    "load_cold_s": NUM,
    "load_warm_s": NUM,
    "text_encoder_s": NUM,
    "unet_ms_per_step": STATS,
    "host_ms_per_step": STATS,
    "vae_decoder_s": NUM,
    "denoise_s": NUM,
    "end_to_end_s": NUM,
    "runs": ListOf(RUN, min_length=1),
    "iterations_per_second": NUM,
    "peak_rss_bytes": int,
    "energy": opt(ENERGY),
    "thermal_pressure": opt(ListOf(str)),
}
MACHINE = {
    "os": str,
    "os_version": opt(str),
    "os_build": opt(str),
    "arch": str,
    "chip": opt(str),
    "performance_cores": opt(int),
    "efficiency_cores": opt(int),
    "cpu_cores": opt(int),
    "gpu_cores": opt(int),
    "memory_bytes": opt(int),
}
CONDITIONS = {"power_source": opt(str), "thermal_warning": opt(str)}
BUNDLE = {
    "model": str,
    "layout": str,
    "family": str,
    "image_size": ListOf(int, length=2),
    "attention": opt(str),
    "unet_batch": int,
    "components": Each({"precision": opt(str), "compression": opt(str)}),
    "manifest_sha256": opt(str),
}
SETTINGS = {
    "prompt": str,
    "negative_prompt": str,
    "seed": int,
    "steps": int,
    "guidance_scale": NUM,
    "scheduler": str,
    "runs": int,
    "warmup": int,
    "backend": str,
    "rng": str,
}
SCHEMA_V2 = {
    "schema_version": int,
    "tool": {"name": str, "version": str},
    "created_at": str,
    "machine": MACHINE,
    "conditions": {"before": CONDITIONS, "after": opt(CONDITIONS)},
    "software": {"coreml-sd": str, "coremltools": str, "numpy": str, "python": str},
    "bundle": BUNDLE,
    "settings": SETTINGS,
    "interrupted": bool,
    "results": ListOf(ByStatus({"ok": RESULT_OK, "failed": RESULT_FAILED}), min_length=1),
}

# ------------------------------------------------------------------ version 1 (read only)
# Differences: power source and thermal state (pmset) inside machine; load_cold_s included
# importing the backend's modules and there is no import_s; energy had no coverage or interval
# (and 0.0 where no sample overlapped); no thermal pressure; no interrupted flag.

ENERGY_V1 = {"cpu_j_per_step": NUM, "gpu_j_per_step": NUM, "ane_j_per_step": NUM, "sampler": str}
RESULT_OK_V1 = {k: v for k, v in RESULT_OK.items() if k not in ("import_s", "thermal_pressure")} | {"energy": opt(ENERGY_V1)}
SCHEMA_V1 = {
    **{k: v for k, v in SCHEMA_V2.items() if k not in ("conditions", "interrupted")},
    "machine": MACHINE | {"power_source": opt(str), "thermal_state": opt(str)},
    "results": ListOf(ByStatus({"ok": RESULT_OK_V1, "failed": RESULT_FAILED}), min_length=1),
}

SCHEMAS = {1: SCHEMA_V1, 2: SCHEMA_V2}


class RecordError(Exception):
    """An unreadable or invalid record (one-line message naming the file and the field)."""


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _check(value: Any, spec: Any, path: str, problems: list[str]) -> None:
    if isinstance(spec, Nullable):
        if value is not None:
            _check(value, spec.spec, path, problems)
    elif isinstance(spec, dict):
        if not isinstance(value, dict):
            problems.append(f"{path or 'record'}: expected an object, got {_kind(value)}")
            return
        for key, sub in spec.items():
            if key not in value:
                problems.append(f"{_join(path, key)}: missing")
            else:
                _check(value[key], sub, _join(path, key), problems)
    elif isinstance(spec, Each):
        if not isinstance(value, dict):
            problems.append(f"{path}: expected an object, got {_kind(value)}")
            return
        for key, item in value.items():
            _check(item, spec.spec, _join(path, key), problems)
    elif isinstance(spec, ListOf):
        if not isinstance(value, list):
            problems.append(f"{path}: expected a list, got {_kind(value)}")
            return
        if spec.length is not None and len(value) != spec.length:
            problems.append(f"{path}: expected {spec.length} items, got {len(value)}")
        elif len(value) < spec.min_length:
            problems.append(f"{path}: expected at least {spec.min_length} item(s), got {len(value)}")
        for i, item in enumerate(value):
            _check(item, spec.spec, f"{path}[{i}]", problems)
    elif isinstance(spec, ByStatus):
        status = value.get("status") if isinstance(value, dict) else None
        if status not in spec.specs:
            problems.append(f"{path}.status: expected {' or '.join(map(repr, spec.specs))}, got {status!r}")
            return
        _check(value, spec.specs[status], path, problems)
    else:
        types = spec if isinstance(spec, tuple) else (spec,)
        if isinstance(value, bool) and bool not in types:  # JSON true is not a number here
            problems.append(f"{path}: expected {_names(types)}, got {value!r}")
        elif not isinstance(value, types):
            problems.append(f"{path}: expected {_names(types)}, got {_kind(value)}")


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", NONE: "null"}.get(
        type(value), "a number" if isinstance(value, NUM) else type(value).__name__)


def _names(types: tuple) -> str:
    names = {"int": "integer", "float": "number", "str": "string", "bool": "boolean", "dict": "object", "list": "list"}
    return " or ".join("null" if t is NONE else names.get(t.__name__, t.__name__) for t in types)


def validate(record: Any) -> list[str]:
    """Problems of a parsed record (empty when valid), against the spec of its schema_version."""
    if not isinstance(record, dict):
        return [f"record: expected a JSON object, got {_kind(record)}"]
    version = record.get("schema_version")
    if type(version) is not int or version not in SCHEMAS:
        readable = ", ".join(map(str, SCHEMAS))
        return [f"schema_version: {version!r}, this coreml-sd reads {readable}"]
    problems: list[str] = []
    _check(record, SCHEMAS[version], "", problems)
    return problems


def validate_result(result: Any) -> list[str]:
    """Problems of one entry of a version-2 record's ``results`` (empty when valid)."""
    problems: list[str] = []
    _check(result, SCHEMA_V2["results"].spec, "result", problems)
    return problems


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
