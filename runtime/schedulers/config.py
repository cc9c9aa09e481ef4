"""Reading a diffusers `scheduler_config.json` dict.

Each algorithm declares the fields it reads (`FIELDS`: name -> `Field(default, check)`), with the
defaults of its own diffusers class, so a config written for one scheduler loads into another the
way `OtherScheduler.from_config(cfg)` does: fields the algorithm does not read (`_class_name`,
`skip_prk_steps` for Euler, ...) are ignored, missing ones take the algorithm's default. A value
the algorithm cannot honour raises ValueError naming the field and the value.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np

Check = Callable[[str, Any], Any]


class Field(NamedTuple):
    default: Any
    check: Check


def bad_value(field: str, value: Any, expected: str) -> ValueError:
    return ValueError(f"scheduler config field {field!r}: unsupported value {value!r} (expected {expected})")


def choice(*allowed: Any) -> Check:
    """One of a fixed set of values."""

    def check(field: str, value: Any) -> Any:
        if isinstance(value, bool) or value not in allowed:
            raise bad_value(field, value, "one of " + ", ".join(repr(a) for a in allowed))
        return value

    return check


def mapped(mapping: dict[Any, Any]) -> Check:
    """One of the mapping's keys, replaced by its value (legacy spellings the reference rewrites)."""
    inner = choice(*mapping)
    return lambda field, value: mapping[inner(field, value)]


def flag(field: str, value: Any) -> bool:
    """A boolean; null means false (diffusers writes `use_karras_sigmas: null` in some configs)."""
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad_value(field, value, "true or false")
    return value


def off(why: str) -> Check:
    """A feature we do not implement: only false (or null) is accepted."""

    def check(field: str, value: Any) -> bool:
        if value is not None and value is not False:
            raise bad_value(field, value, f"false; {why}")
        return False

    return check


def only(default: Any, why: str) -> Check:
    """A setting we do not implement: only its default value is accepted."""

    def check(field: str, value: Any) -> Any:
        if value != default or isinstance(value, bool):
            raise bad_value(field, value, f"{default!r}; {why}")
        return value

    return check


def number(field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad_value(field, value, "a number")
    return float(value)


def positive(field: str, value: Any) -> float:
    if number(field, value) <= 0:
        raise bad_value(field, value, "a positive number")
    return float(value)


def optional_positive(field: str, value: Any) -> float | None:
    return None if value is None else positive(field, value)


def count(field: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise bad_value(field, value, "a positive integer")
    return value


def offset(field: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise bad_value(field, value, "a non-negative integer")
    return value


def betas(field: str, value: Any) -> np.ndarray | None:
    if value is None:
        return None
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise bad_value(field, "<non-numeric list>", "null or a list of numbers") from None
    if arr.ndim != 1 or arr.size < 2 or not np.all((arr > 0) & (arr < 1)):
        raise bad_value(field, value if arr.size <= 4 else "<list>", "null or a list of betas in (0, 1)")
    return arr.astype(np.float32)


def schedule_fields(
    *,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
    beta_schedule: str = "linear",
    timestep_spacing: str,
    predictions: tuple[str, ...],
    zero_snr: bool = True,
) -> dict[str, Field]:
    """The noise-schedule fields every algorithm reads, with that algorithm's defaults."""
    fields = {
        "num_train_timesteps": Field(1000, count),
        "beta_start": Field(beta_start, positive),
        "beta_end": Field(beta_end, positive),
        "beta_schedule": Field(beta_schedule, choice("linear", "scaled_linear", "squaredcos_cap_v2")),
        "trained_betas": Field(None, betas),
        "prediction_type": Field("epsilon", choice(*predictions)),
        "timestep_spacing": Field(timestep_spacing, choice("linspace", "leading", "trailing")),
        "steps_offset": Field(0, offset),
    }
    if zero_snr:
        fields["rescale_betas_zero_snr"] = Field(False, flag)
    return fields


# Fields that matter only with dynamic thresholding, which no algorithm here implements: any
# number is accepted (and ignored) as long as `thresholding` stays false.
THRESHOLDING_FIELDS = {
    "thresholding": Field(False, off("dynamic thresholding is not implemented")),
    "dynamic_thresholding_ratio": Field(0.995, number),
    "sample_max_value": Field(1.0, number),
}


def resolve(fields: dict[str, Field], config: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The algorithm's parameters: its defaults, updated by the config's fields it reads, then by
    the overrides a scheduler name implies; every value checked."""
    params = {}
    for key, field in fields.items():
        value = overrides.get(key, config.get(key, field.default))
        params[key] = field.check(key, value)
    if params["trained_betas"] is not None and len(params["trained_betas"]) != params["num_train_timesteps"]:
        raise bad_value(
            "trained_betas", f"<{len(params['trained_betas'])} betas>", f"{params['num_train_timesteps']} betas"
        )
    return params
