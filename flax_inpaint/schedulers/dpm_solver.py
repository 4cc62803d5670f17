"""DPM-Solver / DPM-Solver++ multistep (Lu et al. 2022a/b), step for step like diffusers'
DPMSolverMultistepScheduler (deterministic variants).

Notation: sigma_i = sqrt((1 - abar) / abar) at the i-th loop timestep (the "Karras" sigma), from which
  alpha_t = 1 / sqrt(1 + sigma^2),  sigma_t = sigma * alpha_t,  lambda_t = log(alpha_t / sigma_t)
(x_t = alpha_t x0 + sigma_t eps). With s0 the current node, t the next one, h = lambda_t - lambda_s0,
both algorithms take one form:
  dpmsolver++ integrates D = x0 over -lambda:  hh = -h, ratio = sigma_t / sigma_s0, c = alpha_t
  dpmsolver   integrates D = eps over lambda:  hh = +h, ratio = alpha_t / alpha_s0, c = sigma_t
  order 1:  x_t = ratio x - c (e^hh - 1) D_0                                  (= DDIM)
  order 2:  ... - c/2 (e^hh - 1) D_1  (midpoint)  or  ... - c ((e^hh - 1) / hh - 1) D_1  (heun)
  order 3:  ... - c ((e^hh - 1) / hh - 1) D_1 - c ((e^hh - 1 - hh) / hh^2 - 1/2) D_2
D_0 is the newest converted output, D_1 / D_2 divided differences of the newest 2 / 3 in lambda.

The history is a fixed [solver_order, *shape] buffer (newest last) and the per-step order a traced int
chosen like diffusers (warm-up, `lower_order_final`, `euler_at_final`, final sigma 0), dispatched with
`lax.switch` to one static-order update, so `step` runs inside one `fori_loop`. One deliberate
difference: a zero-length last step (final sigma == last sigma, e.g. Karras with `final_sigmas_type=
"sigma_min"`) is first order, i.e. the identity, where diffusers 0.42 divides by h = 0 and returns NaN.

Numerics: the node scalars alpha_t, sigma_t, lambda_t and each step's e^hh - 1 are computed on the host
(`SigmaNodes`) and every array term is rounded before it is summed (`common.sum_rounded`), as diffusers'
eager PyTorch does. The noise form's first-order term is evaluated through the model's x0 as
(sigma_t / sigma_s0) x + alpha_t (1 - e^-h) x0, equal to diffusers' (alpha_t / alpha_s0) x - sigma_t
(e^h - 1) eps without its cancellation (~9.1 x - 8.1 eps on a sample / v model's first steps, eps ~ x).

This module also holds what UniPC shares with it: the multistep timestep spacing, the sigma schedule
(optionally Karras) and the sigma-based `add_noise`.
"""
from __future__ import annotations

import dataclasses
import functools
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
    clip_or_threshold,
    exact_exp,
    exact_expm1,
    karras_sigmas,
    log_f32,
    not_provided,
    rounded,
    sigma_alphas_cumprod,
    sigma_to_t,
    step_result,
    sum_rounded,
    to_x0_eps,
    train_sigmas,
)


ALGORITHM_TYPES = ("dpmsolver++", "dpmsolver")
SOLVER_TYPES = ("midpoint", "heun")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")
# diffusers' SDE variants need noise per step and are not implemented here.
_SDE_ALGORITHMS = ("sde-dpmsolver", "sde-dpmsolver++")


# ----------------------------------------------------------------------------- shared multistep pieces

def multistep_timesteps(
    num_train_timesteps: int,
    num_inference_steps: int,
    spacing: str,
    steps_offset: int = 0,
    last_timestep: Optional[int] = None,
) -> np.ndarray:
    """Descending int64 timesteps as DPM-Solver / UniPC space them (they differ from DDIM's).

    linspace: round(linspace(0, last - 1, n + 1)) reversed, dropping 0   (T=1000, n=4: 999 749 500 250)
    leading:  arange(n + 1) * (last // (n + 1)) reversed, dropping 0, + steps_offset  (800 600 400 200)
    trailing: round(arange(last, 0, -T / n)) - 1                                    (999 749 499 249)
    `last` is `last_timestep` (DPM-Solver's lambda_min_clipped cut) or T.
    """
    T = num_train_timesteps
    n = check_num_inference_steps(num_inference_steps, T)
    last = T if last_timestep is None else int(last_timestep)
    if spacing == "linspace":
        return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    if spacing == "leading":
        step_ratio = last // (n + 1)
        return (np.arange(0, n + 1) * step_ratio).round()[::-1][:-1].astype(np.int64) + steps_offset
    if spacing == "trailing":
        return np.arange(last, 0, -T / n).round().astype(np.int64) - 1
    raise ValueError(f"timestep_spacing={spacing!r} is not supported; use 'linspace', 'leading' or 'trailing'.")


def karras_schedule(
    sigmas: np.ndarray, num_inference_steps: int, sigma_min=None, sigma_max=None
) -> Tuple[np.ndarray, np.ndarray]:
    """(float64 Karras sigmas [n], fractional timesteps [n]) spanning the training sigmas (or the given range)."""
    log_sigmas = log_f32(sigmas)  # fp32, like diffusers
    lo = float(sigmas[0]) if sigma_min is None else float(sigma_min)
    hi = float(sigmas[-1]) if sigma_max is None else float(sigma_max)
    ks = karras_sigmas(lo, hi, num_inference_steps)
    return ks, sigma_to_t(ks, log_sigmas)


@flax.struct.dataclass
class SigmaNodes:
    """The scalars of each node of a sigma schedule (x_t = alpha_t x0 + sigma_t eps) and of each step.

    Computed on the host (`from_sigmas`), every op rounded to fp32 like diffusers' eager torch ops and
    log / exp correctly rounded like torch's. Not in the step, because XLA fuses sigma^2 + 1, turns
    1 / sqrt into rsqrt, reassociates (1/a) / (1/b), and its fp32 log / exp / expm1 are one ulp off for
    5-15% of arguments (see `common.rounded`).

    `sigma_ratio` / `alpha_ratio` / `x0_weight` give the first-order (DDIM) step from node i to i + 1,
      x_(i+1) = sigma_ratio x_i + x0_weight x0_i = alpha_ratio x_i - sigma_(i+1) (e^h - 1) eps_i,
    in float64 from the fp32 sigmas, rounded once. The noise forms take the left side, which has no
    cancellation: the right one is ~9.1 x - 8.1 eps on a sample / v model's first steps (eps ~ x), where
    one ulp of eps costs ~8 ulps of the result.
    """

    alpha_t: jax.Array  # [N + 1] f32, 1 / sqrt(sigma^2 + 1)
    sigma_t: jax.Array  # [N + 1] f32, sigma * alpha_t
    lambda_t: jax.Array  # [N + 1] f32, log(alpha_t) - log(sigma_t); +inf at sigma = 0
    phi_1: jax.Array  # [N] f32, h phi_1(hh) = e^hh - 1 of the step from node i to i + 1
    sigma_ratio: jax.Array  # [N] f32, sigma_(i+1) / sigma_i
    alpha_ratio: jax.Array  # [N] f32, alpha_(i+1) / alpha_i
    x0_weight: jax.Array  # [N] f32, alpha_(i+1) (1 - e^-h) = alpha_(i+1) - sigma_(i+1) alpha_i / sigma_i

    @classmethod
    def from_sigmas(cls, sigmas: np.ndarray, data_prediction: bool, expm1: bool) -> "SigmaNodes":
        """Nodes of the Karras `sigmas` [N + 1]. phi_1 uses h = lambda_(i+1) - lambda_i and hh = -h for data
        prediction, +h for noise; `expm1`: torch.expm1(hh) (UniPC), else torch.exp(hh) - 1 (DPM-Solver)."""
        s = np.asarray(sigmas, np.float32)
        alpha = np.float32(1.0) / np.sqrt(s * s + np.float32(1.0))
        sigma = s * alpha
        with np.errstate(invalid="ignore"):
            lam = log_f32(alpha) - log_f32(sigma)
            h = lam[1:] - lam[:-1]
        hh = -h if data_prediction else h
        phi_1 = exact_expm1(hh).astype(np.float32) if expm1 else exact_exp(hh).astype(np.float32) - np.float32(1.0)
        s64 = s.astype(np.float64)
        a64 = 1.0 / np.sqrt(s64 * s64 + 1.0)
        sg64 = s64 * a64
        ddim = (sg64[1:] / sg64[:-1], a64[1:] / a64[:-1], a64[1:] - sg64[1:] * (a64[:-1] / sg64[:-1]))
        return cls(*(jnp.asarray(v, jnp.float32) for v in (alpha, sigma, lam, phi_1) + ddim))

    @classmethod
    def empty(cls) -> "SigmaNodes":
        return cls(*(jnp.zeros((0,), jnp.float32) for _ in range(7)))

    def at(self, i) -> Tuple[jax.Array, jax.Array, jax.Array]:
        """(alpha_t, sigma_t, lambda_t) of node i (traced int or int array)."""
        return self.alpha_t[i], self.sigma_t[i], self.lambda_t[i]


class SigmaMultistepMixin:
    """What DPM-Solver and UniPC share: their state holds `sigmas` [N + 1], their `nodes`, `timesteps` [N] and
    a [solver_order, *shape] history `model_outputs`; they define `_schedule`, `_convert`, `_data_prediction`
    and `_expm1` (how diffusers computes e^hh - 1)."""

    def _validate(self) -> None:
        super()._validate()
        name = type(self).__name__
        order = self.solver_order
        if isinstance(order, bool) or not isinstance(order, (int, np.integer)) or order not in (1, 2, 3):
            raise ValueError(f"{name}: solver_order={order!r} must be 1, 2 or 3.")
        if self.final_sigmas_type not in FINAL_SIGMAS_TYPES:
            raise ValueError(
                f"{name}: final_sigmas_type={self.final_sigmas_type!r} must be one of {FINAL_SIGMAS_TYPES}."
            )

    @staticmethod
    def _empty_state(state_class, **extra):
        """A `state_class` whose arrays are empty until `set_timesteps` (which knows the sample shape)."""
        empty = jnp.zeros((0,), jnp.float32)
        return state_class(
            timesteps=jnp.zeros((0,), jnp.int32),
            sigmas=empty,
            nodes=SigmaNodes.empty(),
            model_outputs=empty,
            lower_order_nums=jnp.zeros((), jnp.int32),
            step_index=jnp.zeros((), jnp.int32),
            init_noise_sigma=jnp.ones((), jnp.float32),
            **extra,
        )

    def set_timesteps(self, state, num_inference_steps: int, shape: tuple):
        """Timesteps and sigmas for `num_inference_steps` (Python int) from the subclass's `_schedule`;
        `shape` sizes the history buffer."""
        return self._scheduled_state(state, *self._schedule(num_inference_steps), shape)

    def _scheduled_state(self, state, timesteps: np.ndarray, sigmas: np.ndarray, shape: tuple):
        return state.replace(
            timesteps=jnp.asarray(timesteps, jnp.int32),
            sigmas=jnp.asarray(sigmas),
            nodes=SigmaNodes.from_sigmas(sigmas, self._data_prediction, self._expm1),
            model_outputs=jnp.zeros((self.solver_order,) + tuple(shape), jnp.float32),
            lower_order_nums=jnp.zeros((), jnp.int32),
            step_index=jnp.zeros((), jnp.int32),
            num_inference_steps=len(timesteps),
        )

    def _start_step(self, state, model_output: jax.Array, sample: jax.Array):
        """Checks and fp32 casts; returns (x, m, x0): the sample, the converted output at the current node
        (what the solver integrates, x0 or eps) and the data prediction (from the model output itself, not
        from eps: at high noise x0 = (x - sigma eps) / alpha would turn one ulp of eps into ~1 / alpha)."""
        self._require_timesteps(state)
        if state.model_outputs.shape[1:] != model_output.shape:
            raise ValueError(
                f"{type(self).__name__}.step: model_output has shape {model_output.shape} but set_timesteps "
                f"sized the history for {state.model_outputs.shape[1:]}; pass that shape to set_timesteps."
            )
        x = sample.astype(jnp.float32)
        alpha_s, sigma_s, _ = state.nodes.at(state.step_index)
        x0, m = self._convert(model_output.astype(jnp.float32), x, alpha_s, sigma_s)
        return x, m, x0

    def add_noise(self, state, original_samples: jax.Array, noise: jax.Array, timesteps) -> jax.Array:
        """x_t = alpha_t x0 + sigma_t noise, with the sigma of the loop iteration whose timestep is `timesteps`.

        Like diffusers: a timestep equal to the current iteration's (`state.timesteps[state.step_index]`,
        e.g. right after `set_begin_index`, or the next timestep inside the loop) uses that iteration,
        which is what diffusers does once `set_begin_index` was called; any other timestep is looked up
        (the second match when it repeats, the last iteration when absent). `timesteps`: scalar or [B].
        """
        ts = state.timesteps
        n = ts.shape[0]
        t = jnp.asarray(timesteps).astype(ts.dtype)
        flat = t.reshape(-1)
        match = flat[:, None] == ts[None, :]  # [B, N]
        first = jnp.argmax(match, axis=1)
        second = jnp.argmax(match & (jnp.arange(n)[None, :] > first[:, None]), axis=1)
        count = match.sum(axis=1)
        found = jnp.where(count == 0, n - 1, jnp.where(count > 1, second, first))
        cur = jnp.minimum(state.step_index, n - 1)
        idx = jnp.where(flat == ts[cur], state.step_index, found).reshape(t.shape)
        alpha_t, sigma_t, _ = state.nodes.at(idx)
        alpha_t = broadcast_to_sample(alpha_t, original_samples)
        sigma_t = broadcast_to_sample(sigma_t, original_samples)
        x = sum_rounded(alpha_t * original_samples.astype(jnp.float32), sigma_t * noise.astype(jnp.float32))
        return x.astype(original_samples.dtype)


def push(buffer: jax.Array, value: jax.Array) -> jax.Array:
    """Shift a [K, *shape] history buffer by one and append `value` as the newest (last) entry."""
    return jnp.concatenate([buffer[1:], value[None]], axis=0)


# ----------------------------------------------------------------------------- DPM-Solver

_STAGE = "an internal stage of step(); call step(state, model_output, timestep, sample)."


@flax.struct.dataclass
class DPMSolverMultistepState(DiffusersStateNames):
    alpha_t = not_provided("nodes.alpha_t holds alpha at each iteration's sigma (not per training timestep).")
    sigma_t = not_provided("nodes.sigma_t holds sigma at each iteration's sigma (not per training timestep).")
    lambda_t = not_provided("nodes.lambda_t holds log(alpha / sigma) at each iteration's sigma.")
    prev_timestep = not_provided("the previous timestep is timesteps[step_index - 1].")
    cur_sample = not_provided("the multistep history is model_outputs (newest last) and lower_order_nums.")

    timesteps: jax.Array  # [N] int32, model timesteps in loop order
    sigmas: jax.Array  # [N + 1] f32, Karras sigma of each iteration; sigmas[N] is the final one (0 or min)
    nodes: SigmaNodes  # alpha_t / sigma_t / lambda_t [N + 1] and phi_1 [N] of those sigmas, f32
    model_outputs: jax.Array  # [solver_order, *shape] f32, converted outputs (x0 or eps), newest last
    lower_order_nums: jax.Array  # [] int32, steps taken since set_timesteps, capped at solver_order
    step_index: jax.Array  # [] int32, iteration the next `step` performs
    init_noise_sigma: jax.Array  # [] f32, 1.0
    num_inference_steps: Optional[int] = flax.struct.field(pytree_node=False, default=None)  # set by set_timesteps


@dataclasses.dataclass(frozen=True)
class FlaxDPMSolverMultistepScheduler(SigmaMultistepMixin, SchedulerMixin):
    """DPM-Solver(++) multistep, orders 1-3. The usual Stable Diffusion choice: `dpmsolver++`, order 2.

    Not implemented (raise): the SDE variants, exponential / beta / Lu-lambda / flow sigmas,
    learned variance. `algorithm_type="deis"` and UniPC's solver types map like in diffusers.
    """

    solver_order: int = 2
    prediction_type: str = "epsilon"
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    timestep_spacing: str = "linspace"
    dtype: Any = jnp.float32  # accepted like diffusers' (float32 only: see SchedulerMixin)
    euler_at_final: bool = False
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    use_lu_lambdas: bool = False
    use_flow_sigmas: bool = False
    flow_shift: float = 1.0  # (flow_shift, time_shift_type: only used with flow sigmas / dynamic shifting)
    final_sigmas_type: str = "zero"
    lambda_min_clipped: float = -float("inf")
    variance_type: Optional[str] = None
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False
    use_dynamic_shifting: bool = False
    time_shift_type: str = "exponential"

    diffusers_class = "DPMSolverMultistepScheduler"
    convert_model_output = not_provided(_STAGE)
    dpm_solver_first_order_update = not_provided(_STAGE)
    multistep_dpm_solver_second_order_update = not_provided(_STAGE)
    multistep_dpm_solver_third_order_update = not_provided(_STAGE)
    _expm1 = False  # diffusers: exp(hh) - 1
    unsupported_config = {
        "use_exponential_sigmas": (False,),
        "use_beta_sigmas": (False,),
        "use_lu_lambdas": (False,),
        "use_flow_sigmas": (False,),
        "variance_type": (None,),
        "use_dynamic_shifting": (False,),
    }

    def __post_init__(self):
        # diffusers' own aliases (its register_to_config rewrites them the same way).
        if self.algorithm_type == "deis":
            object.__setattr__(self, "algorithm_type", "dpmsolver++")
        if self.solver_type in ("logrho", "bh1", "bh2"):
            object.__setattr__(self, "solver_type", "midpoint")
        super().__post_init__()

    def _validate(self) -> None:
        super()._validate()
        name = type(self).__name__
        if self.algorithm_type not in ALGORITHM_TYPES:
            what = "(SDE) is not implemented" if self.algorithm_type in _SDE_ALGORITHMS else "is not supported"
            raise ValueError(f"{name}: algorithm_type={self.algorithm_type!r} {what}; use one of {ALGORITHM_TYPES}.")
        if self.solver_type not in SOLVER_TYPES:
            raise ValueError(f"{name}: solver_type={self.solver_type!r} is not supported; use one of {SOLVER_TYPES}.")
        if self.algorithm_type == "dpmsolver" and self.final_sigmas_type == "zero":
            raise ValueError(
                f"{name}: final_sigmas_type='zero' is not supported with algorithm_type='dpmsolver' (the noise "
                "form divides by the final sigma); use final_sigmas_type='sigma_min' or algorithm_type='dpmsolver++'."
            )

    # -- schedule --------------------------------------------------------------------------------
    def create_state(self, common: Optional[CommonSchedulerState] = None) -> DPMSolverMultistepState:
        self._check_common(common)
        return self._empty_state(DPMSolverMultistepState)

    @cached_schedule
    def _schedule(self, num_inference_steps: int) -> Tuple[np.ndarray, np.ndarray]:
        """(int timesteps [N], fp32 sigmas [N + 1]) as diffusers' set_timesteps computes them, with correctly
        rounded log / pow (see `common.exact_log`)."""
        T = self.num_train_timesteps
        ac = sigma_alphas_cumprod(self)
        # lambda_min_clipped cuts the noisiest timesteps whose log-SNR falls below it.
        alpha, sigma = np.sqrt(ac), np.sqrt(np.float32(1.0) - ac)
        lambdas = log_f32(alpha) - log_f32(sigma)
        clipped_idx = int(np.searchsorted(lambdas[::-1], self.lambda_min_clipped))
        timesteps = multistep_timesteps(
            T, num_inference_steps, self.timestep_spacing, self.steps_offset, last_timestep=T - clipped_idx
        )
        sigmas = train_sigmas(ac)
        if self.use_karras_sigmas:
            sig, t = karras_schedule(sigmas, num_inference_steps)
            # diffusers keeps fractional timesteps for the cosine schedule and truncates them to int.
            timesteps = (t if self.beta_schedule == "squaredcos_cap_v2" else t.round()).astype(np.int64)
        else:
            sig = np.interp(timesteps, np.arange(0, len(sigmas)), sigmas)
        last = sigmas[0] if self.final_sigmas_type == "sigma_min" else 0.0
        return timesteps, np.concatenate([sig, [last]]).astype(np.float32)

    custom_schedule_fields = ("timesteps", "sigmas", "nodes")

    def set_timesteps(self, state, num_inference_steps: Optional[int] = None, shape: tuple = (),
                      timesteps: Optional[Sequence[int]] = None):
        """Timesteps and sigmas for `num_inference_steps`, or diffusers' custom integer `timesteps` (sigmas
        interpolated from the training ones); `shape` sizes the history buffer."""
        if num_inference_steps is None and timesteps is None:
            raise ValueError("Must pass exactly one of `num_inference_steps` or `timesteps`.")
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("Can only pass one of `num_inference_steps` or `custom_timesteps`.")
        if timesteps is None:
            return super().set_timesteps(state, num_inference_steps, shape)
        if self.use_karras_sigmas:
            raise ValueError("Cannot use `timesteps` with `config.use_karras_sigmas = True`")
        ts = np.asarray(timesteps).astype(np.int64).ravel()
        sigmas = train_sigmas(sigma_alphas_cumprod(self))
        last = sigmas[0] if self.final_sigmas_type == "sigma_min" else 0.0
        sig = np.concatenate([np.interp(ts, np.arange(0, len(sigmas)), sigmas), [last]]).astype(np.float32)
        return self._scheduled_state(state, ts, sig, shape)

    # -- one step --------------------------------------------------------------------------------
    @property
    def _data_prediction(self) -> bool:
        return self.algorithm_type == "dpmsolver++"

    def _convert(self, model_output, sample, alpha_s, sigma_s):
        """(x0, what the solver integrates: x0 for dpmsolver++, eps for dpmsolver), thresholded if configured."""
        x0, eps = to_x0_eps(model_output, sample, alpha_s, sigma_s, self.prediction_type)
        if self._data_prediction:
            x0 = clip_or_threshold(x0, self)
            return x0, x0
        if self.thresholding:  # threshold the x0 that eps implies, then convert back
            x0 = clip_or_threshold(to_x0_eps(eps, sample, alpha_s, sigma_s, "epsilon")[0], self)
            eps = to_x0_eps(x0, sample, alpha_s, sigma_s, "sample")[1]
        return x0, eps

    def _update(self, order: int, nodes: SigmaNodes, i, buf, x, x0):
        """x at node i -> node i + 1 with the static `order`, from the newest `order` outputs of `buf` (and the
        data prediction x0 at node i, which the noise form's first-order term uses)."""
        alpha_t, sigma_t, lambda_t = nodes.at(i + 1)
        alpha_s0, sigma_s0, lambda_s0 = nodes.at(i)
        h = lambda_t - lambda_s0
        # Both algorithms in one form: ++ integrates x0 over -lambda, the other eps over lambda.
        hh, scale = (-h, alpha_t) if self._data_prediction else (h, sigma_t)
        phi_1 = nodes.phi_1[i]  # h phi_1(hh) = e^hh - 1
        m0 = buf[-1]
        # Each term rounded before it is summed, like diffusers. First order: the DDIM step, which the noise
        # form writes through x0 (alpha_t / alpha_s0 x - sigma_t phi_1 eps cancels; see `SigmaNodes`).
        if self._data_prediction:
            terms = [(sigma_t / sigma_s0) * x, -(scale * phi_1) * m0]
        else:
            terms = [nodes.sigma_ratio[i] * x, nodes.x0_weight[i] * x0]
        if order > 1:
            lambda_s = [lambda_s0] + [nodes.lambda_t[i - k] for k in range(1, order)]
            r0 = rounded((lambda_s[0] - lambda_s[1]) / h)  # (XLA would rewrite 1 / (a / h) as h / a)
            d0 = rounded(rounded(1.0 / r0) * (m0 - buf[-2]))  # divided difference ~ h dD/dlambda
            phi_2 = phi_1 / hh - 1.0
        if order == 2:
            terms.append(-0.5 * (scale * phi_1) * d0 if self.solver_type == "midpoint" else -(scale * phi_2) * d0)
        if order == 3:
            r1 = rounded((lambda_s[1] - lambda_s[2]) / h)
            d1 = rounded(rounded(1.0 / r1) * (buf[-2] - buf[-3]))
            D1 = sum_rounded(d0, (r0 / (r0 + r1)) * (d0 - d1))
            D2 = (1.0 / (r0 + r1)) * (d0 - d1)
            phi_3 = (phi_1 - hh) / hh**2 - 0.5
            terms += [-(scale * phi_2) * D1, -(scale * phi_3) * D2]
        return sum_rounded(*terms)

    def step(
        self,
        state: DPMSolverMultistepState,
        model_output: jax.Array,
        timestep,
        sample: jax.Array,
        return_dict: bool = True,
        *,
        key: Optional[jax.Array] = None,
    ) -> SchedulerOutput:
        """One multistep update at iteration `state.step_index` (`timestep` is read from the state)."""
        x, m, x0 = self._start_step(state, model_output, sample)
        n, i = state.num_inference_steps, state.step_index
        buf = push(state.model_outputs, m)

        small = self.lower_order_final and n < 15
        # A zero-length last step (Karras + sigma_min repeat the smallest sigma) is first order too; diffusers
        # divides by h = 0 there.
        zero_length = state.sigmas[n] == state.sigmas[n - 1]
        force_first = (i == n - 1) & (self.euler_at_final or small or self.final_sigmas_type == "zero" or zero_length)
        force_second = (i == n - 2) & small
        # diffusers' choice: first order during warm-up / when forced, then second, then third.
        lon = state.lower_order_nums
        order = jnp.where(force_first | (lon < 1), 1, jnp.where(force_second | (lon < 2), 2, 3))
        order = jnp.minimum(order, self.solver_order)
        branches = [functools.partial(self._update, k) for k in range(1, self.solver_order + 1)]
        prev = jax.lax.switch(order - 1, branches, state.nodes, i, buf, x, x0)

        new_state = state.replace(
            model_outputs=buf,
            lower_order_nums=jnp.minimum(state.lower_order_nums + 1, self.solver_order),
            step_index=i + 1,
        )
        return step_result(return_dict, prev_sample=prev.astype(sample.dtype), state=new_state, pred_original_sample=x0)
