"""DDPM ancestral sampling (Ho et al. 2020), step-for-step like diffusers' DDPMScheduler.

Posterior q(x_prev | x_t, x0) (eq. 7), with a_t = abar_t / abar_prev and b_t = 1 - a_t:
  mean = sqrt(abar_prev) b_t / (1 - abar_t) * x0 + sqrt(a_t) (1 - abar_prev) / (1 - abar_t) * x_t
  var  = (1 - abar_prev) / (1 - abar_t) * b_t          ("fixed_small"; "fixed_large" uses b_t)
No noise is added at t = 0.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np

from flax_inpaint.schedulers.common import (
    CommonSchedulerState,
    DiffusersStateNames,
    SchedulerMixin,
    SchedulerOutput,
    alpha_cumprod_or_final,
    clip_or_threshold,
    inference_timesteps,
    make_alphas_cumprod,
    step_result,
    to_x0_eps,
)


VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range")


@flax.struct.dataclass
class DDPMSchedulerState(DiffusersStateNames):
    alphas_cumprod: jax.Array  # [num_train_timesteps] f32, abar_t
    timesteps: jax.Array  # [num_inference_steps] int32, loop order
    prev_timesteps: jax.Array  # [num_inference_steps] int32, the next timestep in the loop, -1 after the last
    step_index: jax.Array  # [] int32
    init_noise_sigma: jax.Array  # [] f32, 1.0
    num_inference_steps: Optional[int] = flax.struct.field(pytree_node=False, default=None)  # set by set_timesteps


@dataclasses.dataclass(frozen=True)
class FlaxDDPMScheduler(SchedulerMixin):
    """Denoising diffusion probabilistic models; every step but the last draws noise, so `step` needs `key`."""

    variance_type: str = "fixed_small"
    clip_sample: bool = True
    prediction_type: str = "epsilon"
    dtype: Any = jnp.float32  # accepted like diffusers' (float32 only: see SchedulerMixin)
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    clip_sample_range: float = 1.0
    sample_max_value: float = 1.0
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False

    diffusers_class = "DDPMScheduler"

    def _validate(self):
        super()._validate()
        if self.variance_type not in VARIANCE_TYPES:
            raise ValueError(
                f"FlaxDDPMScheduler: variance_type={self.variance_type!r} is not supported; use one of {VARIANCE_TYPES}."
            )

    def create_state(self, common: Optional[CommonSchedulerState] = None) -> DDPMSchedulerState:
        self._check_common(common)
        return DDPMSchedulerState(
            alphas_cumprod=jnp.asarray(make_alphas_cumprod(self)),
            timesteps=jnp.zeros((0,), jnp.int32),
            prev_timesteps=jnp.zeros((0,), jnp.int32),
            step_index=jnp.zeros((), jnp.int32),
            init_noise_sigma=jnp.ones((), jnp.float32),
        )

    def set_timesteps(self, state: DDPMSchedulerState, num_inference_steps: int, shape: tuple = ()):
        ts = inference_timesteps(
            self.num_train_timesteps, num_inference_steps, self.timestep_spacing, self.steps_offset
        )
        prev = np.concatenate([ts[1:], [-1]])
        return state.replace(
            timesteps=jnp.asarray(ts, jnp.int32),
            prev_timesteps=jnp.asarray(prev, jnp.int32),
            step_index=jnp.zeros((), jnp.int32),
            num_inference_steps=int(num_inference_steps),
        )

    def step(
        self,
        state: DDPMSchedulerState,
        model_output: jax.Array,
        timestep,
        sample: jax.Array,
        key: Optional[jax.Array] = None,
        return_dict: bool = True,
    ) -> SchedulerOutput:
        """One ancestral step at iteration `state.step_index`.

        For the learned variance types the model output carries twice the sample's channels (on whichever
        axis is doubled); the second half is the predicted variance.
        """
        out_dtype = sample.dtype
        model_output, sample = self._fp32_step_inputs(state, model_output, sample)
        if key is None:
            raise ValueError("FlaxDDPMScheduler.step draws noise and needs a PRNG `key`.")

        predicted_variance = None
        if model_output.shape != sample.shape:
            doubled = [
                a for a, (m, s) in enumerate(zip(model_output.shape, sample.shape)) if m == 2 * s and m != s
            ]
            if self.variance_type not in ("learned", "learned_range") or model_output.ndim != sample.ndim or not doubled:
                raise ValueError(
                    f"FlaxDDPMScheduler: model_output shape {model_output.shape} does not match sample shape "
                    f"{sample.shape} (only variance_type='learned'/'learned_range' takes doubled channels)."
                )
            model_output, predicted_variance = jnp.split(model_output, 2, axis=doubled[0])

        t = state.timesteps[state.step_index]
        prev_t = state.prev_timesteps[state.step_index]
        abar_t = state.alphas_cumprod[t]
        abar_prev = alpha_cumprod_or_final(state.alphas_cumprod, prev_t, 1.0)
        beta_prod_t = 1.0 - abar_t
        beta_prod_prev = 1.0 - abar_prev
        current_alpha_t = abar_t / abar_prev
        current_beta_t = 1.0 - current_alpha_t

        x0, _ = to_x0_eps(model_output, sample, abar_t**0.5, beta_prod_t**0.5, self.prediction_type)
        x0 = clip_or_threshold(x0, self)
        x0_coeff = (abar_prev**0.5 * current_beta_t) / beta_prod_t
        xt_coeff = current_alpha_t**0.5 * beta_prod_prev / beta_prod_t
        mean = x0_coeff * x0 + xt_coeff * sample

        variance = jnp.maximum(beta_prod_prev / beta_prod_t * current_beta_t, 1e-20)
        vt = self.variance_type
        if vt == "fixed_small":
            std = variance**0.5
        elif vt == "fixed_small_log":
            std = jnp.exp(0.5 * jnp.log(variance))
        elif vt == "fixed_large":
            std = current_beta_t**0.5
        elif vt == "learned":
            std = predicted_variance**0.5
        else:  # learned_range: interpolate log-variance between the posterior's and beta_t
            frac = (predicted_variance + 1) / 2
            std = jnp.exp(0.5 * (frac * jnp.log(current_beta_t) + (1 - frac) * jnp.log(variance)))
        noise = jax.random.normal(key, sample.shape, jnp.float32)
        prev_sample = mean + jnp.where(t > 0, std, 0.0) * noise
        return step_result(return_dict, 
            prev_sample=prev_sample.astype(out_dtype),
            state=state.replace(step_index=state.step_index + 1),
            pred_original_sample=x0,
        )
