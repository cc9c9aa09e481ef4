"""The benchmark record: what ``coreml-sd bench`` writes and ``coreml-sd report`` reads.

One JSON object per run of bench, ``schema_version`` 1, documented field by field in
benchmarks/README.md. ``validate`` checks a parsed record against ``SCHEMA`` and returns the
problems (path and what is wrong); ``load_record`` raises ``RecordError`` naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1

NUM = (int, float)
NONE = type(None)


def opt(t):
    return (t, NONE) if isinstance(t, type) else (*t, NONE)


class Each:
    """A dict with arbitrary keys whose values all follow ``spec``."""

    def __init__(self, spec):
        self.spec = spec


STATS = {"median": NUM, "iqr": NUM, "count": int}
ENERGY = {"cpu_j_per_step": NUM, "gpu_j_per_step": NUM, "ane_j_per_step": NUM, "sampler": str}
RESULT_OK = {
    "compute_units": str,
    "backend": str,
    "status": str,
    "error": NONE,
    "load_cold_s": NUM,
    "load_warm_s": NUM,
    "text_encoder_s": NUM,
    "unet_ms_per_step": STATS,
    "host_ms_per_step": STATS,
    "vae_decoder_s": NUM,
    "denoise_s": NUM,
    "end_to_end_s": NUM,
    "runs": [{"end_to_end_s": NUM, "text_encoder_s": NUM, "denoise_s": NUM, "vae_decoder_s": NUM}],
    "iterations_per_second": NUM,
    "peak_rss_bytes": int,
    "energy": opt(dict),
}
RESULT_FAILED = {"compute_units": str, "backend": str, "status": str, "error": str}
SCHEMA = {
    "schema_version": int,
    "tool": {"name": str, "version": str},
    "created_at": str,
    "machine": {
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
        "power_source": opt(str),
        "thermal_state": opt(str),
    },
    "software": {"coreml-sd": str, "coremltools": str, "numpy": str, "python": str},
    "bundle": {
        "model": str,
        "layout": str,
        "family": str,
        "image_size": [int],
        "attention": opt(str),
        "unet_batch": int,
        "components": Each({"precision": opt(str), "compression": opt(str)}),
        "manifest_sha256": opt(str),
    },
    "settings": {
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
    },
    "results": list,  # of RESULT_OK / RESULT_FAILED, checked by status
}


class RecordError(Exception):
    """An unreadable or invalid record (one-line message naming the file and the field)."""


def _check(value: Any, spec: Any, path: str, problems: list[str]) -> None:
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            problems.append(f"{path or 'record'}: expected an object")
            return
        for key, sub in spec.items():
            if key not in value:
                problems.append(f"{path}{'.' if path else ''}{key}: missing")
            else:
                _check(value[key], sub, f"{path}{'.' if path else ''}{key}", problems)
    elif isinstance(spec, Each):
        if not isinstance(value, dict):
            problems.append(f"{path}: expected an object")
            return
        for key, item in value.items():
            _check(item, spec.spec, f"{path}.{key}", problems)
    elif isinstance(spec, list):
        if not isinstance(value, list):
            problems.append(f"{path}: expected a list")
            return
        for i, item in enumerate(value):
            _check(item, spec[0], f"{path}[{i}]", problems)
    else:
        types = spec if isinstance(spec, tuple) else (spec,)
        if isinstance(value, bool) and bool not in types:  # JSON true is not a number here
            problems.append(f"{path}: expected {_names(types)}, got {value!r}")
        elif not isinstance(value, types):
            problems.append(f"{path}: expected {_names(types)}, got {type(value).__name__}")


def _names(types: tuple) -> str:
    return " or ".join("null" if t is NONE else {"int": "integer", "float": "number", "str": "string"}.get(t.__name__, t.__name__) for t in types)


def validate(record: Any) -> list[str]:
    """Problems of a parsed record (empty when valid)."""
    if not isinstance(record, dict):
        return ["record: expected a JSON object"]
    if record.get("schema_version") != SCHEMA_VERSION:
        return [f"schema_version: {record.get('schema_version')!r}, this coreml-sd reads {SCHEMA_VERSION}"]
    problems: list[str] = []
    _check(record, SCHEMA, "", problems)
    for i, result in enumerate(record.get("results") or []):
        status = result.get("status") if isinstance(result, dict) else None
        spec = RESULT_OK if status == "ok" else RESULT_FAILED if status == "failed" else None
        if spec is None:
            problems.append(f"results[{i}].status: expected 'ok' or 'failed', got {status!r}")
            continue
        _check(result, spec, f"results[{i}]", problems)
        if status == "ok" and isinstance(result.get("energy"), dict):
            _check(result["energy"], ENERGY, f"results[{i}].energy", problems)
    if not record.get("results"):
        problems.append("results: no result")
    return problems


def load_record(path: str | Path) -> dict[str, Any]:
    """A validated record from a file; ``RecordError`` names the file and the first problems."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except OSError as exc:
        raise RecordError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise RecordError(f"{path}: not JSON ({exc})") from None
    problems = validate(record)
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise RecordError(f"{path}: not a coreml-sd benchmark record: {'; '.join(problems[:3])}{more}")
    return record
