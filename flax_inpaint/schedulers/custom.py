"""Custom timestep / sigma schedules (`timesteps=`, `sigmas=` of the pipelines), as diffusers'
`retrieve_timesteps` hands them to a scheduler: only schedulers whose `set_timesteps` takes them, with
diffusers' errors for the others. The schedule is computed on the host like any other (same rounding);
its arrays then enter the program as traced values, so another schedule of the same length reuses it.
"""
from __future__ import annotations

import inspect
from typing import Any, Dict, Optional, Sequence

import numpy as np


def check_custom_schedule(scheduler, num_inference_steps: int, timesteps: Optional[Sequence[float]],
                          sigmas: Optional[Sequence[float]]) -> int:
    """The number of inference steps a call runs: the custom schedule's length if one is given."""
    if timesteps is not None and sigmas is not None:
        raise ValueError("Only one of `timesteps` or `sigmas` can be passed. Please choose one to set custom values")
    for name, values, kind in (("timesteps", timesteps, "timestep"), ("sigmas", sigmas, "sigmas")):
        if values is None:
            continue
        if name not in inspect.signature(scheduler.set_timesteps).parameters:
            raise ValueError(f"The current scheduler class {scheduler.__class__}'s `set_timesteps` does not support "
                             f"custom {kind} schedules. Please check whether you are using the correct scheduler.")
        n = int(np.size(values)) - (name == "sigmas")
        if n < 1:
            raise ValueError(f"{name} has {np.size(values)} values; it needs at least {1 + (name == 'sigmas')}.")
        return n
    return num_inference_steps


def custom_schedule(scheduler, timesteps: Optional[Sequence[float]],
                    sigmas: Optional[Sequence[float]]) -> Dict[str, Any]:
    """The state fields (`scheduler.custom_schedule_fields`) that a custom schedule sets."""
    kwargs = {"timesteps": timesteps} if timesteps is not None else {"sigmas": sigmas}
    state = scheduler.set_timesteps(scheduler.create_state(), **kwargs)
    return {k: getattr(state, k) for k in scheduler.custom_schedule_fields}
