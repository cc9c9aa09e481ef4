"""Diffusion schedulers in numpy, numerically matching diffusers' torch schedulers.

    from coreml_sd.runtime.schedulers import from_config, SCHEDULER_NAMES
    sched = from_config(json.load(open("scheduler/scheduler_config.json")), name="dpmpp-2m-karras")

Files: `schedule.py` (the noise schedule every algorithm shares), `config.py` (reading config
dicts), `base.py` (the common API), then one file per algorithm family.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .base import RandomSource, Scheduler
from .config import resolve
from .ddim import DDIM
from .dpm_solver import DPMSolverMultistep
from .euler import Euler, EulerAncestral
from .lcm import LCM
from .pndm import PNDM


@dataclass(frozen=True)
class SchedulerSpec:
    """What one scheduler name stands for: our algorithm, the diffusers scheduler it matches
    (``getattr(diffusers, diffusers_class).from_config(config, **overrides)``), and how
    AUTOMATIC1111's web UI spells it (the ``Sampler`` of the PNG parameters other tools read)."""

    algorithm: type[Scheduler]
    diffusers_class: str  # the `_class_name` of its diffusers scheduler
    a1111_name: str
    overrides: Mapping[str, Any] = field(default_factory=dict)  # config fields the name fixes

    def __post_init__(self) -> None:
        object.__setattr__(self, "overrides", MappingProxyType(dict(self.overrides)))


_DPMPP_2M = {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_exponential_sigmas": False, "use_lu_lambdas": False}
# Every scheduler name, in the order `SCHEDULER_NAMES` lists them.
SCHEDULERS: Mapping[str, SchedulerSpec] = MappingProxyType({
    "pndm": SchedulerSpec(PNDM, "PNDMScheduler", "PLMS"),
    "ddim": SchedulerSpec(DDIM, "DDIMScheduler", "DDIM"),
    "euler": SchedulerSpec(Euler, "EulerDiscreteScheduler", "Euler"),
    "euler-a": SchedulerSpec(EulerAncestral, "EulerAncestralDiscreteScheduler", "Euler a"),
    "dpmpp-2m": SchedulerSpec(
        DPMSolverMultistep, "DPMSolverMultistepScheduler", "DPM++ 2M", {**_DPMPP_2M, "use_karras_sigmas": False}
    ),
    "dpmpp-2m-karras": SchedulerSpec(
        DPMSolverMultistep, "DPMSolverMultistepScheduler", "DPM++ 2M Karras", {**_DPMPP_2M, "use_karras_sigmas": True}
    ),
    "lcm": SchedulerSpec(LCM, "LCMScheduler", "LCM"),
})
SCHEDULER_NAMES: tuple[str, ...] = tuple(SCHEDULERS)


# diffusers `_class_name` -> (our name, algorithm), for a config run as it is: the first name of
# that class. A DPM-Solver config keeps its own settings; `from_config` names it after them.
_CLASSES: dict[str, tuple[str, type[Scheduler]]] = {}
for _name, _spec in SCHEDULERS.items():
    _CLASSES.setdefault(_spec.diffusers_class, (_name, _spec.algorithm))
del _name, _spec


def from_config(config: dict[str, Any], name: str | None = None) -> Scheduler:
    """Build a scheduler from a diffusers `scheduler_config.json` dict.

    `name=None` runs the algorithm of the config's `_class_name`; a name from `SCHEDULER_NAMES`
    runs that algorithm on the config's noise schedule, like diffusers'
    `OtherScheduler.from_config(config)` (the dpmpp names also fix the solver settings they name).
    """
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    as_is = name is None
    if as_is:
        class_name = config.get("_class_name")
        if class_name not in _CLASSES:
            raise ValueError(
                f"scheduler config field '_class_name': unsupported value {class_name!r} (expected one of "
                f"{', '.join(_CLASSES)}); pass name= one of {', '.join(SCHEDULER_NAMES)} to pick an algorithm"
            )
        name, cls = _CLASSES[class_name]
        overrides: Mapping[str, Any] = {}
    elif name in SCHEDULERS:
        cls, overrides = SCHEDULERS[name].algorithm, SCHEDULERS[name].overrides
    else:
        raise ValueError(f"unknown scheduler name {name!r}; valid names: {', '.join(SCHEDULER_NAMES)}")
    params = resolve(cls.FIELDS, config, overrides)
    if as_is and cls is DPMSolverMultistep:  # a DPM-Solver config as it is: named after what it turns out to be
        name = "dpm-solver-multistep"
        if params["algorithm_type"] != "sde-dpmsolver++" and params["solver_order"] == 2:
            if not (params["use_exponential_sigmas"] or params["use_lu_lambdas"]):
                name = "dpmpp-2m-karras" if params["use_karras_sigmas"] else "dpmpp-2m"
    return cls(params, name)


__all__ = ["SCHEDULERS", "SCHEDULER_NAMES", "RandomSource", "Scheduler", "SchedulerSpec", "from_config"]
