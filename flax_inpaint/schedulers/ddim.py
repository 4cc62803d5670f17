"""DDIM (Song et al. 2021) and its inversion, step-for-step like diffusers' DDIMScheduler / DDIMInverseScheduler.

Notation: abar_t = alphas_cumprod[t]; x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps.
DDIM update (eq. 12):  x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - s_t^2) eps + s_t z,
with s_t = eta * sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)) and z ~ N(0, I).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

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
    check_num_inference_steps,
    clip_or_threshold,
    inference_timesteps,
    make_alphas_cumprod,
    step_result,
    to_x0_eps,
)



@flax.struct.dataclass
class DDIMSchedulerState(DiffusersStateNames):
    alphas_cumprod: jax.Array  # [num_train_timesteps] f32, abar_t
    final_alpha_cumprod: jax.Array  # [] f32, abar used past the last step (DDIM) / before the first (inverse)
    timesteps: jax.Array  # [num_inference_steps] int32, loop order
    step_index: jax.Array  # [] int32, iteration the next `step` performs
    init_noise_sigma: jax.Array  # [] f32, 1.0
    num_inference_steps: Optional[int] = flax.struct.field(pytree_node=False, default=None)  # set by set_timesteps


def _create_state(config) -> DDIMSchedulerState:
    alphas_cumprod = make_alphas_cumprod(config)
    final = np.float32(1.0) if config.set_alpha_to_one else alphas_cumprod[0]
    return DDIMSchedulerState(
        alphas_cumprod=jnp.asarray(alphas_cumprod),
        final_alpha_cumprod=jnp.asarray(final, jnp.float32),
        timesteps=jnp.zeros((0,), jnp.int32),
        step_index=jnp.zeros((), jnp.int32),
        init_noise_sigma=jnp.ones((), jnp.float32),
    )


@dataclasses.dataclass(frozen=True)
class FlaxDDIMScheduler(SchedulerMixin):
    """Denoising diffusion implicit models; `eta=0` deterministic, `eta=1` DDPM-like (needs `key`)."""

    clip_sample: bool = True
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    prediction_type: str = "epsilon"
    dtype: Any = jnp.float32  # accepted like diffusers' (float32 only: see SchedulerMixin)
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    timestep_spacing: str = "leading"
    rescale_betas_zero_snr: bool = False

    diffusers_class = "DDIMScheduler"

    def create_state(self, common: Optional[CommonSchedulerState] = None) -> DDIMSchedulerState:
        self._check_common(common)
        return _create_state(self)

    def set_timesteps(self, state: DDIMSchedulerState, num_inference_steps: int, shape: tuple = ()):
        ts = inference_timesteps(
            self.num_train_timesteps, num_inference_steps, self.timestep_spacing, self.steps_offset
        )
        return state.replace(
            timesteps=jnp.asarray(ts, jnp.int32),
            step_index=jnp.zeros((), jnp.int32),
            num_inference_steps=int(num_inference_steps),
        )

    def step(
        self,
        state: DDIMSchedulerState,
        model_output: jax.Array,
        timestep,
        sample: jax.Array,
        eta: float = 0.0,
        return_dict: bool = True,
        *,
        key: Optional[jax.Array] = None,
        use_clipped_model_output: bool = False,
    ) -> SchedulerOutput:
        """One DDIM step at iteration `state.step_index` (`timestep` is ignored: it is read from the state)."""
        out_dtype = sample.dtype
        model_output, sample = self._fp32_step_inputs(state, model_output, sample)
        if isinstance(eta, (int, float)) and eta > 0 and key is None:
            raise ValueError(f"{type(self).__name__}.step: eta={eta} > 0 adds noise and needs a PRNG `key`.")

        t = state.timesteps[state.step_index]
        # diffusers uses T // n as the stride for every spacing.
        prev_t = t - self.num_train_timesteps // state.num_inference_steps
        abar_t = state.alphas_cumprod[t]
        abar_prev = alpha_cumprod_or_final(state.alphas_cumprod, prev_t, state.final_alpha_cumprod)
        beta_t = 1.0 - abar_t

        x0, eps = to_x0_eps(model_output, sample, abar_t**0.5, beta_t**0.5, self.prediction_type)
        x0 = clip_or_threshold(x0, self)
        variance = ((1.0 - abar_prev) / beta_t) * (1.0 - abar_t / abar_prev)
        std_dev_t = eta * variance**0.5
        if use_clipped_model_output:
            eps = (sample - abar_t**0.5 * x0) / beta_t**0.5
        prev_sample = abar_prev**0.5 * x0 + (1.0 - abar_prev - std_dev_t**2) ** 0.5 * eps
        if key is not None and not (isinstance(eta, (int, float)) and eta == 0):
            noise = jax.random.normal(key, sample.shape, jnp.float32)
            prev_sample = prev_sample + std_dev_t * noise
        return step_result(return_dict, 
            prev_sample=prev_sample.astype(out_dtype),
            state=state.replace(step_index=state.step_index + 1),
            pred_original_sample=x0,
        )


@dataclasses.dataclass(frozen=True)
class FlaxDDIMInverseScheduler(SchedulerMixin):
    """DDIM inversion (image -> noise): timesteps ascend and each step moves to the *next* noise level."""

    clip_sample: bool = True
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    prediction_type: str = "epsilon"
    clip_sample_range: float = 1.0
    timestep_spacing: str = "leading"
    rescale_betas_zero_snr: bool = False
    dtype: Any = jnp.float32

    diffusers_class = "DDIMInverseScheduler"

    @classmethod
    def from_config(cls, config: Optional[Mapping[str, Any]] = None, return_unused_kwargs: bool = False, **kwargs):
        """As `SchedulerMixin.from_config`, plus diffusers' deprecated `set_alpha_to_zero` (configs and
        keyword arguments of diffusers < 0.18): where given, it is the value of `set_alpha_to_one`, as in
        diffusers (which keeps set_alpha_to_one in its config but computes with the alias's value)."""
        alias = kwargs.pop("set_alpha_to_zero", None)
        if isinstance(config, Mapping) and alias is None:
            alias = config.get("set_alpha_to_zero")
        if alias is not None:
            kwargs["set_alpha_to_one"] = alias
        return super().from_config(config, return_unused_kwargs, **kwargs)

    def create_state(self, common: Optional[CommonSchedulerState] = None) -> DDIMSchedulerState:
        self._check_common(common)
        return _create_state(self)

    def set_timesteps(self, state: DDIMSchedulerState, num_inference_steps: int, shape: tuple = ()):
        n = check_num_inference_steps(num_inference_steps, self.num_train_timesteps)
        # Like diffusers, a "linspace" config (e.g. loaded from an Euler config) fails here, not at load.
        if self.timestep_spacing not in ("leading", "trailing"):
            raise ValueError(
                f"FlaxDDIMInverseScheduler: timestep_spacing={self.timestep_spacing!r} is not supported; "
                "use 'leading' or 'trailing'."
            )
        ts = inference_timesteps(self.num_train_timesteps, n, self.timestep_spacing, self.steps_offset)[::-1]
        return state.replace(
            timesteps=jnp.asarray(ts, jnp.int32), step_index=jnp.zeros((), jnp.int32), num_inference_steps=n
        )

    def step(
        self,
        state: DDIMSchedulerState,
        model_output: jax.Array,
        timestep,
        sample: jax.Array,
        return_dict: bool = True,
        *,
        key: Optional[jax.Array] = None,
    ) -> SchedulerOutput:
        """x_{t} -> x_{t'} with t' = state.timesteps[step_index] the noisier target and t = t' - T // n."""
        out_dtype = sample.dtype
        model_output, sample = self._fp32_step_inputs(state, model_output, sample)

        t_next = state.timesteps[state.step_index]
        t = jnp.minimum(t_next - self.num_train_timesteps // state.num_inference_steps, self.num_train_timesteps - 1)
        abar_t = alpha_cumprod_or_final(state.alphas_cumprod, t, state.final_alpha_cumprod)
        abar_next = state.alphas_cumprod[t_next]
        beta_t = 1.0 - abar_t

        x0, eps = to_x0_eps(model_output, sample, abar_t**0.5, beta_t**0.5, self.prediction_type)
        if self.clip_sample:
            x0 = jnp.clip(x0, -self.clip_sample_range, self.clip_sample_range)
        prev_sample = abar_next**0.5 * x0 + (1.0 - abar_next) ** 0.5 * eps
        return step_result(return_dict, 
            prev_sample=prev_sample.astype(out_dtype),
            state=state.replace(step_index=state.step_index + 1),
            pred_original_sample=x0,
        )
