"""Euler and Euler-ancestral samplers (Karras et al. 2022, k-diffusion), step-for-step like diffusers'.

These work in the variance-exploding parametrisation x = x0 + sigma eps, sigma_t = sqrt((1 - abar_t) / abar_t);
the model sees x / sqrt(sigma^2 + 1) (`scale_model_input`). The ODE dx/dsigma = (x - x0) / sigma is
integrated with Euler steps; the ancestral variant steps to sigma_down and adds fresh noise of std sigma_up
with sigma_up^2 + sigma_down^2 = sigma_next^2.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from flax_inpaint.schedulers.common import (
    CommonSchedulerState,
    DiffusersStateNames,
    SchedulerMixin,
    SchedulerOutput,
    broadcast_to_sample,
    cached_schedule,
    check_num_inference_steps,
    div_exact,
    inference_timesteps,
    karras_sigmas,
    log_f32,
    not_provided,
    sigma_alphas_cumprod,
    sigma_to_t,
    step_result,
    train_sigmas,
)


def euler_update(x: jax.Array, x0: jax.Array, sigma: jax.Array, sigma_next: jax.Array) -> jax.Array:
    """The Euler step of dx/dsigma = (x - x0) / sigma from sigma to sigma_next: x0 + (sigma_next / sigma) (x - x0).

    diffusers evaluates it as x + (x - x0) / sigma * (sigma_next - sigma), the same number in exact
    arithmetic, but in fp32 that form cancels: with zero-SNR's first sigma of 4096 it subtracts ~4096 x to
    leave ~sigma_next x, losing log2(sigma / sigma_next) bits (4.7e-5 relative of the final sample against the
    formula in float64, at 4 steps). This form has no cancellation and gives x0 exactly at sigma_next = 0.
    """
    return x0 + (sigma_next / sigma) * (x - x0)


@flax.struct.dataclass
class SigmaSchedulerState(DiffusersStateNames):
    """State of the sigma-based schedulers (Euler, Euler-ancestral, LMS): diffusers' EulerDiscreteSchedulerState
    and LMSDiscreteSchedulerState."""

    derivatives = not_provided("LMS keeps its past derivatives in `history` (newest last, `num_history` filled).")

    timesteps: jax.Array  # [num_inference_steps] f32 (fractional for linspace spacing / Karras sigmas)
    sigmas: jax.Array  # [num_inference_steps + 1] f32, descending, last = final sigma (0)
    step_index: jax.Array  # [] int32
    init_noise_sigma: jax.Array  # [] f32, std of the initial latent noise
    history: jax.Array  # [order, *shape] f32 (LMS derivatives, newest last) or [0] when unused
    num_history: jax.Array  # [] int32, filled entries of `history`
    lms_coeffs: jax.Array  # [4, num_inference_steps, 4] f32 (LMS: [order-1, step, k]) or [0]
    num_inference_steps: Optional[int] = flax.struct.field(pytree_node=False, default=None)  # set by set_timesteps


class SigmaSchedulerMixin(SchedulerMixin):
    """Shared sigma schedule, input scaling and forward noising for Euler / Euler-ancestral / LMS."""

    @cached_schedule
    def _sigma_schedule(self, num_inference_steps: int) -> Tuple[np.ndarray, np.ndarray]:
        """(timesteps f32 [n], sigmas f32 [n + 1]) as diffusers' set_timesteps computes them, with correctly
        rounded log / pow (see `common.exact_log`)."""
        n = num_inference_steps
        ts = inference_timesteps(
            self.num_train_timesteps, n, self.timestep_spacing, self.steps_offset, round_linspace=False
        ).astype(np.float32)
        train = train_sigmas(sigma_alphas_cumprod(self))
        sigmas = np.interp(ts, np.arange(0, len(train)), train)
        if getattr(self, "use_karras_sigmas", False):
            smin = getattr(self, "sigma_min", None)
            smax = getattr(self, "sigma_max", None)
            sigmas = karras_sigmas(
                smin if smin is not None else sigmas[-1].item(), smax if smax is not None else sigmas[0].item(), n
            )
            ts = sigma_to_t(sigmas, log_f32(train)).astype(np.float32)  # diffusers' fp32 log table
        last = train[0] if getattr(self, "final_sigmas_type", "zero") == "sigma_min" else 0.0
        return ts, np.concatenate([sigmas, [last]]).astype(np.float32)

    def _history(self, sigmas: np.ndarray, shape: Optional[tuple]) -> Tuple[jax.Array, jax.Array]:
        """(history buffer, LMS coefficient table) of multistep subclasses; empty for Euler."""
        return jnp.zeros((0,), jnp.float32), jnp.zeros((0,), jnp.float32)

    def _sigma_state(self, num_inference_steps: int, shape: Optional[tuple], schedule=None) -> SigmaSchedulerState:
        """The state for `num_inference_steps`, or for a custom `schedule` (timesteps [n], sigmas [n + 1])."""
        n = check_num_inference_steps(num_inference_steps, self.num_train_timesteps)
        ts, sigmas = self._sigma_schedule(n) if schedule is None else schedule
        smax = sigmas.max()
        init = smax if self.timestep_spacing in ("linspace", "trailing") else np.sqrt(smax * smax + np.float32(1))
        history, lms_coeffs = self._history(sigmas, shape)
        return SigmaSchedulerState(
            timesteps=jnp.asarray(ts),
            sigmas=jnp.asarray(sigmas),
            step_index=jnp.zeros((), jnp.int32),
            init_noise_sigma=jnp.asarray(init, jnp.float32),
            history=history,
            num_history=jnp.zeros((), jnp.int32),
            lms_coeffs=lms_coeffs,
            num_inference_steps=n,
        )

    def create_state(self, common: Optional[CommonSchedulerState] = None) -> SigmaSchedulerState:
        """The schedule over all training timesteps (like diffusers before set_timesteps)."""
        self._check_common(common)
        return self._sigma_state(self.num_train_timesteps, None)

    def set_timesteps(self, state: SigmaSchedulerState, num_inference_steps: int, shape: tuple = ()):
        """Sigmas for `num_inference_steps` (static); `shape` sizes LMS's derivative history."""
        return self._sigma_state(num_inference_steps, tuple(shape))

    def scale_model_input(self, state: SigmaSchedulerState, sample: jax.Array, timestep=None) -> jax.Array:
        """x / sqrt(sigma^2 + 1) at iteration `state.step_index`, computed in fp32, returned in x's dtype."""
        sigma = state.sigmas[state.step_index]
        return (sample.astype(jnp.float32) / ((sigma**2 + 1) ** 0.5)).astype(sample.dtype)

    def add_noise(self, state: SigmaSchedulerState, original_samples: jax.Array, noise: jax.Array,
                  timesteps) -> jax.Array:
        """x0 + sigma(t) * noise, sigma looked up at each timestep's position in `state.timesteps`.

        Like diffusers' `index_for_timestep`, a timestep occurring twice resolves to its second occurrence.
        """
        timesteps = jnp.atleast_1d(jnp.asarray(timesteps, jnp.float32))
        dist = jnp.abs(state.timesteps[None, :] - timesteps[:, None])  # [B, n]
        first = jnp.argmin(dist, axis=1)
        best = jnp.take_along_axis(dist, first[:, None], axis=1)
        later = (dist == best) & (jnp.arange(dist.shape[1])[None, :] > first[:, None])
        idx = jnp.where(later.any(axis=1), jnp.argmax(later, axis=1), first)
        sigma = state.sigmas[idx]
        if sigma.shape[0] == 1:
            sigma = sigma[0]
        sigma = broadcast_to_sample(sigma, original_samples)
        x = original_samples.astype(jnp.float32) + noise.astype(jnp.float32) * sigma
        return x.astype(original_samples.dtype)

    def _x0(self, model_output, sample, sigma, sigma_hat):
        """x0 estimate in the VE parametrisation (v-prediction converted with the unscaled sigma)."""
        if self.prediction_type == "epsilon":
            return sample - sigma_hat * model_output
        if self.prediction_type == "v_prediction":
            return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + div_exact(sample, sigma**2 + 1)
        return model_output  # "sample"


@dataclasses.dataclass(frozen=True)
class FlaxEulerDiscreteScheduler(SigmaSchedulerMixin):
    """Euler (Karras et al. 2022, Algorithm 2); `s_churn > 0` adds stochastic churn (needs `key`)."""

    prediction_type: str = "epsilon"
    timestep_spacing: str = "linspace"
    dtype: Any = jnp.float32  # accepted like diffusers' (float32 only: see SchedulerMixin)
    interpolation_type: str = "linear"
    use_karras_sigmas: Optional[bool] = False
    use_exponential_sigmas: Optional[bool] = False
    use_beta_sigmas: Optional[bool] = False
    sigma_min: Optional[float] = None
    sigma_max: Optional[float] = None
    timestep_type: str = "discrete"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False
    final_sigmas_type: str = "zero"

    diffusers_class = "EulerDiscreteScheduler"
    custom_schedule_fields = ("timesteps", "sigmas", "init_noise_sigma")
    unsupported_config = {
        "interpolation_type": ("linear",),
        "use_exponential_sigmas": (False, None),
        "use_beta_sigmas": (False, None),
        "timestep_type": ("discrete",),
        "final_sigmas_type": ("zero", "sigma_min"),
    }

    def set_timesteps(self, state: SigmaSchedulerState, num_inference_steps: Optional[int] = None, shape: tuple = (),
                      timesteps: Optional[Sequence[float]] = None, sigmas: Optional[Sequence[float]] = None):
        """Sigmas for `num_inference_steps`, or diffusers' custom `timesteps` [n] (sigmas interpolated from the
        training ones) or `sigmas` [n + 1] (the last is the final sigma; timesteps by log-sigma interpolation)."""
        if timesteps is not None and sigmas is not None:
            raise ValueError("Only one of `timesteps` or `sigmas` should be set.")
        if num_inference_steps is None and timesteps is None and sigmas is None:
            raise ValueError("Must pass exactly one of `num_inference_steps` or `timesteps` or `sigmas.")
        if num_inference_steps is not None and (timesteps is not None or sigmas is not None):
            raise ValueError("Can only pass one of `num_inference_steps` or `timesteps` or `sigmas`.")
        if timesteps is not None and self.use_karras_sigmas:
            raise ValueError("Cannot set `timesteps` with `config.use_karras_sigmas = True`.")
        if timesteps is None and sigmas is None:
            return self._sigma_state(num_inference_steps, tuple(shape))
        train = train_sigmas(sigma_alphas_cumprod(self))
        if sigmas is not None:
            sig = np.asarray(sigmas, np.float32).ravel()
            if sig.size < 2:
                raise ValueError(f"sigmas has {sig.size} values; give at least 2 (the last is the final sigma).")
            ts = sigma_to_t(sig[:-1], log_f32(train)).astype(np.float32)
        else:
            ts = np.asarray(timesteps, np.float32).ravel()
            last = train[0] if self.final_sigmas_type == "sigma_min" else 0.0
            sig = np.concatenate([np.interp(ts, np.arange(0, len(train)), train), [last]]).astype(np.float32)
        return self._sigma_state(len(ts), tuple(shape), (ts, sig))

    def step(
        self,
        state: SigmaSchedulerState,
        model_output: jax.Array,
        timestep,
        sample: jax.Array,
        return_dict: bool = True,
        *,
        key: Optional[jax.Array] = None,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
    ) -> SchedulerOutput:
        """One Euler step from sigmas[i] to sigmas[i + 1], i = state.step_index."""
        out_dtype = sample.dtype
        model_output, sample = self._fp32_step_inputs(state, model_output, sample)
        if s_churn > 0 and key is None:
            raise ValueError("FlaxEulerDiscreteScheduler.step: s_churn > 0 adds noise and needs a PRNG `key`.")
        i = state.step_index
        sigma = state.sigmas[i]
        gamma = jnp.where(
            (s_tmin <= sigma) & (sigma <= s_tmax), min(s_churn / (state.sigmas.shape[0] - 1), 2**0.5 - 1), 0.0
        )
        sigma_hat = sigma * (gamma + 1)
        if s_churn > 0:
            noise = jax.random.normal(key, sample.shape, jnp.float32) * s_noise
            sample = jnp.where(gamma > 0, sample + noise * (sigma_hat**2 - sigma**2) ** 0.5, sample)
        x0 = self._x0(model_output, sample, sigma, sigma_hat)
        prev_sample = euler_update(sample, x0, sigma_hat, state.sigmas[i + 1])
        return step_result(return_dict,
            prev_sample=prev_sample.astype(out_dtype),
            state=state.replace(step_index=i + 1),
            pred_original_sample=x0,
        )


@dataclasses.dataclass(frozen=True)
class FlaxEulerAncestralDiscreteScheduler(SigmaSchedulerMixin):
    """Euler ancestral (k-diffusion `sample_euler_ancestral`); every step draws noise, so needs `key`."""

    prediction_type: str = "epsilon"
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False
    dtype: Any = jnp.float32

    diffusers_class = "EulerAncestralDiscreteScheduler"
    prediction_types = ("epsilon", "v_prediction")

    def step(
        self,
        state: SigmaSchedulerState,
        model_output: jax.Array,
        timestep,
        sample: jax.Array,
        return_dict: bool = True,
        *,
        key: Optional[jax.Array] = None,
    ) -> SchedulerOutput:
        """Deterministic step to sigma_down, then noise of std sigma_up (none at the final sigma = 0)."""
        out_dtype = sample.dtype
        model_output, sample = self._fp32_step_inputs(state, model_output, sample)
        if key is None:
            raise ValueError("FlaxEulerAncestralDiscreteScheduler.step draws noise and needs a PRNG `key`.")
        i = state.step_index
        sigma_from, sigma_to = state.sigmas[i], state.sigmas[i + 1]
        x0 = self._x0(model_output, sample, sigma_from, sigma_from)
        sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
        sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
        prev_sample = euler_update(sample, x0, sigma_from, sigma_down)
        prev_sample = prev_sample + jax.random.normal(key, sample.shape, jnp.float32) * sigma_up
        return step_result(return_dict, 
            prev_sample=prev_sample.astype(out_dtype),
            state=state.replace(step_index=i + 1),
            pred_original_sample=x0,
        )
