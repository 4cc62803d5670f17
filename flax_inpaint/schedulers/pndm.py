"""Pseudo numerical methods (PNDM, Liu et al. 2022), step-for-step like diffusers' PNDMScheduler.

Every step applies the transfer function phi (eq. 11) from timestep t to t_prev to an effective noise
estimate e':
  x_prev = sqrt(abar_prev / abar_t) x_t
           - (abar_prev - abar_t) e' / (abar_t sqrt(1 - abar_prev) + sqrt(abar_t (1 - abar_t) abar_prev))
PRK warm-up (unless skip_prk_steps): 3 Runge-Kutta steps of 4 model evaluations each, on half-steps.
PLMS: e' = linear multistep over the last 4 noise estimates, (55 e0 - 59 e1 + 37 e2 - 9 e3) / 24 once 4
are known (lower orders before; with skip_prk_steps the first step is a 2-evaluation Heun-like step).

The history `ets` is a fixed [4, *shape] buffer (newest last) plus a count, so the loop has fixed shapes.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Optional

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
    inference_timesteps,
    make_alphas_cumprod,
    not_provided,
    step_result,
)


PNDM_ORDER = 4


@flax.struct.dataclass
class PNDMSchedulerState(DiffusersStateNames):
    prk_timesteps = not_provided("timesteps holds the Runge-Kutta timesteps (num_prk_steps of them) then the PLMS ones.")
    plms_timesteps = not_provided("timesteps holds the Runge-Kutta timesteps (num_prk_steps of them) then the PLMS ones.")

    alphas_cumprod: jax.Array  # [num_train_timesteps] f32
    final_alpha_cumprod: jax.Array  # [] f32, abar past the last step
    timesteps: jax.Array  # [num_iterations] int32: 12 PRK evaluations (if used) then the PLMS ones
    step_index: jax.Array  # [] int32, position in `timesteps`
    counter: jax.Array  # [] int32, steps taken since set_timesteps (diffusers' `counter`; strength-independent)
    ets: jax.Array  # [4, *shape] f32, past noise estimates, newest last
    num_ets: jax.Array  # [] int32, how many of `ets` are filled (<= 4)
    cur_model_output: jax.Array  # [*shape] f32, PRK accumulator
    cur_sample: jax.Array  # [*shape] f32, sample at the start of the current PRK / first PLMS step
    init_noise_sigma: jax.Array  # [] f32, 1.0
    num_inference_steps: Optional[int] = flax.struct.field(pytree_node=False, default=None)  # set by set_timesteps
    num_prk_steps: int = flax.struct.field(pytree_node=False, default=0)


@dataclasses.dataclass(frozen=True)
class FlaxPNDMScheduler(SchedulerMixin):
    """PNDM / PLMS. Stable Diffusion's default (`skip_prk_steps=True`)."""

    skip_prk_steps: bool = False
    set_alpha_to_one: bool = False
    steps_offset: int = 0
    prediction_type: str = "epsilon"
    dtype: Any = jnp.float32  # accepted like diffusers' (float32 only: see SchedulerMixin)
    timestep_spacing: str = "leading"

    diffusers_class = "PNDMScheduler"
    pndm_order: ClassVar[int] = 4  # the PLMS order (diffusers' attribute)
    step_prk = not_provided("step() runs the Runge-Kutta or the linear multistep update as the state's step_index says.")
    step_plms = not_provided("step() runs the Runge-Kutta or the linear multistep update as the state's step_index says.")
    prediction_types = ("epsilon", "v_prediction")

    def create_state(self, common: Optional[CommonSchedulerState] = None) -> PNDMSchedulerState:
        self._check_common(common)
        alphas_cumprod = make_alphas_cumprod(self)
        final = np.float32(1.0) if self.set_alpha_to_one else alphas_cumprod[0]
        empty = jnp.zeros((0,), jnp.float32)
        return PNDMSchedulerState(
            alphas_cumprod=jnp.asarray(alphas_cumprod),
            final_alpha_cumprod=jnp.asarray(final, jnp.float32),
            timesteps=jnp.zeros((0,), jnp.int32),
            step_index=jnp.zeros((), jnp.int32),
            counter=jnp.zeros((), jnp.int32),
            ets=empty,
            num_ets=jnp.zeros((), jnp.int32),
            cur_model_output=empty,
            cur_sample=empty,
            init_noise_sigma=jnp.ones((), jnp.float32),
        )

    def set_timesteps(self, state: PNDMSchedulerState, num_inference_steps: int, shape: tuple):
        T = self.num_train_timesteps
        n = check_num_inference_steps(num_inference_steps, T)
        desc = inference_timesteps(T, n, self.timestep_spacing, self.steps_offset)
        if self.skip_prk_steps:
            prk = np.zeros((0,), np.int64)
            plms = np.concatenate([desc[:2], desc[1:]])  # the first step evaluates its 2nd timestep twice
        else:
            if n < PNDM_ORDER:
                raise ValueError(
                    f"FlaxPNDMScheduler: the PRK warm-up needs num_inference_steps >= {PNDM_ORDER}, got {n}; "
                    "use more steps or skip_prk_steps=True."
                )
            # 3 RK4 steps over the 4 noisiest timesteps, each evaluated at [t, mid, mid, t_next].
            top = desc[:PNDM_ORDER]
            mid = top[1:] + T // n // 2
            prk = np.stack([top[:-1], mid, mid, top[1:]], axis=1).ravel()
            plms = desc[PNDM_ORDER - 1 :]
        timesteps = np.concatenate([prk, plms]).astype(np.int32)
        zeros = jnp.zeros(tuple(shape), jnp.float32)
        return state.replace(
            timesteps=jnp.asarray(timesteps),
            step_index=jnp.zeros((), jnp.int32),
            counter=jnp.zeros((), jnp.int32),
            ets=jnp.zeros((PNDM_ORDER,) + tuple(shape), jnp.float32),
            num_ets=jnp.zeros((), jnp.int32),
            cur_model_output=zeros,
            cur_sample=zeros,
            num_inference_steps=n,
            num_prk_steps=len(prk),
        )

    # -- the transfer function phi ----------------------------------------------------------------
    def _prev_sample(self, state, sample, t, prev_t, model_output):
        abar_t = state.alphas_cumprod[t]
        abar_prev = alpha_cumprod_or_final(state.alphas_cumprod, prev_t, state.final_alpha_cumprod)
        beta_t = 1.0 - abar_t
        beta_prev = 1.0 - abar_prev
        if self.prediction_type == "v_prediction":
            model_output = (abar_t**0.5) * model_output + (beta_t**0.5) * sample
        sample_coeff = (abar_prev / abar_t) ** 0.5
        denom = abar_t * beta_prev**0.5 + (abar_t * beta_t * abar_prev) ** 0.5
        return sample_coeff * sample - (abar_prev - abar_t) * model_output / denom

    @staticmethod
    def _push(ets, num_ets, e, do):
        ets = jnp.where(do, jnp.concatenate([ets[1:], e[None]]), ets)
        return ets, jnp.where(do, jnp.minimum(num_ets + 1, PNDM_ORDER), num_ets)

    def _step_prk(self, state, model_output, sample, t):
        c = state.counter
        phase = c % 4
        diff_to_prev = jnp.where(c % 2 == 1, 0, self.num_train_timesteps // state.num_inference_steps // 2)
        prev_t = t - diff_to_prev
        t_start = state.timesteps[c // 4 * 4]  # the RK step's start (PRK evaluations come first)
        weight = jnp.where((phase == 0) | (phase == 3), 1 / 6, 1 / 3)
        acc = state.cur_model_output + weight * model_output
        e_eff = jnp.where(phase == 3, acc, model_output)
        cur_model_output = jnp.where(phase == 3, 0.0, acc)
        cur_sample = jnp.where(phase == 0, sample, state.cur_sample)
        ets, num_ets = self._push(state.ets, state.num_ets, model_output, phase == 0)
        prev_sample = self._prev_sample(state, cur_sample, t_start, prev_t, e_eff)
        return prev_sample, state.replace(
            ets=ets, num_ets=num_ets, cur_model_output=cur_model_output, cur_sample=cur_sample
        )

    def _step_plms(self, state, model_output, sample, t):
        c = state.counter
        stride = self.num_train_timesteps // state.num_inference_steps
        second = c == 1  # the second evaluation of skip_prk's first step re-evaluates at the same t
        prev_t = jnp.where(second, t, t - stride)
        t_eff = jnp.where(second, t + stride, t)
        ets, num_ets = self._push(state.ets, state.num_ets, model_output, ~second)
        e1, e2, e3, e4 = ets[3], ets[2], ets[1], ets[0]  # newest first
        first = (num_ets == 1) & (c == 0)
        heun = (num_ets == 1) & (c == 1)
        e_eff = jnp.select(
            [first, heun, num_ets == 2, num_ets == 3],
            [model_output, (model_output + e1) / 2, (3 * e1 - e2) / 2, (23 * e1 - 16 * e2 + 5 * e3) / 12],
            (1 / 24) * (55 * e1 - 59 * e2 + 37 * e3 - 9 * e4),
        )
        x = jnp.where(heun, state.cur_sample, sample)
        cur_sample = jnp.where(first, sample, state.cur_sample)
        prev_sample = self._prev_sample(state, x, t_eff, prev_t, e_eff)
        return prev_sample, state.replace(ets=ets, num_ets=num_ets, cur_sample=cur_sample)

    def step(
        self,
        state: PNDMSchedulerState,
        model_output: jax.Array,
        timestep,
        sample: jax.Array,
        return_dict: bool = True,
        *,
        key: Optional[jax.Array] = None,
    ) -> SchedulerOutput:
        """One PRK or PLMS evaluation at iteration `state.step_index`."""
        out_dtype = sample.dtype
        model_output, sample = self._fp32_step_inputs(state, model_output, sample)
        t = state.timesteps[state.step_index]
        if state.num_prk_steps:
            # Both branches are a few elementwise ops; selecting beats lax.cond (no retrace when eager).
            is_prk = state.counter < state.num_prk_steps
            prev_sample, new_state = jax.tree.map(
                lambda a, b: jnp.where(is_prk, a, b),
                self._step_prk(state, model_output, sample, t),
                self._step_plms(state, model_output, sample, t),
            )
        else:
            prev_sample, new_state = self._step_plms(state, model_output, sample, t)
        new_state = new_state.replace(step_index=state.step_index + 1, counter=state.counter + 1)
        return step_result(return_dict, prev_sample=prev_sample.astype(out_dtype), state=new_state)
