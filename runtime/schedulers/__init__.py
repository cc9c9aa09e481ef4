"""Diffusion schedulers in numpy, numerically matching diffusers' torch schedulers.

    from coreml_sd.runtime.schedulers import from_config, SCHEDULER_NAMES
    sched = from_config(json.load(open("scheduler/scheduler_config.json")), name="dpmpp-2m-karras")

Files: `schedule.py` (the noise schedule every algorithm shares), `config.py` (reading config
dicts), `base.py` (the common API), then one file per algorithm family.
"""

from __future__ import annotations

from typing import Any

from .base import RandomSource, Scheduler
from .config import resolve
from .ddim import DDIM
from .dpm_solver import DPMSolverMultistep
from .euler import Euler, EulerAncestral
from .lcm import LCM
from .pndm import PNDM

# name -> (algorithm, config overrides the name implies)
_DPMPP_2M = {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_exponential_sigmas": False, "use_lu_lambdas": False}
_NAMED: dict[str, tuple[type[Scheduler], dict[str, Any]]] = {
    "pndm": (PNDM, {}),
    "ddim": (DDIM, {}),
    "euler": (Euler, {}),
    "euler-a": (EulerAncestral, {}),
    "dpmpp-2m": (DPMSolverMultistep, {**_DPMPP_2M, "use_karras_sigmas": False}),
    "dpmpp-2m-karras": (DPMSolverMultistep, {**_DPMPP_2M, "use_karras_sigmas": True}),
    "lcm": (LCM, {}),
}
SCHEDULER_NAMES: tuple[str, ...] = tuple(_NAMED)

# diffusers `_class_name` -> (our name, algorithm); a DPM-Solver config keeps its own settings.
_CLASSES: dict[str, tuple[str, type[Scheduler]]] = {
    "PNDMScheduler": ("pndm", PNDM),
    "DDIMScheduler": ("ddim", DDIM),
    "EulerDiscreteScheduler": ("euler", Euler),
    "EulerAncestralDiscreteScheduler": ("euler-a", EulerAncestral),
    "DPMSolverMultistepScheduler": ("dpmpp", DPMSolverMultistep),
    "LCMScheduler": ("lcm", LCM),
}


def from_config(config: dict[str, Any], name: str | None = None) -> Scheduler:
    """Build a scheduler from a diffusers `scheduler_config.json` dict.

    `name=None` runs the algorithm of the config's `_class_name`; a name from `SCHEDULER_NAMES`
    runs that algorithm on the config's noise schedule, like diffusers'
    `OtherScheduler.from_config(config)` (the dpmpp names also fix the solver settings they name).
    """
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    if name is None:
        class_name = config.get("_class_name")
        if class_name not in _CLASSES:
            raise ValueError(
                f"scheduler config field '_class_name': unsupported value {class_name!r} (expected one of "
                f"{', '.join(_CLASSES)}); pass name= one of {', '.join(SCHEDULER_NAMES)} to pick an algorithm"
            )
        name, cls = _CLASSES[class_name]
        overrides: dict[str, Any] = {}
    elif name in _NAMED:
        cls, overrides = _NAMED[name]
    else:
        raise ValueError(f"unknown scheduler name {name!r}; valid names: {', '.join(SCHEDULER_NAMES)}")
    params = resolve(cls.FIELDS, config, overrides)
    if name == "dpmpp":  # a DPM-Solver config as it is: named after what it turns out to be
        name = "dpm-solver-multistep"
        if params["algorithm_type"] != "sde-dpmsolver++" and params["solver_order"] == 2:
            if not (params["use_exponential_sigmas"] or params["use_lu_lambdas"]):
                name = "dpmpp-2m-karras" if params["use_karras_sigmas"] else "dpmpp-2m"
    return cls(params, name)


__all__ = ["SCHEDULER_NAMES", "RandomSource", "Scheduler", "from_config"]
