"""Pure-functional Flax schedulers with diffusers' API; see `common` for the contract they share."""
from flax_inpaint.schedulers.common import (
    SchedulerMixin,
    SchedulerOutput,
    begin_index_for_strength,
)
from flax_inpaint.schedulers.ddim import FlaxDDIMInverseScheduler, FlaxDDIMScheduler
from flax_inpaint.schedulers.ddpm import FlaxDDPMScheduler
from flax_inpaint.schedulers.dpm_solver import FlaxDPMSolverMultistepScheduler
from flax_inpaint.schedulers.euler import FlaxEulerAncestralDiscreteScheduler, FlaxEulerDiscreteScheduler
from flax_inpaint.schedulers.lms import FlaxLMSDiscreteScheduler
from flax_inpaint.schedulers.pndm import FlaxPNDMScheduler
from flax_inpaint.schedulers.unipc import FlaxUniPCMultistepScheduler

__all__ = [
    "SchedulerMixin",
    "SchedulerOutput",
    "begin_index_for_strength",
    "FlaxDDIMScheduler",
    "FlaxDDIMInverseScheduler",
    "FlaxDDPMScheduler",
    "FlaxEulerDiscreteScheduler",
    "FlaxEulerAncestralDiscreteScheduler",
    "FlaxLMSDiscreteScheduler",
    "FlaxPNDMScheduler",
    "FlaxDPMSolverMultistepScheduler",
    "FlaxUniPCMultistepScheduler",
]
