"""Linear multistep (LMS) sampler of k-diffusion, step-for-step like diffusers' LMSDiscreteScheduler.

With derivatives d_j = (x_j - x0_j) / sigma_j, the step from sigma_i to sigma_{i+1} is
  x_{i+1} = x_i + sum_{c < k} a_{i,c} d_{i-c},
  a_{i,c} = int_{sigma_i}^{sigma_{i+1}} prod_{m != c, m < k} (tau - sigma_{i-m}) / (sigma_{i-c} - sigma_{i-m}) dtau,
k = min(i + 1, order). The integrands are polynomials of degree < 4, so the coefficients are computed
exactly in float64 with 4-point Gauss-Legendre once, in `set_timesteps`, into a fixed table
[4 orders, num_inference_steps, 4]; the derivatives live in a fixed [4, *shape] buffer.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from flax_inpaint.schedulers.common import SchedulerOutput, div_exact, not_provided, step_result
from flax_inpaint.schedulers.euler import SigmaSchedulerMixin, SigmaSchedulerState

MAX_ORDER = 4


def lms_coefficients(sigmas: np.ndarray, max_order: int = MAX_ORDER) -> np.ndarray:
    """[max_order, n, max_order] table: [order - 1, i, c] = a_{i,c} for the step's order k = min(i + 1, order)."""
    sigmas = np.asarray(sigmas, np.float64)
    n = len(sigmas) - 1
    nodes, weights = np.polynomial.legendre.leggauss(MAX_ORDER)
    table = np.zeros((max_order, n, max_order))
    for order in range(1, max_order + 1):
        for i in range(n):
            k = min(i + 1, order)
            a, b = sigmas[i], sigmas[i + 1]
            tau = 0.5 * (b - a) * nodes + 0.5 * (a + b)
            for c in range(k):
                prod = np.ones_like(tau)
                for m in range(k):
                    if m != c:
                        prod *= (tau - sigmas[i - m]) / (sigmas[i - c] - sigmas[i - m])
                table[order - 1, i, c] = 0.5 * (b - a) * np.dot(weights, prod)
    return table.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class FlaxLMSDiscreteScheduler(SigmaSchedulerMixin):
    """LMS with up to 4 past derivatives (`step(..., order=4)`)."""

    prediction_type: str = "epsilon"
    dtype: Any = jnp.float32  # accepted like diffusers' (float32 only: see SchedulerMixin)
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    timestep_spacing: str = "linspace"
    steps_offset: int = 0

    diffusers_class = "LMSDiscreteScheduler"
    get_lms_coefficient = not_provided("the LMS coefficients are precomputed by set_timesteps (state.lms_coeffs); "
                                       "step() applies them.")
    unsupported_config = {"use_exponential_sigmas": (False, None), "use_beta_sigmas": (False, None)}

    def _history(self, sigmas, shape):
        if shape is None:  # create_state: no sample shape yet
            return super()._history(sigmas, shape)
        return jnp.zeros((MAX_ORDER,) + shape, jnp.float32), jnp.asarray(lms_coefficients(sigmas))

    def step(
        self,
        state: SigmaSchedulerState,
        model_output: jax.Array,
        timestep,
        sample: jax.Array,
        order: int = MAX_ORDER,
        return_dict: bool = True,
        *,
        key: Optional[jax.Array] = None,
    ) -> SchedulerOutput:
        """One LMS step at iteration `state.step_index`; `order` (1..4) is static."""
        out_dtype = sample.dtype
        model_output, sample = self._fp32_step_inputs(state, model_output, sample)
        if state.lms_coeffs.ndim != 3:
            raise ValueError("FlaxLMSDiscreteScheduler: call set_timesteps(state, num_inference_steps, shape) first.")
        if not isinstance(order, int) or not 1 <= order <= MAX_ORDER:
            raise ValueError(f"FlaxLMSDiscreteScheduler.step: order={order!r} must be an int in [1, {MAX_ORDER}].")
        i = state.step_index
        sigma = state.sigmas[i]
        x0 = self._x0(model_output, sample, sigma, sigma)
        derivative = div_exact(sample - x0, sigma)
        history = jnp.concatenate([state.history[1:], derivative[None]])
        num_history = jnp.minimum(state.num_history + 1, MAX_ORDER)
        coeffs = state.lms_coeffs[order - 1, i]
        # Only as many past derivatives as this run has produced (fewer than the order after set_begin_index).
        coeffs = jnp.where(jnp.arange(MAX_ORDER) < jnp.minimum(num_history, order), coeffs, 0.0)
        update = 0.0
        for c in range(order):
            update = update + coeffs[c] * history[MAX_ORDER - 1 - c]
        prev_sample = sample + update
        return step_result(return_dict, 
            prev_sample=prev_sample.astype(out_dtype),
            state=state.replace(step_index=i + 1, history=history, num_history=num_history),
            pred_original_sample=x0,
        )
