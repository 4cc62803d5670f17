"""UniPC (Zhao et al. 2023): unified predictor-corrector multistep, step for step like diffusers'
UniPCMultistepScheduler (B(h) variants bh1 / bh2, data or noise prediction, without `solver_p`).

Notation as in `dpm_solver`: sigma -> (alpha_t, sigma_t, lambda_t), h = lambda_t - lambda_s0,
hh = -h for data prediction (x0, "predict_x0") and +h for noise prediction; B(h) = hh (bh1) or
e^hh - 1 (bh2); c = alpha_t (x0 form) or sigma_t (noise form). With m_0 the newest converted output
(x0 or eps) and D_j = (m_j - m_0) / r_j, r_j = (lambda_sj - lambda_s0) / h, both halves of a step are
  x_t = F - c B(h) sum_j rho_j D_j,   F = (sigma_t / sigma_s0) x_s - alpha_t (e^hh - 1) m_0   (x0 form)
                                      F = (alpha_t / alpha_s0) x_s - sigma_t (e^hh - 1) m_0   (noise form)
with F the first-order (DDIM) step and rho solving R rho = b, R_kj = r_j^(k-1), b_k = k! phi_(k+1)(hh) / B(h)
(eq. 8 / Alg. 2-3 of the paper):
  UniP-p (predictor, order p):   D_1..D_(p-1) from the p newest outputs; rho = 1/2 for p = 2.
  UniC-p (corrector, order p):   re-does the previous step once the model has been evaluated at its
                                 result: that step's F (kept in the state) minus the B(h) term with
                                 D_t = m_t - m_0 added (rho = 1/2 for p = 1).
Every step first corrects the incoming sample (except the first, and steps listed in
`disable_corrector`), then predicts the next. The orders are traced ints dispatched with `lax.switch`
to static-order branches, so `step` runs inside one `fori_loop`.

Numerics of the noise form. eps comes from the incoming sample x (eps = (x - alpha_s0 x0) / sigma_s0 for a
sample model), the predictor starts from the corrected one. On the first steps of a sample / v model
eps ~ x and F is ~9.1 x - 8.1 eps: an ulp of eps, or of the corrected sample rounded to fp32, costs ~8
ulps, compounding over the steps (1.7e-4 off diffusers' formula in float64 after 5 steps, as diffusers'
fp32 is). We evaluate the same update without the cancellation: the corrector yields the correction
delta = x_corrected - x = (F_prev - x) - c B(h) (...), never rounded into a corrected sample, and
  F = (alpha_t / alpha_s0) delta + (sigma_t / sigma_s0) x + alpha_t (1 - e^-h) x0
with x0 the model's own data prediction and the coefficients from `SigmaNodes` (float64, rounded once).
The x0 form stays diffusers' expression term by term (it has no cancellation).

Deliberate differences from diffusers 0.42, only where diffusers returns NaN/inf:
* bh1 with final sigma 0: the last (first-order) step is x0 exactly; diffusers computes -inf * 0.
* `lower_order_final=False` with final sigma 0, or a zero-length last step (Karras with
  `final_sigmas_type="sigma_min"` repeats the smallest sigma): the last step is first order, like
  DPM-Solver does for sigma 0; diffusers divides by r = 0 / h = 0.
`predict_x0=False` with `final_sigmas_type="zero"` raises (the noise form divides by the final sigma).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from flax_inpaint.schedulers.common import (
    CommonSchedulerState,
    DiffusersStateNames,
    SchedulerMixin,
    SchedulerOutput,
    cached_schedule,
    clip_or_threshold,
    div_exact,
    rounded,
    sigma_alphas_cumprod,
    step_result,
    sum_rounded,
    to_x0_eps,
    train_sigmas,
)

from flax_inpaint.schedulers.dpm_solver import (
    SigmaMultistepMixin,
    SigmaNodes,
    karras_schedule,
    multistep_timesteps,
    push,
)

SOLVER_TYPES = ("bh1", "bh2")


def _weighted_sum(weights: jax.Array, terms) -> jax.Array:
    """sum_j weights[j] * terms[j] like diffusers' `einsum` on CPU: the first product rounded, then one
    fused multiply-add per further term (XLA contracts `acc + w * t`; see `rounded`)."""
    return functools.reduce(lambda acc, j: acc + weights[j] * terms[j], range(1, len(terms)),
                            rounded(weights[0] * terms[0]))


@flax.struct.dataclass
class UniPCMultistepState(DiffusersStateNames):
    timesteps: jax.Array  # [N] int32, model timesteps in loop order
    sigmas: jax.Array  # [N + 1] f32, Karras sigma of each iteration; sigmas[N] is the final one (0 or min)
    nodes: SigmaNodes  # alpha_t / sigma_t / lambda_t [N + 1] and phi_1 [N] of those sigmas, f32
    model_outputs: jax.Array  # [solver_order, *shape] f32, converted outputs (x0 or eps), newest last
    first_order: jax.Array  # [*shape] f32, the first-order (DDIM) part of the previous prediction (for UniC)
    this_order: jax.Array  # [] int32, order of the previous predictor (= order of the next corrector)
    lower_order_nums: jax.Array  # [] int32, steps taken since set_timesteps, capped at solver_order
    step_index: jax.Array  # [] int32, iteration the next `step` performs
    init_noise_sigma: jax.Array  # [] f32, 1.0
    num_inference_steps: Optional[int] = flax.struct.field(pytree_node=False, default=None)  # set by set_timesteps


@dataclasses.dataclass(frozen=True)
class FlaxUniPCMultistepScheduler(SigmaMultistepMixin, SchedulerMixin):
    """UniPC multistep (bh2 + x0 prediction by default; `solver_order` 2 for guided sampling).

    Not implemented (raise): `solver_p`, exponential / beta / flow sigmas, `shift_terminal`, dynamic shifting.
    DPM-Solver's solver types map to bh2 like in diffusers.
    """

    solver_order: int = 2
    prediction_type: str = "epsilon"
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    predict_x0: bool = True
    solver_type: str = "bh2"
    lower_order_final: bool = True
    disable_corrector: Tuple[int, ...] = ()
    solver_p: None = None
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    use_flow_sigmas: bool = False
    flow_shift: float = 1.0  # (flow_shift, time_shift_type: only used with flow sigmas / dynamic shifting)
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    final_sigmas_type: str = "zero"
    rescale_betas_zero_snr: bool = False
    use_dynamic_shifting: bool = False
    time_shift_type: str = "exponential"
    sigma_min: Optional[float] = None
    sigma_max: Optional[float] = None
    shift_terminal: Optional[float] = None
    dtype: Any = jnp.float32

    diffusers_class = "UniPCMultistepScheduler"
    _expm1 = True  # diffusers: expm1(hh)
    unsupported_config = {
        "solver_p": (None,),
        "use_exponential_sigmas": (False,),
        "use_beta_sigmas": (False,),
        "use_flow_sigmas": (False,),
        "use_dynamic_shifting": (False,),
        "shift_terminal": (None,),
    }

    def __post_init__(self):
        if self.solver_type in ("midpoint", "heun", "logrho"):  # diffusers' alias
            object.__setattr__(self, "solver_type", "bh2")
        if self.disable_corrector is None:
            object.__setattr__(self, "disable_corrector", ())
        super().__post_init__()  # lists -> tuples
        object.__setattr__(self, "disable_corrector", tuple(int(i) for i in self.disable_corrector))

    def _validate(self) -> None:
        super()._validate()
        name = type(self).__name__
        if self.solver_type not in SOLVER_TYPES:
            raise ValueError(f"{name}: solver_type={self.solver_type!r} is not supported; use one of {SOLVER_TYPES}.")
        if not self.predict_x0 and self.final_sigmas_type == "zero":
            raise ValueError(
                f"{name}: predict_x0=False needs final_sigmas_type='sigma_min' (the noise form divides by the final "
                "sigma, 0 here; diffusers returns NaN)."
            )
        if any(not float(i).is_integer() or i < 0 for i in self.disable_corrector):
            raise ValueError(f"{name}: disable_corrector={self.disable_corrector!r} must list step indices >= 0.")

    # -- schedule --------------------------------------------------------------------------------
    def create_state(self, common: Optional[CommonSchedulerState] = None) -> UniPCMultistepState:
        self._check_common(common)
        return self._empty_state(
            UniPCMultistepState, first_order=jnp.zeros((0,), jnp.float32), this_order=jnp.zeros((), jnp.int32)
        )

    @cached_schedule
    def _schedule(self, num_inference_steps: int) -> Tuple[np.ndarray, np.ndarray]:
        """(int timesteps [N], fp32 sigmas [N + 1]) as diffusers' set_timesteps computes them, with correctly
        rounded log / pow (see `common.exact_log`)."""
        timesteps = multistep_timesteps(
            self.num_train_timesteps, num_inference_steps, self.timestep_spacing, self.steps_offset
        )
        sigmas = train_sigmas(sigma_alphas_cumprod(self))
        if self.use_karras_sigmas:
            sig, t = karras_schedule(sigmas, num_inference_steps, self.sigma_min, self.sigma_max)
            timesteps = t.round().astype(np.int64)
            last = sig[-1]  # unlike DPM-Solver: the smallest Karras sigma
        else:
            sig = np.interp(timesteps, np.arange(0, len(sigmas)), sigmas)
            last = sigmas[0]
        last = last if self.final_sigmas_type == "sigma_min" else 0.0
        return timesteps, np.concatenate([sig, [last]]).astype(np.float32)

    def set_timesteps(self, state: UniPCMultistepState, num_inference_steps: int, shape: tuple):
        """Like DPM-Solver's, plus UniPC's corrector buffers: `shape` also sizes `first_order`."""
        state = super().set_timesteps(state, num_inference_steps, shape)
        return state.replace(first_order=jnp.zeros(tuple(shape), jnp.float32), this_order=jnp.zeros((), jnp.int32))

    # -- the B(h) term shared by UniP and UniC --------------------------------------------------
    def _bh_term(self, order: int, nodes: SigmaNodes, s0, t, buf, model_t=None):
        """c B(h) sum_j rho_j D_j: what a B(h) update of order `order` (static) from node s0 to node t adds
        to the first-order step (subtracted), from the newest `order` outputs of `buf`; c = alpha_t (x0 form)
        or sigma_t (noise form).

        UniP (model_t None): rho from the (order - 1)-square system (1/2 for order 2); order >= 2.
        UniC (model_t = the converted output at t): rho from the order-square system (1/2 for order 1),
        its last entry weighting m_t - m_0.
        """
        alpha_t, sigma_t, lambda_t = nodes.at(t)
        lambda_s0 = nodes.lambda_t[s0]
        h = lambda_t - lambda_s0
        m0 = buf[-1]
        r, D = [], []  # r_j = (lambda_sj - lambda_s0) / h,  D_j = (m_j - m_0) / r_j
        for j in range(1, order):
            r.append((nodes.lambda_t[s0 - j] - lambda_s0) / h)
            D.append(div_exact(buf[-1 - j] - m0, r[-1]))
        r = jnp.stack(r + [jnp.ones((), jnp.float32)])

        hh = -h if self.predict_x0 else h
        h_phi_1 = nodes.phi_1[s0]  # h phi_1(hh) = e^hh - 1 (t = s0 + 1)
        B_h = hh if self.solver_type == "bh1" else h_phi_1
        phi, b = h_phi_1 / hh - 1.0, []  # h phi_2(hh), then h phi_(k+1)(hh) / (...) recursively
        for k in range(1, order + 1):
            b.append(phi * math.factorial(k) / B_h)
            phi = phi / hh - 1.0 / math.factorial(k + 1)
        b = jnp.stack(b)
        R = jnp.stack([r**p for p in range(order)])

        # Every product rounded before it is summed, like diffusers (see `rounded`).
        scale = (alpha_t if self.predict_x0 else sigma_t) * B_h
        if model_t is None:  # UniP
            rho = jnp.full((1,), 0.5, jnp.float32) if order == 2 else jnp.linalg.solve(R[:-1, :-1], b[:-1])
            return scale * _weighted_sum(rho, D)
        rho = jnp.full((1,), 0.5, jnp.float32) if order == 1 else jnp.linalg.solve(R, b)
        res = rho[-1] * (model_t - m0)
        if order > 1:
            res = sum_rounded(_weighted_sum(rho[:-1], D), res)
        return scale * res

    @property
    def _data_prediction(self) -> bool:
        return self.predict_x0

    def _convert(self, model_output, sample, alpha_s, sigma_s):
        """(x0, what UniPC integrates: x0 (predict_x0, clipped / thresholded if configured) or eps)."""
        x0, eps = to_x0_eps(model_output, sample, alpha_s, sigma_s, self.prediction_type)
        if self.predict_x0:
            x0 = clip_or_threshold(x0, self)
            return x0, x0
        return x0, eps

    # -- one step --------------------------------------------------------------------------------
    def step(
        self,
        state: UniPCMultistepState,
        model_output: jax.Array,
        timestep,
        sample: jax.Array,
        return_dict: bool = True,
        *,
        key: Optional[jax.Array] = None,
    ) -> SchedulerOutput:
        """Correct `sample` with UniC (after the first step), then predict the next sample with UniP."""
        x, m, x0 = self._start_step(state, model_output, sample)
        n, i, nodes = state.num_inference_steps, state.step_index, state.nodes
        zeros = functools.partial(jnp.zeros_like, x)

        # UniC: redo the previous step (node i - 1 -> i) now that m at i is known: its first-order part,
        # kept from that step, minus the B(h) term with m_i. The noise form keeps the correction
        # delta = x_corrected - x instead of the corrected sample (see the module docstring).
        use_corrector = state.lower_order_nums > 0
        if self.disable_corrector:
            use_corrector &= ~jnp.isin(i - 1, jnp.asarray(self.disable_corrector, jnp.int32))
        corrections = [
            functools.partial(self._bh_term, k, nodes, i - 1, i, state.model_outputs, model_t=m)
            for k in range(1, self.solver_order + 1)
        ]
        term = jax.lax.switch(jnp.where(use_corrector, state.this_order, 0), [zeros] + corrections)

        # UniP from the (corrected) sample at i to i + 1: first order (DDIM), minus the B(h) term.
        buf = push(state.model_outputs, m)
        if self.predict_x0:
            alpha_t, sigma_t, _ = nodes.at(i + 1)
            sigma_s0 = nodes.sigma_t[i]
            x = jnp.where(use_corrector, sum_rounded(state.first_order, -term), x)
            first_order = sum_rounded((sigma_t / sigma_s0) * x, -(alpha_t * nodes.phi_1[i]) * m)
        else:
            delta = jnp.where(use_corrector, (state.first_order - x) - term, 0.0)
            first_order = nodes.alpha_ratio[i] * delta + nodes.sigma_ratio[i] * x + nodes.x0_weight[i] * x0
        limit = jnp.minimum(self.solver_order, n - i) if self.lower_order_final else self.solver_order
        # Final sigma 0 or a zero-length last step: first order (see the module docstring).
        sigma_end, sigma_last = state.sigmas[n], state.sigmas[n - 1]
        limit = jnp.where((i == n - 1) & ((sigma_end == 0) | (sigma_end == sigma_last)), 1, limit)
        this_order = jnp.minimum(limit, state.lower_order_nums + 1).astype(jnp.int32)
        predictions = [
            functools.partial(self._bh_term, k, nodes, i, i + 1, buf) for k in range(2, self.solver_order + 1)
        ]
        term = jax.lax.switch(this_order - 1, [zeros] + predictions)
        prev = sum_rounded(first_order, -term)

        new_state = state.replace(
            model_outputs=buf,
            first_order=first_order,
            this_order=this_order,
            lower_order_nums=jnp.minimum(state.lower_order_nums + 1, self.solver_order),
            step_index=i + 1,
        )
        return step_result(return_dict, prev_sample=prev.astype(sample.dtype), state=new_state, pred_original_sample=x0)
