"""Pure-functional Flax schedulers with diffusers' API; see `common` for the contract they share."""
from flax_inpaint.diffusers_compat import missing_names
from flax_inpaint.schedulers.common import (
    CommonSchedulerState,
    FlaxKarrasDiffusionSchedulers,
    SchedulerMixin,
    SchedulerOutput,
    add_noise_common,
    begin_index_for_strength,
    betas_for_alpha_bar,
    broadcast_to_shape_from_left,
    get_sqrt_alpha_prod,
    get_velocity_common,
)
from flax_inpaint.schedulers.ddim import DDIMSchedulerState, FlaxDDIMInverseScheduler, FlaxDDIMScheduler
from flax_inpaint.schedulers.ddpm import DDPMSchedulerState, FlaxDDPMScheduler
from flax_inpaint.schedulers.dpm_solver import DPMSolverMultistepState, FlaxDPMSolverMultistepScheduler
from flax_inpaint.schedulers.euler import (
    FlaxEulerAncestralDiscreteScheduler,
    FlaxEulerDiscreteScheduler,
    SigmaSchedulerState,
)
from flax_inpaint.schedulers.lms import FlaxLMSDiscreteScheduler
from flax_inpaint.schedulers.pndm import FlaxPNDMScheduler, PNDMSchedulerState
from flax_inpaint.schedulers.unipc import FlaxUniPCMultistepScheduler

# diffusers' names for the same classes: one mixin, one step output and one state per scheduler family.
FlaxSchedulerMixin = SchedulerMixin
FlaxSchedulerOutput = FlaxDDIMSchedulerOutput = FlaxDDPMSchedulerOutput = FlaxPNDMSchedulerOutput = SchedulerOutput
FlaxLMSSchedulerOutput = FlaxEulerDiscreteSchedulerOutput = FlaxDPMSolverMultistepSchedulerOutput = SchedulerOutput
EulerDiscreteSchedulerState = LMSDiscreteSchedulerState = SigmaSchedulerState
DPMSolverMultistepSchedulerState = DPMSolverMultistepState

_VE = ("a variance-exploding sampler for unconditional score models (NCSN++ / EDM-style), not for Stable "
       "Diffusion; for Karras sigmas use FlaxEulerDiscreteScheduler(use_karras_sigmas=True) or "
       "FlaxDPMSolverMultistepScheduler(use_karras_sigmas=True).")
NOT_PROVIDED = {name: _VE for name in ("FlaxKarrasVeScheduler", "FlaxScoreSdeVeScheduler", "KarrasVeSchedulerState",
                                       "ScoreSdeVeSchedulerState", "FlaxKarrasVeOutput", "FlaxSdeVeOutput")}
__getattr__ = missing_names(__name__, NOT_PROVIDED)

__all__ = [
    "CommonSchedulerState",
    "DDIMSchedulerState",
    "DDPMSchedulerState",
    "DPMSolverMultistepSchedulerState",
    "EulerDiscreteSchedulerState",
    "FlaxDDIMInverseScheduler",
    "FlaxDDIMScheduler",
    "FlaxDDIMSchedulerOutput",
    "FlaxDDPMScheduler",
    "FlaxDDPMSchedulerOutput",
    "FlaxDPMSolverMultistepScheduler",
    "FlaxDPMSolverMultistepSchedulerOutput",
    "FlaxEulerAncestralDiscreteScheduler",
    "FlaxEulerDiscreteScheduler",
    "FlaxEulerDiscreteSchedulerOutput",
    "FlaxKarrasDiffusionSchedulers",
    "FlaxLMSDiscreteScheduler",
    "FlaxLMSSchedulerOutput",
    "FlaxPNDMScheduler",
    "FlaxPNDMSchedulerOutput",
    "FlaxSchedulerMixin",
    "FlaxSchedulerOutput",
    "FlaxUniPCMultistepScheduler",
    "LMSDiscreteSchedulerState",
    "PNDMSchedulerState",
    "SchedulerMixin",
    "SchedulerOutput",
    "add_noise_common",
    "begin_index_for_strength",
    "betas_for_alpha_bar",
    "broadcast_to_shape_from_left",
    "get_sqrt_alpha_prod",
    "get_velocity_common",
]
