"""What every scheduler shares: the config mixin, the noise schedule, timestep spacing, x0/eps conversion.

Contract (the pipeline's sampling loop relies on it):

* A scheduler *instance* is a frozen dataclass of its diffusers config fields: immutable and hashable,
  so it can be a static argument of `jax.jit`. All array data lives in a separate *state* pytree.
* `state = sched.create_state()`; `state = sched.set_timesteps(state, num_inference_steps, shape)` is
  Python-static in both arguments (the shape sizes the fixed history buffers of multistep solvers).
* Every state is a `flax.struct` dataclass whose float fields are fp32 and which holds at least
    timesteps:        [num_iterations] the model-evaluation timesteps in loop order,
    step_index:       int32 scalar, the loop iteration the next `step` performs,
    init_noise_sigma: fp32 scalar, the std of the initial noise.
* `step(state, model_output, t, sample, key=None, ...)` reads everything it needs from `state.step_index`
  (never searches the timesteps), so the loop below runs inside one `jax.lax.fori_loop` under `jit`:

      def body(i, carry):
          x, state = carry
          t = state.timesteps[i]
          eps = model(sched.scale_model_input(state, x, t), t)
          out = sched.step(state, eps, t, x, key=jax.random.fold_in(key, i))
          return out.prev_sample, out.state

      x, state = jax.lax.fori_loop(begin_index, len(state.timesteps), body, (x, state))

* Strength (img2img / inpaint): `state = sched.set_begin_index(state, begin_index)` with
  `begin_index = begin_index_for_strength(num_inference_steps, strength, sched.order)`; the loop then
  runs iterations `begin_index .. len(state.timesteps) - 1`, like diffusers' `get_timesteps`.
* `step` computes in fp32 whatever the dtype of `model_output` / `sample` (bf16 alphas round to 1) and
  returns `prev_sample` in the dtype of `sample`.
"""
from __future__ import annotations

import dataclasses
import decimal
import enum
import functools
import math
import os
from pathlib import Path
from typing import Any, ClassVar, Mapping, Optional, Tuple, Union



import flax
import jax
import jax.numpy as jnp
import numpy as np

from flax_inpaint.diffusers_compat import PUSH_TO_HUB, BaseOutput, ConfigMixin, FrozenConfig, not_provided

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
SCHEDULER_CONFIG_NAME = "scheduler_config.json"

# Keys of a diffusers config that describe the file, not the scheduler.
_META_KEYS = frozenset({"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values"})


@flax.struct.dataclass
class SchedulerOutput(BaseOutput):
    """Result of `step`: the next sample, the advanced state, and (where computed) the x0 estimate.
    diffusers' FlaxSchedulerOutput and every Flax<Name>SchedulerOutput are this class."""

    prev_sample: jax.Array
    state: Any
    pred_original_sample: Optional[jax.Array] = None


def step_result(return_dict: bool, prev_sample: jax.Array, state: Any,
                pred_original_sample: Optional[jax.Array] = None):
    """What `step` returns: a SchedulerOutput, or diffusers' `(prev_sample, state)` with return_dict=False."""
    if not return_dict:
        return prev_sample, state
    return SchedulerOutput(prev_sample=prev_sample, state=state, pred_original_sample=pred_original_sample)


class DiffusersStateNames:
    """Names of diffusers' Flax scheduler states that ours lay out otherwise (one fixed-shape state per
    scheduler, read by `step` through `step_index`), each saying what to use."""

    common = not_provided("a state holds the arrays its scheduler needs (e.g. alphas_cumprod) itself; "
                          "CommonSchedulerState.create(scheduler) gives diffusers' alphas, betas, alphas_cumprod.")
    create = not_provided("build a state with scheduler.create_state(), then scheduler.set_timesteps(state, n, shape).")

    
# ----------------------------------------------------------------------------- config mixin

@dataclasses.dataclass(frozen=True)
class SchedulerMixin(ConfigMixin):
    """Config handling for frozen-dataclass schedulers, and the noise-schedule fields they all start with.

    Every diffusers scheduler config begins with the five fields below, in this order and with these
    defaults. Subclasses are `@dataclasses.dataclass(frozen=True)` that add, after them, the other
    diffusers config keys they implement (in diffusers' order, with diffusers' defaults) and set:
      diffusers_class: the diffusers class name written as `_class_name` by `save_pretrained`.
      order: 1, or 2 for solvers that evaluate the model twice per step (diffusers' `order`).
      unsupported_config: {key: accepted values} for diffusers options of this scheduler that change the
        algorithm but are not implemented; any other value raises instead of being silently ignored.
      timestep_spacings / prediction_types: the values this scheduler accepts (diffusers' subsets).
    Subclasses extend `_validate` (call `super()._validate()`) for their own options.
    """

    diffusers_class: ClassVar[str] = ""
    config_name: ClassVar[str] = SCHEDULER_CONFIG_NAME
    ignore_for_config: ClassVar[Tuple[str, ...]] = ("dtype",)
    has_compatibles: ClassVar[bool] = True
    push_to_hub = not_provided(PUSH_TO_HUB)
    order: ClassVar[int] = 1
    unsupported_config: ClassVar[Mapping[str, Tuple[Any, ...]]] = {}
    timestep_spacings: ClassVar[Tuple[str, ...]] = TIMESTEP_SPACINGS
    prediction_types: ClassVar[Tuple[str, ...]] = PREDICTION_TYPES

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: Optional[Tuple[float, ...]] = None

    def __post_init__(self):
        # Lists in configs (trained_betas) become tuples so the instance stays hashable.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (list, np.ndarray)):
                object.__setattr__(self, f.name, tuple(np.asarray(value).ravel().tolist()))
        self._validate()

    # -- validation -----------------------------------------------------------------------------
    def _validate(self) -> None:
        name = type(self).__name__

        def check(key: str, allowed: Tuple[Any, ...]):
            if hasattr(self, key) and getattr(self, key) not in allowed:
                raise ValueError(
                    f"{name}: {key}={getattr(self, key)!r} is not supported; "
                    f"use one of {', '.join(repr(a) for a in allowed)}."
                )

        if getattr(self, "dtype", jnp.float32) != jnp.float32:
            raise ValueError(f"{name}: dtype={self.dtype!r} is not supported; schedules and states are float32 "
                             "here (in bfloat16 alphas_cumprod near 1 rounds to 1). Drop dtype.")
        check("beta_schedule", BETA_SCHEDULES)
        check("prediction_type", self.prediction_types)
        check("timestep_spacing", self.timestep_spacings)
        n = self.num_train_timesteps
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
            raise ValueError(f"{name}: num_train_timesteps={n!r} must be a positive integer.")
        offset = getattr(self, "steps_offset", 0)
        if not isinstance(offset, (int, np.integer)) or isinstance(offset, bool) or offset < 0:
            raise ValueError(f"{name}: steps_offset={offset!r} must be a non-negative integer.")
        betas = self.trained_betas
        if betas is not None:
            if len(betas) != n:
                raise ValueError(
                    f"{name}: trained_betas has {len(betas)} values but num_train_timesteps={n}."
                )
            if not all(0.0 <= b < 1.0 for b in betas):
                raise ValueError(f"{name}: trained_betas must all lie in [0, 1).")
        elif not (0.0 <= self.beta_start < 1.0 and 0.0 <= self.beta_end < 1.0):
            raise ValueError(
                f"{name}: beta_start={self.beta_start!r} and beta_end={self.beta_end!r} must lie in [0, 1)."
            )
        if getattr(self, "clip_sample_range", 1.0) <= 0:
            raise ValueError(f"{name}: clip_sample_range={self.clip_sample_range!r} must be > 0.")
        if hasattr(self, "dynamic_thresholding_ratio") and not 0.0 < self.dynamic_thresholding_ratio <= 1.0:
            raise ValueError(
                f"{name}: dynamic_thresholding_ratio={self.dynamic_thresholding_ratio!r} must lie in (0, 1]."
            )
        for key, accepted in self.unsupported_config.items():
            if getattr(self, key, accepted[0]) not in accepted:
                raise ValueError(
                    f"{name}: {key}={getattr(self, key)!r} is not implemented; supported: {accepted}."
                )

    # -- config I/O -----------------------------------------------------------------------------
    @classmethod
    def config_fields(cls) -> Tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.name not in cls.ignore_for_config)

    @property
    def config(self) -> FrozenConfig:
        """This scheduler's config as a diffusers-style dict (tuples written as lists)."""
        out = {}
        for k in self.config_fields():
            v = getattr(self, k)
            out[k] = list(v) if isinstance(v, tuple) else v
        return FrozenConfig(out)

    @property
    def _config_class_name(self) -> str:
        return self.diffusers_class or type(self).__name__.replace("Flax", "")

    @classmethod
    def from_config(cls, config: Optional[Mapping[str, Any]] = None, return_unused_kwargs: bool = False,
                    **kwargs):
        """Build from a diffusers scheduler config dict (of this or any other scheduler class).

        Keys this scheduler does not have (other schedulers' options, `_class_name`, ...) are ignored,
        like diffusers' `from_config` does when swapping schedulers; keyword arguments that are this
        scheduler's config keys (or `dtype`) win over `config`. Other keyword arguments raise, or come back
        with `return_unused_kwargs=True` as (scheduler, unused). Values are validated: a bad value raises
        ValueError naming the key.
        """
        if not isinstance(config, Mapping):
            why = " (load_config(path) reads one)" if "pretrained_model_name_or_path" in kwargs else ""
            raise TypeError(f"{cls.__name__}.from_config expects a dict{why}, got {type(config).__name__}.")
        names = {f.name for f in dataclasses.fields(cls)}
        overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
        if kwargs and not return_unused_kwargs:
            raise TypeError(f"{cls.__name__} has no config fields {sorted(kwargs)}; it has {sorted(names)}.")
        fields = set(cls.config_fields())
        # Like diffusers: keys the source scheduler merely defaulted (listed in an in-memory config's
        # `_use_default_values`) take *this* scheduler's defaults, e.g. Euler's "linspace" spacing
        # does not become DDIM's.
        defaulted = set(config.get("_use_default_values", ()))
        merged = {k: v for k, v in config.items() if k not in defaulted and k in fields and k not in _META_KEYS}
        # diffusers writes null for unset optional values whose default is not None (rare); keep ours.
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        merged = {k: v for k, v in merged.items() if v is not None or defaults.get(k) is None}
        scheduler = cls(**{**merged, **overrides})
        return (scheduler, kwargs) if return_unused_kwargs else scheduler

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike, None] = None,
                        subfolder: Optional[str] = None, return_unused_kwargs: bool = False, **kwargs):
        """`(scheduler, state)` from the `scheduler_config.json` of a folder, its `subfolder` (e.g. a
        pipeline folder with subfolder="scheduler"), or a hub repo, as diffusers' Flax schedulers load.

        Keyword arguments: the hub options of `load_config` (cache_dir, token, revision,
        local_files_only, ...) and config overrides; with `return_unused_kwargs=True` the others come
        back as a third value instead of raising.
        """
        if pretrained_model_name_or_path is None:
            raise TypeError(f"{cls.__name__}.from_pretrained needs a folder or hub repo id (with subfolder='scheduler' "
                            "for a pipeline's).")
        hub_keys = ("cache_dir", "force_download", "proxies", "token", "local_files_only", "revision")
        hub = {k: kwargs.pop(k) for k in hub_keys if k in kwargs}
        config = cls.load_config(pretrained_model_name_or_path, subfolder=subfolder, **hub)
        scheduler, unused = cls.from_config(config, return_unused_kwargs=True, **kwargs)
        if unused and not return_unused_kwargs:
            raise TypeError(f"{cls.__name__}.from_pretrained got unexpected keyword arguments {sorted(unused)}.")
        state = scheduler.create_state()
        return (scheduler, state, unused) if return_unused_kwargs else (scheduler, state)

    def save_pretrained(self, save_directory: Union[str, os.PathLike], push_to_hub: bool = False, **kwargs) -> Path:
        """Write `scheduler_config.json` (loadable by diffusers' `from_pretrained`); returns its path."""
        self.save_config(save_directory, push_to_hub, **kwargs)
        return Path(save_directory) / SCHEDULER_CONFIG_NAME

    # -- diffusers' scheduler API ----------------------------------------------------------------
    @property
    def has_state(self) -> bool:
        """Always True: every scheduler here keeps its arrays in a state (`create_state`)."""
        return True

    @property
    def compatibles(self) -> list:
        """The scheduler classes that take this one's config (all of ours: `from_config` ignores the keys
        a class does not have)."""
        from flax_inpaint import schedulers

        return [getattr(schedulers, n) for n in schedulers.__all__ if n.endswith("Scheduler")]

    def __len__(self) -> int:
        return self.num_train_timesteps

    def _check_common(self, common) -> None:
        """`create_state(common)`: diffusers shares one CommonSchedulerState; ours build their own, so a
        given one must hold this scheduler's schedule."""
        if common is not None and not np.array_equal(np.asarray(common.alphas_cumprod), make_alphas_cumprod(self)):
            raise ValueError(f"{type(self).__name__}.create_state(common): common holds another noise schedule; "
                             "build the scheduler with it instead (e.g. trained_betas=common.betas).")

    def get_velocity(self, state, sample: jax.Array, noise: jax.Array, timesteps) -> jax.Array:
        """The v-prediction target sqrt(abar_t) * noise - sqrt(1 - abar_t) * sample (variance-preserving
        schedulers, as diffusers' DDPM / DDIM)."""
        if not hasattr(state, "alphas_cumprod"):
            raise TypeError(f"{type(self).__name__}.get_velocity: this state has no alphas_cumprod; use "
                            "FlaxDDPMScheduler's or FlaxDDIMScheduler's (the training target needs no sampler).")
        return get_velocity_common(state, sample, noise, timesteps)

    # -- shared step set-up ----------------------------------------------------------------------
    def _require_timesteps(self, state) -> None:
        if not state.num_inference_steps:
            raise ValueError(
                f"{type(self).__name__}: call set_timesteps(state, num_inference_steps, shape) before step."
            )

    def _fp32_step_inputs(self, state, model_output: jax.Array, sample: jax.Array) -> Tuple[jax.Array, jax.Array]:
        """Check that `set_timesteps` ran; (model_output, sample) in fp32, the dtype every `step` computes in."""
        self._require_timesteps(state)
        return model_output.astype(jnp.float32), sample.astype(jnp.float32)

    # -- shared state operations -----------------------------------------------------------------
    def add_noise(self, state, original_samples: jax.Array, noise: jax.Array, timesteps) -> jax.Array:
        """Forward diffusion to integer `timesteps` (variance-preserving schedulers; sigma-based override)."""
        return add_noise_vp(state.alphas_cumprod, original_samples, noise, timesteps)

    def scale_model_input(self, state, sample: jax.Array, timestep=None) -> jax.Array:
        """Identity for variance-preserving schedulers (sigma-based ones divide by sqrt(sigma^2 + 1))."""
        return sample

    def set_begin_index(self, state, begin_index):
        """Start the loop at iteration `begin_index` (img2img strength); `state.timesteps[begin_index:]` run."""
        if isinstance(begin_index, (int, np.integer)):
            n = state.timesteps.shape[0]
            if not 0 <= begin_index <= n:
                raise ValueError(f"begin_index={begin_index} must lie in [0, {n}] (the number of iterations).")
        return state.replace(step_index=jnp.asarray(begin_index, jnp.int32))


def begin_index_for_strength(num_inference_steps: int, strength: float, order: int = 1) -> int:
    """diffusers' img2img `get_timesteps`: the first loop iteration run for `strength` in [0, 1]."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength={strength!r} must lie in [0, 1].")
    init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
    t_start = max(num_inference_steps - init_timestep, 0)
    return t_start * order


# ----------------------------------------------------------------------------- machine-independent host math
#
# Schedules are computed once on the host and must be the same on every machine. numpy's float32 log / exp
# and float64 log / exp / power are SIMD kernels chosen per CPU (AVX-512, AVX2, baseline) and accurate to
# 1-4 ulps, so their last bits move with the machine (numpy's float32 log here: 5% of arguments not correctly
# rounded on AVX-512, 0.07% on the baseline kernel); libm's pow / cos have per-ISA variants too. IEEE + - * /
# and sqrt are correctly rounded everywhere. So the transcendental functions below run in decimal arithmetic
# (software, 40 significant digits, correctly rounded), then round once to float64 (and, where diffusers keeps
# float32, once more to float32: deterministic, off a single rounding only exactly at a float32 midpoint).

_DECIMAL = decimal.Context(prec=40, Emax=decimal.MAX_EMAX, Emin=decimal.MIN_EMIN)


def _decimal_map(fn, *arrays) -> np.ndarray:
    """Elementwise `fn` of Decimals (exact images of the float64 inputs, broadcast), rounded to float64;
    NaN in, NaN out."""
    args = np.broadcast_arrays(*(np.asarray(a, np.float64) for a in arrays))
    out = [
        math.nan if any(map(math.isnan, vals)) else float(fn(*map(decimal.Decimal, vals)))
        for vals in zip(*(a.ravel().tolist() for a in args))
    ]
    return np.asarray(out, np.float64).reshape(args[0].shape)


def exact_log(x) -> np.ndarray:
    """Natural log, float64, correctly rounded (log 0 = -inf)."""
    return _decimal_map(lambda d: _DECIMAL.ln(d), x)


def exact_exp(x) -> np.ndarray:
    """e^x, float64, correctly rounded."""
    return _decimal_map(lambda d: _DECIMAL.exp(d), x)


def exact_expm1(x) -> np.ndarray:
    """e^x - 1, float64 (40 digits before the subtraction: exact to float64 for |x| > 1e-20, and x below)."""
    return _decimal_map(lambda d: d if abs(d) < decimal.Decimal("1e-20") else _DECIMAL.subtract(_DECIMAL.exp(d), 1), x)


def exact_pow(x, y) -> np.ndarray:
    """x ** y for x >= 0, float64, correctly rounded."""
    return _decimal_map(lambda a, b: _DECIMAL.power(a, b), x, y)


def exact_cos(x) -> np.ndarray:
    """cos(x) for |x| <= 4, float64, correctly rounded (Taylor series in decimal)."""

    def cos(d):
        if abs(d) > 4:
            raise ValueError(f"exact_cos: |x| <= 4 expected, got {d}.")
        ctx = decimal.Context(prec=_DECIMAL.prec + 10)
        d2, term, total, k = ctx.multiply(d, d), decimal.Decimal(1), decimal.Decimal(1), 0
        while abs(term) > decimal.Decimal("1e-50"):
            k += 2
            term = ctx.divide(ctx.multiply(-term, d2), k * (k - 1))
            total = ctx.add(total, term)
        return total

    return _decimal_map(cos, x)


def log_f32(x: np.ndarray) -> np.ndarray:
    """The correctly rounded float32 log of float32 values: what diffusers' float32 torch.log / np.log
    compute to within their 1-4 ulps."""
    return exact_log(np.asarray(x, np.float32)).astype(np.float32)


def cached_schedule(method):
    """Cache a scheduler's host-side `method(self, num_inference_steps)` per (config, step count).

    The decimal math above costs up to ~0.1 s per schedule and `set_timesteps` runs at every trace; the
    cached arrays come back read-only.
    """

    @functools.lru_cache(maxsize=64)
    def cached(self, n):
        out = method(self, n)
        for a in out:
            a.flags.writeable = False
        return out

    @functools.wraps(method)
    def wrapper(self, num_inference_steps: int):
        return cached(self, num_inference_steps)

    return wrapper


# ----------------------------------------------------------------------------- noise schedule

def betas_for_alpha_bar(num_diffusion_timesteps: int, max_beta: float = 0.999, dtype: Any = jnp.float32) -> np.ndarray:
    """The squaredcos_cap_v2 (cosine) schedule of Nichol & Dhariwal, as diffusers computes it (float64, with a
    correctly rounded cosine, then rounded once to `dtype`)."""
    t = np.arange(num_diffusion_timesteps + 1, dtype=np.float64) / num_diffusion_timesteps
    alpha_bar = exact_cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.minimum(1 - alpha_bar[1:] / alpha_bar[:-1], max_beta).astype(dtype)


def _cumprod_f32(x: np.ndarray) -> np.ndarray:
    # torch's CPU cumprod accumulates float32 in float64 and rounds each output: bit-identical this way.
    return np.cumprod(x.astype(np.float64)).astype(np.float32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescale betas to zero terminal SNR (Lin et al. 2023, Algorithm 1): float64 betas from float32 ones.

    Computed in float64, unlike diffusers' float32: the rescaling subtracts sqrt(abar_T) ~ 0.068 from every
    sqrt(abar_t) (torch's float32 sqrt is not correctly rounded) and redoes a 1000-term product, so near t = T
    diffusers' abar is up to 4e-5 relative off its own formula, by an amount that depends on the machine.
    In float64 the schedule is the formula's value (rounded once to float32 by the caller), the same everywhere.
    """
    abar_sqrt = np.sqrt(np.cumprod(1.0 - betas.astype(np.float64)))
    a0, aT = abar_sqrt[0], abar_sqrt[-1]
    abar = ((abar_sqrt - aT) * (a0 / (a0 - aT))) ** 2
    return 1.0 - np.concatenate([abar[:1], abar[1:] / abar[:-1]])


def _fma_f32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Correctly rounded float32 a * b + c (one rounding, like a hardware FMA)."""
    a, b, c = (np.asarray(v, np.float32).astype(np.float64) for v in (a, b, c))
    p = a * b  # exact: 24 + 24 significant bits fit in float64
    s = p + c
    bb = s - p
    err = (p - (s - bb)) + (c - bb)  # TwoSum: s + err == p + c exactly
    r = s.astype(np.float32)
    # Double rounding (f64 then f32) is only wrong when s sits exactly on a float32 midpoint.
    lo = np.where(r.astype(np.float64) <= s, r, np.nextafter(r, np.float32(-np.inf)))
    hi = np.nextafter(lo, np.float32(np.inf))
    at_mid = (s == (lo.astype(np.float64) + hi.astype(np.float64)) / 2) & (err != 0)
    return np.where(at_mid, np.where(err > 0, hi, lo), r).astype(np.float32)


def torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """`torch.linspace(start, end, steps, dtype=torch.float32)` bit for bit (x86 CPU kernel).

    torch computes step = (end - start) / (steps - 1) in float32, then start + step * i for the first
    half and end - step * (steps - 1 - i) for the second, each as one fused multiply-add.
    """
    start32, end32 = np.float32(start), np.float32(end)
    if steps == 1:
        return np.array([start32], np.float32)
    step = np.float32(np.float32(end32 - start32) / np.float32(steps - 1))
    i = np.arange(steps)
    half = steps // 2
    first = _fma_f32(np.full(half, step), i[:half], np.full(half, start32))
    k = steps - 1 - i[half:]
    second = _fma_f32(np.full(len(k), -step), k, np.full(len(k), end32))
    return np.concatenate([first, second]).astype(np.float32)


def _schedule_fields(config) -> tuple:
    return tuple(getattr(config, k, None) for k in (
        "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "rescale_betas_zero_snr"
    ))


@functools.lru_cache(maxsize=32)
def _betas_and_alphas_cumprod(n, beta_start, beta_end, beta_schedule, trained_betas, rescale) -> Tuple[np.ndarray, ...]:
    """(betas, alphas_cumprod), both fp32 and read-only; cached per schedule (the cosine's decimal cosines
    take ~0.1 s)."""
    if trained_betas is not None:
        betas = np.asarray(trained_betas, np.float32)
    elif beta_schedule == "linear":
        betas = torch_linspace_f32(beta_start, beta_end, n)
    elif beta_schedule == "scaled_linear":
        betas = torch_linspace_f32(math.sqrt(beta_start), math.sqrt(beta_end), n) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        betas = betas_for_alpha_bar(n)
    else:
        raise ValueError(f"beta_schedule={beta_schedule!r} is not supported; use one of {BETA_SCHEDULES}.")
    if rescale:
        betas64 = rescale_zero_terminal_snr(betas)
        betas, alphas_cumprod = betas64.astype(np.float32), np.cumprod(1.0 - betas64).astype(np.float32)
    else:
        # 1 - beta rounded to fp32 like diffusers (part of its schedule: up to 17 ulps of abar), then torch's cumprod.
        alphas_cumprod = _cumprod_f32(np.float32(1.0) - betas)
    for a in (betas, alphas_cumprod):
        a.flags.writeable = False
    return betas, alphas_cumprod


def make_betas(config) -> np.ndarray:
    """fp32 betas [num_train_timesteps] (read-only) from a scheduler's config fields, as diffusers builds them.

    Bit-identical to diffusers' torch construction where that is IEEE arithmetic only (torch's vectorised
    linspace, which fuses its multiply-add; its scalar kernel, ATEN_CPU_CAPABILITY=default, rounds twice:
    one ulp apart); zero-SNR rescaling in float64 (see `rescale_zero_terminal_snr`).
    """
    return _betas_and_alphas_cumprod(*_schedule_fields(config))[0]


def make_alphas_cumprod(config) -> np.ndarray:
    """fp32 alphas_cumprod [num_train_timesteps] (read-only), bar-alpha_t = prod_{s<=t} (1 - beta_s)."""
    return _betas_and_alphas_cumprod(*_schedule_fields(config))[1]


def sigma_alphas_cumprod(config) -> np.ndarray:
    """`make_alphas_cumprod` for the sigma-based schedulers: with `rescale_betas_zero_snr` the last abar is
    2**-24 instead of 0, like diffusers, so the largest sigma stays finite."""
    ac = make_alphas_cumprod(config)
    if getattr(config, "rescale_betas_zero_snr", False):
        ac = ac.copy()
        ac[-1] = 2.0**-24
    return ac


def train_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """fp32 sigma of every training timestep, sqrt((1 - abar) / abar), in fp32 like diffusers."""
    ac = alphas_cumprod.astype(np.float32)
    return np.sqrt((np.float32(1.0) - ac) / ac)


# ----------------------------------------------------------------------------- timesteps

def check_num_inference_steps(num_inference_steps, num_train_timesteps: int) -> int:
    """Validate a Python step count: 1 <= num_inference_steps <= num_train_timesteps."""
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
        raise ValueError(
            f"num_inference_steps must be a Python int (it fixes array shapes), got {num_inference_steps!r}."
        )
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise ValueError(
            f"num_inference_steps={num_inference_steps} must lie in [1, num_train_timesteps="
            f"{num_train_timesteps}]: the model was trained on {num_train_timesteps} timesteps."
        )
    return int(num_inference_steps)


def inference_timesteps(
    num_train_timesteps: int,
    num_inference_steps: int,
    spacing: str,
    steps_offset: int = 0,
    round_linspace: bool = True,
) -> np.ndarray:
    """Descending inference timesteps as DDIM/DDPM/Euler/LMS compute them (Table 2 of Lin et al. 2023).

    leading:  arange(n) * (T // n) + steps_offset       (e.g. T=1000, n=4: 750 500 250 0)
    trailing: round(arange(T, 0, -T / n)) - 1             (999 749 499 249)
    linspace: linspace(0, T - 1, n), rounded unless `round_linspace=False` (Euler/LMS keep floats).
    Returns int64, or float64 for unrounded linspace.
    """
    n = check_num_inference_steps(num_inference_steps, num_train_timesteps)
    if spacing == "linspace":
        ts = np.linspace(0, num_train_timesteps - 1, n)[::-1]
        return np.rint(ts).astype(np.int64) if round_linspace else ts.copy()
    if spacing == "leading":
        return np.arange(n, dtype=np.int64)[::-1] * (num_train_timesteps // n) + steps_offset
    if spacing == "trailing":
        return np.rint(np.arange(num_train_timesteps, 0, -num_train_timesteps / n)).astype(np.int64) - 1
    raise ValueError(f"timestep_spacing={spacing!r} is not supported; use one of {TIMESTEP_SPACINGS}.")


# ----------------------------------------------------------------------------- step helpers

def broadcast_to_sample(x: jax.Array, sample: jax.Array) -> jax.Array:
    """Reshape a scalar or per-batch [B] array so it broadcasts against `sample` [B, ...]."""
    x = jnp.asarray(x)
    if x.ndim == 0:
        return x
    return x.reshape(x.shape + (1,) * (sample.ndim - x.ndim))


def to_x0_eps(
    model_output: jax.Array, sample: jax.Array, alpha_t, sigma_t, prediction_type: str
) -> Tuple[jax.Array, jax.Array]:
    """(x0, eps) from a model output for x_t = alpha_t * x0 + sigma_t * eps (variance-preserving form).

    alpha_t = sqrt(alphas_cumprod[t]), sigma_t = sqrt(1 - alphas_cumprod[t]).
      epsilon:      eps = out,                           x0 = (x_t - sigma_t * eps) / alpha_t
      sample:       x0 = out,                            eps = (x_t - alpha_t * x0) / sigma_t
      v_prediction: x0 = alpha_t x_t - sigma_t v,        eps = alpha_t v + sigma_t x_t
    Evaluated like diffusers' eager PyTorch (every product rounded, true division): the noise-form
    multistep solvers amplify a one-ulp difference in eps by ~10x per step (see `rounded`).
    """
    if prediction_type == "epsilon":
        return div_exact(sum_rounded(sample, -sigma_t * model_output), alpha_t), model_output
    if prediction_type == "sample":
        return model_output, div_exact(sum_rounded(sample, -alpha_t * model_output), sigma_t)
    if prediction_type == "v_prediction":
        x0 = sum_rounded(alpha_t * sample, -sigma_t * model_output)
        return x0, sum_rounded(alpha_t * model_output, sigma_t * sample)
    raise ValueError(f"prediction_type={prediction_type!r} is not supported; use one of {PREDICTION_TYPES}.")


def alpha_cumprod_or_final(alphas_cumprod: jax.Array, t: jax.Array, final) -> jax.Array:
    """abar_t at a traced timestep t, or `final` where t < 0 (the step past the last timestep)."""
    return jnp.where(t >= 0, alphas_cumprod[jnp.maximum(t, 0)], final)


def threshold_sample(x0: jax.Array, ratio: float, max_value: float) -> jax.Array:
    """Dynamic thresholding (Imagen, Saharia et al. 2022) per batch element, like diffusers.

    s = clip(quantile(|x0|, ratio), 1, max_value); x0 <- clip(x0, -s, s) / s.
    """
    flat = x0.reshape(x0.shape[0], -1)
    s = jnp.quantile(jnp.abs(flat), ratio, axis=1, method="linear")
    s = jnp.clip(s, 1.0, max_value)[:, None]
    return (jnp.clip(flat, -s, s) / s).reshape(x0.shape)


def clip_or_threshold(x0: jax.Array, config) -> jax.Array:
    """Apply the config's `thresholding` (if set) or else `clip_sample` to an x0 estimate."""
    if getattr(config, "thresholding", False):
        return threshold_sample(x0, config.dynamic_thresholding_ratio, config.sample_max_value)
    if getattr(config, "clip_sample", False):
        return jnp.clip(x0, -config.clip_sample_range, config.clip_sample_range)
    return x0


def add_noise_vp(alphas_cumprod: jax.Array, original: jax.Array, noise: jax.Array, timesteps) -> jax.Array:
    """Forward process x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps for integer `timesteps` (scalar or [B])."""
    abar = jnp.asarray(alphas_cumprod, jnp.float32)[jnp.asarray(timesteps, jnp.int32)]
    abar = broadcast_to_sample(abar, original)
    out = sum_rounded(jnp.sqrt(abar) * original.astype(jnp.float32), jnp.sqrt(1.0 - abar) * noise.astype(jnp.float32))
    return out.astype(original.dtype)


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional train timestep whose sigma is `sigma`: linear interpolation in log-sigma.

    `log_sigmas` [num_train_timesteps] ascends with t; values outside the table clamp to its ends.
    """
    sigma = np.asarray(sigma, np.float64)
    log_sigma = exact_log(np.maximum(sigma, 1e-10))
    # The bracketing train index: last one whose log-sigma is <= ours, at most the second to last.
    low = np.clip(np.searchsorted(log_sigmas, log_sigma, side="right") - 1, 0, len(log_sigmas) - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0.0, 1.0)
    return (1 - w) * low + w * (low + 1)


def karras_sigmas(sigma_min: float, sigma_max: float, num_inference_steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) eq. 5: sigmas evenly spaced in sigma^(1/rho), float64, descending."""
    top, bottom = exact_pow([sigma_max, sigma_min], 1 / rho)
    return exact_pow(top + np.linspace(0, 1, num_inference_steps) * (bottom - top), rho)


def div_exact(x: jax.Array, s: jax.Array) -> jax.Array:
    """x / s, correctly rounded, for a scalar s.

    XLA rewrites a division by a broadcast scalar into a multiply by its reciprocal, one ulp off.
    Where a step cancels large terms that ulp is amplified (zero-SNR Euler starts at sigma = 4096 and
    cancels ~4096 |x| down to ~20: 400x); the barrier keeps the true division torch performs.
    """
    return x / jax.lax.optimization_barrier(jnp.broadcast_to(jnp.asarray(s, x.dtype), x.shape))


def rounded(x: jax.Array) -> jax.Array:
    """The identity, except that XLA has to round `x` to its dtype here, as eager PyTorch does after every op.

    Numeric hazard: XLA contracts `a * x + y` into one fused multiply-add (and `1 / sqrt(v)` into rsqrt),
    which skips the rounding of `a * x` that the PyTorch reference performs. One ulp, harmless alone; but
    where a step cancels large terms it grows by the cancellation factor, every step (diffusers' UniPC
    noise form with a sample / v model: x_t = 9.1 x - 8.1 eps; ours avoids that form, see `unipc`).
    `where(x == x, x, nan)` is the identity (NaN stays NaN) that neither XLA nor
    LLVM folds, so the multiply feeding it cannot fuse with the add after it.
    """
    return jnp.where(x == x, x, jnp.nan)


def sum_rounded(*terms: jax.Array) -> jax.Array:
    """terms[0] + terms[1] + ... left to right, each term rounded first (see `rounded`): PyTorch's eager
    `a * x - b * y` (pass `-b * y`: negation is exact) where XLA would fuse a product into the sum."""
    total = rounded(terms[0])
    for term in terms[1:]:
        total = total + rounded(term)
    return total


# ----------------------------------------------------------------------------- diffusers' Flax helpers

class FlaxKarrasDiffusionSchedulers(enum.Enum):
    """diffusers' list of the Flax schedulers that can replace each other in a Stable Diffusion pipeline."""

    FlaxDDIMScheduler = 1
    FlaxDDPMScheduler = 2
    FlaxPNDMScheduler = 3
    FlaxLMSDiscreteScheduler = 4
    FlaxDPMSolverMultistepScheduler = 5
    FlaxEulerDiscreteScheduler = 6


@flax.struct.dataclass
class CommonSchedulerState:
    """diffusers' shared noise schedule: betas, alphas = 1 - betas, alphas_cumprod (float32, [T])."""

    alphas: jax.Array
    betas: jax.Array
    alphas_cumprod: jax.Array

    @classmethod
    def create(cls, scheduler: SchedulerMixin) -> "CommonSchedulerState":
        """The schedule of `scheduler`'s config, bit-identical to its own states' alphas_cumprod."""
        betas = make_betas(scheduler)
        return cls(alphas=jnp.asarray(np.float32(1.0) - betas), betas=jnp.asarray(betas),
                   alphas_cumprod=jnp.asarray(make_alphas_cumprod(scheduler)))


def broadcast_to_shape_from_left(x: jax.Array, shape: Tuple[int, ...]) -> jax.Array:
    """`x` [B] (or any leading shape) broadcast against `shape` by appending axes on the right."""
    x = jnp.asarray(x)
    if len(shape) < x.ndim:
        raise ValueError(f"broadcast_to_shape_from_left: x has {x.ndim} axes, more than shape {tuple(shape)}.")
    return jnp.broadcast_to(x.reshape(x.shape + (1,) * (len(shape) - x.ndim)), shape)


def get_sqrt_alpha_prod(state, original_samples: jax.Array, noise: jax.Array, timesteps):
    """(sqrt(abar_t), sqrt(1 - abar_t)) at integer `timesteps`, broadcast to `original_samples`' shape.
    `state`: anything with alphas_cumprod (a CommonSchedulerState or a variance-preserving state)."""
    del noise  # diffusers' signature
    abar = jnp.asarray(state.alphas_cumprod, jnp.float32)[jnp.asarray(timesteps, jnp.int32)].ravel()
    shape = original_samples.shape
    return broadcast_to_shape_from_left(jnp.sqrt(abar), shape), broadcast_to_shape_from_left(jnp.sqrt(1 - abar), shape)


def add_noise_common(state, original_samples: jax.Array, noise: jax.Array, timesteps) -> jax.Array:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (what every variance-preserving `add_noise` computes)."""
    return add_noise_vp(state.alphas_cumprod, original_samples, noise, timesteps)


def get_velocity_common(state, sample: jax.Array, noise: jax.Array, timesteps) -> jax.Array:
    """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0, the v-prediction target (Salimans & Ho 2022)."""
    a, s = get_sqrt_alpha_prod(state, sample, noise, timesteps)
    v = sum_rounded(a * noise.astype(jnp.float32), -s * sample.astype(jnp.float32))
    return v.astype(sample.dtype)
