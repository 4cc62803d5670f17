"""Flax schedulers vs diffusers' PyTorch schedulers, step for step, plus the jit / fori_loop contract.

Parity: both frameworks run the full sampling loop from the same start sample with the same
deterministic fake model, model(x, t) = 0.3 x + g(t) C (C a fixed random tensor, g(t) = sin(t / 100)
rounded to fp32 so both sides see the same value). The diffusers scheduler is built from a config and
saved with `save_pretrained`; ours is loaded from that folder with `from_pretrained`. Stochastic schedulers get the *same*
noise on both sides: ours draws N(0, I) from `fold_in(key, i)` at loop iteration i, and diffusers'
`randn_tensor` is patched to return exactly those arrays.

Tolerances, the same on every machine: final samples agree to <= 1e-5 relative (max |ours - ref| /
max |ref|) in fp32; integer timesteps exactly; schedules (betas, alphas_cumprod, sigmas) and fractional
timesteps within a few fp32 ulps, each bound derived where it is asserted. Not bit for bit: diffusers'
schedules go through torch's fp32 sqrt (not correctly rounded: one ulp off for ~17% of arguments),
numpy's SIMD fp32 log (a kernel per CPU, 1-4 ulps) and torch's linspace (fused multiply-add in its
AVX2 / AVX-512 kernels, not in its default one), so their last bits move with the machine; ours are
correctly rounded (`schedulers.common.exact_log`). Zero-SNR Euler, whose first step amplifies one ulp
~760x, is compared with diffusers' formula evaluated in float64. The parity loops run eagerly;
dedicated tests compile the whole loop under `jit` + `fori_loop` and check it equals the Python loop
and compiles once.

`SCHEDULERS` / `parity_case` are the harness: add a (diffusers class, Flax class) pair and cases.
"""
import json
import warnings

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from flax_inpaint.schedulers import (
    FlaxDDIMInverseScheduler,
    FlaxDDIMScheduler,
    FlaxDDPMScheduler,
    FlaxDPMSolverMultistepScheduler,
    FlaxEulerAncestralDiscreteScheduler,
    FlaxEulerDiscreteScheduler,
    FlaxLMSDiscreteScheduler,
    FlaxPNDMScheduler,
    FlaxUniPCMultistepScheduler,
    begin_index_for_strength,
)
from flax_inpaint.schedulers.common import make_alphas_cumprod, make_betas

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

SHAPE = (2, 4, 8, 8)
RTOL = 1e-5  # the parity tolerance, relative to the largest reference value
_rng = np.random.default_rng(0)
X_T = _rng.standard_normal(SHAPE).astype(np.float32)  # start sample (times init_noise_sigma)
X_0 = _rng.standard_normal(SHAPE).astype(np.float32)  # a clean sample, for strength / add_noise
NOISE = _rng.standard_normal(SHAPE).astype(np.float32)
C = _rng.standard_normal(SHAPE).astype(np.float32)
KEY = jax.random.PRNGKey(42)

# Stable Diffusion 1.x's scheduler settings (its scheduler_config.json, PNDM class included).
SD_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

# name -> (diffusers class, our class, diffusers module whose randn_tensor feeds step noise or None)
SCHEDULERS = {
    "ddim": (diffusers.DDIMScheduler, FlaxDDIMScheduler, "scheduling_ddim"),
    "ddim_inverse": (diffusers.DDIMInverseScheduler, FlaxDDIMInverseScheduler, None),
    "ddpm": (diffusers.DDPMScheduler, FlaxDDPMScheduler, "scheduling_ddpm"),
    "pndm": (diffusers.PNDMScheduler, FlaxPNDMScheduler, None),
    "lms": (diffusers.LMSDiscreteScheduler, FlaxLMSDiscreteScheduler, None),
    "euler": (diffusers.EulerDiscreteScheduler, FlaxEulerDiscreteScheduler, "scheduling_euler_discrete"),
    "euler_a": (
        diffusers.EulerAncestralDiscreteScheduler,
        FlaxEulerAncestralDiscreteScheduler,
        "scheduling_euler_ancestral_discrete",
    ),
}
STOCHASTIC = {"ddpm", "euler_a"}
# Config handling covers the multistep solvers too (their parity tests: test_schedulers_multistep.py).
CONFIG_PAIRS = {
    **{name: pair[:2] for name, pair in SCHEDULERS.items()},
    "dpm": (diffusers.DPMSolverMultistepScheduler, FlaxDPMSolverMultistepScheduler),
    "unipc": (diffusers.UniPCMultistepScheduler, FlaxUniPCMultistepScheduler),
}


def g(t) -> float:
    return float(np.float32(np.sin(float(t) / 100.0)))


def torch_model(x, t):
    return 0.3 * x + g(t) * torch.from_numpy(C)


C_JAX = jnp.asarray(C)


def np_model(x, t):
    return 0.3 * x + g(t) * C_JAX


def jax_model(x, t):
    """The same model, traceable (t may be a tracer); used for jit-vs-eager, not for torch parity."""
    return 0.3 * x + jnp.sin(jnp.asarray(t, jnp.float32) / 100.0) * C_JAX


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def ulps(ours, ref) -> np.ndarray:
    """|ours - ref| in units of the fp32 ulp of ref, elementwise."""
    ref32 = np.asarray(ref, np.float32)
    return np.abs(np.asarray(ours, np.float64) - ref32) / np.spacing(np.abs(ref32)).astype(np.float64)


def assert_ulps(ours, ref, max_ulps, what: str):
    err = np.ravel(ulps(ours, ref))
    k = int(np.argmax(err))
    assert err[k] <= max_ulps, (
        f"{what}: {err[k]:.1f} fp32 ulps > {max_ulps} at index {k} (ours {np.ravel(ours)[k]!r}, "
        f"reference {np.ravel(ref)[k]!r})"
    )


def karras_timestep_tolerance(ref_sched, t) -> np.ndarray:
    """How far diffusers' fractional Karras timesteps may lie from the correctly rounded ones, per timestep.

    diffusers interpolates t = k + (l_k - log s) / (l_k - l_(k+1)) in an fp32 table l = log(sigma_train) whose
    sigmas come from torch's fp32 sqrt (up to one ulp: 2^-23 relative) and whose log is numpy's SIMD fp32
    log (up to 4 ulps). Moving l_k, l_(k+1) and log s each by d = 2^-23 + 4 ulp(l) moves t by at most
    3 d / |l_(k+1) - l_k|; plus one ulp of t for its fp32 rounding. (At t < 1, ~4e-5 where the table is steep.)
    """
    ac = ref_sched.alphas_cumprod.numpy().astype(np.float64)
    log_sigmas = np.log(np.sqrt((1 - ac) / ac))
    k = np.clip(np.floor(np.asarray(t, np.float64)).astype(int), 0, len(ac) - 2)
    d = 2.0**-23 + 4 * np.spacing(np.abs(log_sigmas[k]).astype(np.float32)).astype(np.float64)
    return 3 * d / np.abs(log_sigmas[k + 1] - log_sigmas[k]) + np.spacing(np.abs(np.float32(t))).astype(np.float64)


def assert_timesteps_match(ours_sched, ref_sched, our_t, ref_t):
    """Integer timesteps (and the linspace spacing's fp32 ones, IEEE arithmetic on both sides) exactly;
    fractional Karras ones within `karras_timestep_tolerance`."""
    assert our_t.shape == ref_t.shape, f"timesteps differ:\nours {our_t}\nref  {ref_t}"
    ours64, ref64 = our_t.astype(np.float64), ref_t.astype(np.float64)
    if getattr(ours_sched, "use_karras_sigmas", False) and not np.array_equal(ref64, np.round(ref64)):
        tol = karras_timestep_tolerance(ref_sched, ref64)
        assert (np.abs(ours64 - ref64) <= tol).all(), (
            f"Karras timesteps differ beyond diffusers' fp32 log-table error:\nours {our_t}\nref  {ref_t}\n"
            f"|diff| {np.abs(ours64 - ref64)}\nallowed {tol}"
        )
    else:
        assert np.array_equal(ours64, ref64), f"timesteps differ:\nours {our_t}\nref  {ref_t}"


def step_noise(key, i, shape=SHAPE):
    """The noise our stochastic steps draw at loop iteration i (see `run_flax`)."""
    return np.array(jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32))  # writable copy


class NoiseFeed:
    """Patches diffusers' `randn_tensor` so its step at loop iteration i draws our iteration-i noise."""

    def __init__(self, monkeypatch, name, iterations, key=KEY):
        self.noises = {i: torch.from_numpy(step_noise(key, i)) for i in iterations}
        self.i = None
        monkeypatch.setattr(getattr(diffusers.schedulers, SCHEDULERS[name][2]), "randn_tensor", self)

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        noise = self.noises[self.i]
        assert tuple(noise.shape) == tuple(shape)
        return noise.to(dtype) if dtype is not None else noise


def run_torch(sched, n, begin=0, start=None, model=torch_model, feed=None, **step_kw):
    """diffusers' sampling loop; `begin` as its img2img pipelines do (slice + set_begin_index)."""
    sched.set_timesteps(n)
    if begin and hasattr(sched, "set_begin_index"):
        sched.set_begin_index(begin)
    x = torch.from_numpy(X_T) * sched.init_noise_sigma if start is None else torch.from_numpy(start)
    for i, t in enumerate(sched.timesteps[begin:], start=begin):
        if feed is not None:
            feed.i = i
        out = model(sched.scale_model_input(x, t), t)
        x = sched.step(out, t, x, **step_kw).prev_sample
    return sched.timesteps.numpy(), x.numpy()


def run_flax(sched, n, begin=0, start=None, key=None, model=np_model, **step_kw):
    """The contract's loop body, run eagerly in Python."""
    state = sched.set_timesteps(sched.create_state(), n, SHAPE)
    if begin:
        state = sched.set_begin_index(state, begin)
    x = jnp.asarray(X_T) * state.init_noise_sigma if start is None else jnp.asarray(start)
    timesteps = np.asarray(state.timesteps)  # host copy: eager jax indexing costs ~1 ms per call
    for i in range(begin, len(timesteps)):
        t = timesteps[i]
        out = model(sched.scale_model_input(state, x, t), t)
        k = None if key is None else jax.random.fold_in(key, i)
        res = sched.step(state, out, t, x, key=k, **step_kw)
        x, state = res.prev_sample, res.state
    return np.asarray(state.timesteps), np.asarray(x), state


def assert_parity(name, config, n, monkeypatch, tmp_path, begin=0, start=None, step_kw=None):
    """diffusers' scheduler from `config`, saved; ours loaded from that folder; full loops compared."""
    torch_cls, flax_cls, _ = SCHEDULERS[name]
    ref_sched = torch_cls.from_config(config)
    ref_sched.save_pretrained(tmp_path / "scheduler")
    ours, _ = flax_cls.from_pretrained(tmp_path, subfolder="scheduler")  # (scheduler, state), like diffusers
    key = feed = None
    if name in STOCHASTIC or (step_kw or {}).get("eta", 0) > 0 or (step_kw or {}).get("s_churn", 0) > 0:
        key = KEY
        iterations = ours.set_timesteps(ours.create_state(), n, SHAPE).timesteps.shape[0]
        feed = NoiseFeed(monkeypatch, name, range(begin, iterations))
    ref_t, ref_x = run_torch(ref_sched, n, begin, start, feed=feed, **(step_kw or {}))
    our_t, our_x, _ = run_flax(ours, n, begin, start, key=key, **(step_kw or {}))
    assert_timesteps_match(ours, ref_sched, our_t, ref_t)
    err = rel_err(our_x, ref_x)
    assert err <= RTOL, f"{name} {config} n={n}: relative error {err:.2e} > {RTOL}"


# ----------------------------------------------------------------------------- full-loop parity

STEP_COUNTS = (1, 4, 25, 50)
SPACINGS = ("leading", "trailing", "linspace")
BASE = {k: v for k, v in SD_CONFIG.items() if not k.startswith("_") and k != "skip_prk_steps"}


def _cases():
    # (name, extra config, step counts, spacings); each with epsilon and v_prediction ("sample" is in
    # VARIANTS). The stochastic ones (DDPM, Euler-ancestral, exact noise fed to both) use fewer counts.
    table = [
        ("ddim", {}, STEP_COUNTS, SPACINGS),
        ("ddim_inverse", {}, STEP_COUNTS, ("leading", "trailing")),
        ("pndm", {"skip_prk_steps": True}, STEP_COUNTS, SPACINGS),
        ("pndm", {"skip_prk_steps": False}, (4, 25, 50), SPACINGS),  # the PRK warm-up needs >= 4 steps
        ("lms", {}, STEP_COUNTS, SPACINGS),
        ("euler", {}, STEP_COUNTS, SPACINGS),
        ("ddpm", {}, (4, 25), SPACINGS),
        ("euler_a", {}, (4, 25), SPACINGS),
    ]
    for name, extra, counts, spacings in table:
        for pred in ("epsilon", "v_prediction"):
            for spacing in spacings:
                tag = "-".join([name, *(f"{k}={v}" for k, v in extra.items()), pred, spacing])
                yield pytest.param(name, {**extra, "prediction_type": pred, "timestep_spacing": spacing}, counts, id=tag)


@pytest.mark.parametrize("name,extra,counts", list(_cases()))
def test_full_loop_parity(name, extra, counts, monkeypatch, tmp_path):
    config = {**BASE, **extra}
    for n in counts:
        with monkeypatch.context() as mp:
            assert_parity(name, config, n, mp, tmp_path)


# Options beyond spacing x prediction type: clipping, thresholding, other beta schedules, zero-SNR
# rescaling, Karras sigmas, variance types, eta, churn, step order.
VARIANTS = [
    ("ddim", {"prediction_type": "sample", "timestep_spacing": "trailing"}, {}),
    ("ddpm", {"prediction_type": "sample", "timestep_spacing": "linspace"}, {}),
    ("lms", {"prediction_type": "sample"}, {}),
    ("euler", {"prediction_type": "sample", "timestep_spacing": "leading"}, {}),
    ("ddim", {"clip_sample": True, "clip_sample_range": 1.5, "set_alpha_to_one": True}, {}),
    ("ddim", {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.5}, {}),
    ("ddim", {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}, {}),
    ("ddim", {"beta_schedule": "squaredcos_cap_v2", "timestep_spacing": "trailing"}, {}),
    ("ddim", {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"}, {}),
    ("ddim", {}, {"eta": 1.0}),
    ("ddim", {"timestep_spacing": "trailing"}, {"eta": 0.5, "use_clipped_model_output": True}),
    ("ddim", {"trained_betas": make_betas(FlaxDDIMScheduler(beta_schedule="linear")).tolist()}, {}),
    ("ddim_inverse", {"clip_sample": True, "set_alpha_to_one": True}, {}),
    ("ddim_inverse", {"prediction_type": "sample", "timestep_spacing": "trailing"}, {}),
    ("ddpm", {"variance_type": "fixed_large"}, {}),
    ("ddpm", {"variance_type": "fixed_small_log", "clip_sample": True}, {}),
    ("ddpm", {"thresholding": True, "timestep_spacing": "trailing"}, {}),
    ("pndm", {"skip_prk_steps": True, "set_alpha_to_one": True, "beta_schedule": "squaredcos_cap_v2"}, {}),
    ("lms", {"use_karras_sigmas": True}, {}),
    ("lms", {"timestep_spacing": "leading"}, {"order": 2}),
    ("euler", {"use_karras_sigmas": True, "timestep_spacing": "leading"}, {}),
    ("euler", {"final_sigmas_type": "sigma_min", "timestep_spacing": "trailing"}, {}),
    ("euler", {}, {"s_churn": 1.0, "s_tmin": 0.5, "s_tmax": 5.0}),
    ("euler_a", {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}, {}),
] + [
    # steps_offset=0 (BASE has SD's 1): "leading" then ends at t = 0 (PNDM: with the PRK warm-up).
    (name, {"steps_offset": 0, "timestep_spacing": "leading"}, {}) for name in sorted(SCHEDULERS)
]


@pytest.mark.parametrize("name,extra,step_kw", VARIANTS, ids=lambda v: json.dumps(v)[:48] if isinstance(v, dict) else v)
def test_variant_parity(name, extra, step_kw, monkeypatch, tmp_path):
    for n in (4, 25):
        with monkeypatch.context() as mp:
            assert_parity(name, {**BASE, **extra}, n, mp, tmp_path, step_kw=step_kw)


@pytest.mark.parametrize("alias", [False, True])
def test_ddim_inverse_deprecated_set_alpha_to_zero_parity(alias, tmp_path):
    """diffusers' DDIMInverseScheduler takes `set_alpha_to_zero` (its name before 0.18) as the value of
    set_alpha_to_one, as a keyword and from an old config file; ours too. The opposite
    set_alpha_to_one shows the alias wins (the first inverse step's abar differs: 1 vs abar_0)."""
    base = {k: v for k, v in BASE.items() if k != "set_alpha_to_one"}
    ref = diffusers.DDIMInverseScheduler(**base, set_alpha_to_one=not alias, set_alpha_to_zero=alias)
    ours = FlaxDDIMInverseScheduler.from_config({**base, "set_alpha_to_one": not alias}, set_alpha_to_zero=alias)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "DDIMInverseScheduler", **base, "set_alpha_to_zero": alias}))
    from_file, _ = FlaxDDIMInverseScheduler.from_pretrained(tmp_path / "old")
    ref_file = diffusers.DDIMInverseScheduler.from_pretrained(tmp_path / "old")
    assert ours.set_alpha_to_one is alias and from_file.set_alpha_to_one is alias
    for n in (4, 25):
        ref_t, ref_x = run_torch(ref, n)
        assert rel_err(run_flax(ours, n)[1], ref_x) <= RTOL
        file_t, file_x = run_torch(ref_file, n)
        our_t, our_x, _ = run_flax(from_file, n)
        assert_timesteps_match(from_file, ref_file, our_t, file_t)
        assert rel_err(our_x, file_x) <= RTOL
    other = FlaxDDIMInverseScheduler.from_config({**base, "set_alpha_to_one": not alias})
    assert rel_err(run_flax(other, 4)[1], run_torch(ref, 4)[1]) > 1e-3  # the alias changes the result


def test_ddpm_learned_range_variance_parity(monkeypatch):
    """The model output carries the variance in doubled channels; ours finds the doubled axis."""
    config = {**BASE, "variance_type": "learned_range"}
    v = np.tanh(C).astype(np.float32)

    def torch_learned(x, t):
        return torch.cat([torch_model(x, t), torch.from_numpy(v)], dim=1)

    def flax_learned(x, t):
        return jnp.concatenate([np_model(x, t), jnp.asarray(v)], axis=1)

    feed = NoiseFeed(monkeypatch, "ddpm", range(10))
    _, ref = run_torch(diffusers.DDPMScheduler.from_config(config), 10, model=torch_learned, feed=feed)
    _, ours, _ = run_flax(FlaxDDPMScheduler.from_config(config), 10, key=KEY, model=flax_learned)
    assert rel_err(ours, ref) <= RTOL


def test_noise_schedule_matches_diffusers():
    """betas and alphas_cumprod within 4 ulps of diffusers'.

    Both are IEEE arithmetic (linspace, 1 - beta in fp32, torch's cumprod accumulating in float64), the
    same on every machine, except torch's linspace: its AVX2 / AVX-512 kernels compute start + i * step as
    one fused multiply-add (ours, bit for bit), its default kernel rounds the product first: one ulp of a
    linspace value, which scaled_linear's square doubles in relative terms (<= 4 ulps of a beta, 3 measured)
    and the fp32 1 - beta and the 1000-term product carry to <= 2 ulps of abar (measured).
    """
    for cfg in ({"beta_schedule": "linear"}, BASE, {"beta_schedule": "squaredcos_cap_v2"},
                {**BASE, "num_train_timesteps": 37, "beta_end": 0.3}):
        ref = diffusers.DDIMScheduler.from_config(cfg)
        ours = FlaxDDIMScheduler.from_config(cfg)
        assert_ulps(make_betas(ours), ref.betas.numpy(), 4, f"betas {cfg}")
        assert_ulps(make_alphas_cumprod(ours), ref.alphas_cumprod.numpy(), 4, f"alphas_cumprod {cfg}")


def zero_snr_alphas_cumprod_f64(betas) -> np.ndarray:
    """Lin et al. 2023, Algorithm 1, in float64: sqrt(abar) shifted to end at 0 and scaled to keep its first
    value. (diffusers converts that back to betas and takes the cumulative product again, which telescopes
    to the same abar.)"""
    root = np.sqrt(np.cumprod(1.0 - np.asarray(betas, np.float64)))
    return ((root - root[-1]) * root[0] / (root[0] - root[-1])) ** 2


def test_zero_snr_schedule_matches_float64_formula():
    """Zero-SNR rescaling: ours is the float64 formula rounded once (<= 1 ulp: two float64 evaluations);
    diffusers' fp32 evaluation subtracts sqrt(abar_T) = 0.068 from every sqrt(abar_t) (whose torch sqrt is
    one ulp off for some) and redoes a 1000-term product, so its abar is off the formula by a few 2^-24 in
    absolute terms (3.9e-7 measured) and far more in relative terms as abar -> 0 (3.8e-5 at t = 998):
    there we allow 2^-20 absolute (16 fp32 ulps of 1)."""
    cfg = {**BASE, "rescale_betas_zero_snr": True}
    betas = diffusers.DDIMScheduler.from_config({**cfg, "rescale_betas_zero_snr": False}).betas.numpy()
    want = zero_snr_alphas_cumprod_f64(betas)
    ours = make_alphas_cumprod(FlaxDDIMScheduler.from_config(cfg))
    assert ours[-1] == want[-1] == 0.0
    assert_ulps(ours[:-1], want[:-1], 1, "zero-SNR alphas_cumprod vs the float64 formula")
    ref = diffusers.DDIMScheduler.from_config(cfg).alphas_cumprod.numpy()
    diff = np.abs(ours.astype(np.float64) - ref)
    assert diff.max() <= 2.0**-20, (
        f"zero-SNR alphas_cumprod: ours {diff.max():.2e} from diffusers' fp32 evaluation at t = {diff.argmax()} "
        f"(diffusers {np.abs(ref - want).max():.2e} from the float64 formula); allowed 2^-20"
    )


@pytest.mark.parametrize("n", [4, 25])
def test_zero_snr_euler_matches_float64_formula(n, tmp_path):
    """Zero-SNR Euler (trailing, v-prediction) against diffusers' formula in float64, and diffusers itself.

    Its first step goes from sigma = 4096 (abar_T = 2^-24) to sigma_1 (5.4 at 4 steps): diffusers' fp32
    x + (x - x0) / sigma * (sigma_1 - sigma) cancels ~4096 x down to ~sigma_1 x, amplifying the last bit by
    sigma / sigma_1 (~760), so fp32 implementations agree only to ~2^-24 * 760 = 4.5e-5 (ours uses the
    cancellation-free form, `euler.euler_update`). We assert 1e-5 against the float64 formula and that
    diffusers is within 4 ulps times that amplification of it (which checks the reference itself).
    """
    cfg = {**BASE, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"}
    ref_sched = diffusers.EulerDiscreteScheduler.from_config(cfg)
    ref_sched.save_pretrained(tmp_path)
    _, ref_x = run_torch(ref_sched, n)
    scheduler, _ = FlaxEulerDiscreteScheduler.from_pretrained(tmp_path)
    _, our_x, _ = run_flax(scheduler, n)

    # diffusers' EulerDiscreteScheduler in float64: sigma_t = sqrt((1 - abar_t) / abar_t) with the last abar
    # set to 2^-24, trailing timesteps, init_noise_sigma = max sigma, and per step
    # x0 = -sigma / sqrt(sigma^2 + 1) v + x / (sigma^2 + 1),  x <- x + (x - x0) / sigma * (sigma_next - sigma).
    betas = diffusers.EulerDiscreteScheduler.from_config({**cfg, "rescale_betas_zero_snr": False}).betas.numpy()
    abar = zero_snr_alphas_cumprod_f64(betas)
    abar[-1] = 2.0**-24
    ts = np.round(np.arange(1000, 0, -1000 / n)) - 1
    sigmas = np.append(np.sqrt((1 - abar) / abar)[ts.astype(int)], 0.0)
    x = X_T.astype(np.float64) * sigmas[0]
    for i, t in enumerate(ts):
        s = sigmas[i]
        v = 0.3 * (x / np.sqrt(s * s + 1)) + g(t) * C.astype(np.float64)
        x0 = -s / np.sqrt(s * s + 1) * v + x / (s * s + 1)
        x = x + (x - x0) / s * (sigmas[i + 1] - s)

    ours_err, ref_err = rel_err(our_x, x), rel_err(ref_x, x)
    amplified_ulp = 2.0**-24 * sigmas[0] / sigmas[1]
    message = (f"n={n}: relative error against diffusers' formula in float64: ours {ours_err:.2e}, diffusers' "
               f"fp32 {ref_err:.2e} (ours vs diffusers {rel_err(our_x, ref_x):.2e}; one ulp amplified "
               f"{sigmas[0] / sigmas[1]:.0f}x = {amplified_ulp:.1e})")
    assert ours_err <= RTOL, message
    assert ref_err <= 4 * amplified_ulp, message


SIGMA_CASES = [
    ("euler", {}),
    ("euler", {"use_karras_sigmas": True}),
    ("euler", {"use_karras_sigmas": True, "timestep_spacing": "leading"}),
    ("euler", {"final_sigmas_type": "sigma_min", "timestep_spacing": "trailing"}),
    ("euler_a", {"timestep_spacing": "leading"}),
    ("lms", {"use_karras_sigmas": True}),
    ("dpm", {}),
    ("dpm", {"use_karras_sigmas": True}),
    ("dpm", {"beta_schedule": "squaredcos_cap_v2", "use_karras_sigmas": True, "lambda_min_clipped": -5.1}),
    ("unipc", {"use_karras_sigmas": True, "sigma_min": 0.05, "sigma_max": 10.0, "final_sigmas_type": "sigma_min"}),
]


@pytest.mark.parametrize("name,extra", SIGMA_CASES, ids=lambda v: json.dumps(v) if isinstance(v, dict) else v)
def test_sigma_schedules_match_diffusers(name, extra):
    """Sigmas within 2 ulps of diffusers': its training sigmas come from torch's fp32 sqrt (up to one ulp
    off), then one more rounding (interpolation between training timesteps, or the Karras formula, which
    keeps its end points' relative error). Timesteps as in the parity loops. (Zero-SNR schedules:
    `test_zero_snr_schedule_matches_float64_formula`.)"""
    torch_cls, flax_cls = CONFIG_PAIRS[name]
    ref, ours = torch_cls.from_config({**BASE, **extra}), flax_cls.from_config({**BASE, **extra})
    for n in (4, 25, 50):
        ref.set_timesteps(n)
        state = ours.set_timesteps(ours.create_state(), n, SHAPE)
        assert_ulps(np.asarray(state.sigmas), ref.sigmas.numpy(), 2, f"{name} {extra} n={n} sigmas")
        assert_timesteps_match(ours, ref, np.asarray(state.timesteps), ref.timesteps.numpy())


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_init_noise_sigma_and_add_noise_parity(name):
    torch_cls, flax_cls, _ = SCHEDULERS[name]
    for spacing in ("leading", "trailing") if name == "ddim_inverse" else SPACINGS:
        config = {**SD_CONFIG, "timestep_spacing": spacing}
        ref, ours = torch_cls.from_config(config), flax_cls.from_config(config)
        ref.set_timesteps(25)
        state = ours.set_timesteps(ours.create_state(), 25, SHAPE)
        # sqrt(sigma_max^2 + 1) or sigma_max: torch's sqrt (one ulp) of a sigma one ulp off at most.
        assert_ulps(np.float32(state.init_noise_sigma), np.float32(ref.init_noise_sigma), 2, f"{name} init_noise_sigma")
        t = ref.timesteps[[7, 3]]  # per-batch timesteps
        if not hasattr(ref, "add_noise"):  # DDIMInverseScheduler: the same VP forward process as DDIM
            ref = diffusers.DDIMScheduler.from_config(config)
        want = ref.add_noise(torch.from_numpy(X_0), torch.from_numpy(NOISE), t).numpy()
        got = ours.add_noise(state, jnp.asarray(X_0), jnp.asarray(NOISE), jnp.asarray(t.numpy()))
        assert rel_err(got, want) <= 1e-6


# ----------------------------------------------------------------------------- strength (img2img)

@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_strength_matches_diffusers_get_timesteps(name, monkeypatch, tmp_path):
    """diffusers' inpaint pipeline `get_timesteps` picks the same iterations; the loop from there agrees."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint import (
        StableDiffusionInpaintPipeline,
    )

    torch_cls, flax_cls, _ = SCHEDULERS[name]
    config = {**SD_CONFIG, "skip_prk_steps": name != "pndm"}  # PNDM: the PRK warm-up, sliced like diffusers
    for n, strength in ((10, 0.3), (25, 1.0), (7, 0.5)):
        ref = torch_cls.from_config(config)
        ref.set_timesteps(n)
        pipe = type("Pipe", (), {"scheduler": ref})()
        ref_ts, _ = StableDiffusionInpaintPipeline.get_timesteps(pipe, n, strength, "cpu")
        ours = flax_cls.from_config(config)
        begin = begin_index_for_strength(n, strength, ours.order)
        state = ours.set_begin_index(ours.set_timesteps(ours.create_state(), n, SHAPE), begin)
        np.testing.assert_array_equal(
            np.asarray(state.timesteps[begin:], np.float64), ref_ts.numpy().astype(np.float64)
        )
        assert int(state.step_index) == begin
        if name == "ddim_inverse" or len(ref_ts) == 0 or n == 25:
            continue  # (the loop itself: two strengths per scheduler)
        # img2img: noise the clean sample to the first timestep, then run the remaining loop.
        ref2 = torch_cls.from_config(config)
        ref2.set_timesteps(n)
        if hasattr(ref2, "set_begin_index"):
            ref2.set_begin_index(begin)
        start = ref2.add_noise(torch.from_numpy(X_0), torch.from_numpy(NOISE), ref_ts[:1]).numpy()
        ours_start = ours.add_noise(state, jnp.asarray(X_0), jnp.asarray(NOISE), state.timesteps[begin])
        assert rel_err(ours_start, start) <= 1e-6
        with monkeypatch.context() as mp:
            assert_parity(name, config, n, mp, tmp_path, begin=begin, start=start)


def test_begin_index_for_strength_values():
    assert begin_index_for_strength(50, 1.0) == 0
    assert begin_index_for_strength(50, 0.75) == 13
    assert begin_index_for_strength(50, 0.0) == 50
    assert begin_index_for_strength(10, 0.5, order=2) == 10
    with pytest.raises(ValueError, match="strength"):
        begin_index_for_strength(50, 1.5)


# ----------------------------------------------------------------------------- jit + fori_loop

def make_sampler(sched, traces, **step_kw):
    """The pipeline's loop: one jitted program, fori_loop over iterations, begin index traced."""

    def sample(state, x, key, begin):
        traces.append(1)

        def body(i, carry):
            x, state = carry
            t = state.timesteps[i]
            out = jax_model(sched.scale_model_input(state, x, t), t)
            res = sched.step(state, out, t, x, key=jax.random.fold_in(key, i), **step_kw)
            return res.prev_sample, res.state

        state = sched.set_begin_index(state, begin)
        x, state = jax.lax.fori_loop(begin, state.timesteps.shape[0], body, (x, state))
        return x, state

    return jax.jit(sample)


JIT_CASES = [  # (name, config, step kwargs)
    ("ddim", {}, {}),
    ("ddim", {}, {"eta": 0.7}),
    ("ddim_inverse", {}, {}),
    ("ddpm", {}, {}),
    ("pndm", {"skip_prk_steps": True}, {}),
    ("pndm", {"skip_prk_steps": False}, {}),
    ("lms", {}, {}),
    ("euler", {"use_karras_sigmas": True}, {}),
    ("euler_a", {}, {}),
]


@pytest.mark.parametrize("name,extra,step_kw", JIT_CASES, ids=[f"{n}-{e}-{k}" for n, e, k in JIT_CASES])
def test_fori_loop_under_jit_matches_python_loop_and_compiles_once(name, extra, step_kw):
    sched = SCHEDULERS[name][1].from_config({**SD_CONFIG, **extra})
    state = sched.set_timesteps(sched.create_state(), 10, SHAPE)
    traces = []
    sampler = make_sampler(sched, traces, **step_kw)
    for begin, x_start in ((0, X_T), (4, X_0)):
        x_jit, state_jit = sampler(state, jnp.asarray(x_start), KEY, jnp.int32(begin))
        _, x_py, state_py = run_flax(sched, 10, begin, start=x_start, key=KEY, model=jax_model, **step_kw)
        assert rel_err(x_jit, x_py) <= 1e-5
        assert int(state_jit.step_index) == int(state_py.step_index) == state.timesteps.shape[0]
    # Reproducible with the key; stochastic steps draw new noise for a new key.
    np.testing.assert_array_equal(sampler(state, jnp.asarray(X_0), KEY, jnp.int32(4))[0], x_jit)
    other = sampler(state, jnp.asarray(X_0), jax.random.PRNGKey(7), jnp.int32(4))[0]
    assert (name in STOCHASTIC or step_kw.get("eta", 0) > 0) == (not np.array_equal(other, x_jit))
    assert len(traces) == 1, "the sampling loop retraced for a new start sample / begin index / key"
    # The scheduler object is hashable and usable as a static argument.
    static = jax.jit(lambda s, st, x: s.scale_model_input(st, x, st.timesteps[0]), static_argnums=0)
    static(sched, state, jnp.asarray(X_T))
    assert hash(sched) == hash(type(sched).from_config(sched.config))


def test_state_is_fp32_and_bf16_model_output_stays_accurate():
    """bf16 model outputs (old Flax bug: bf16 alphas round to 1) - state and math stay fp32."""
    for name, extra in (("ddim", {}), ("pndm", {"skip_prk_steps": True}), ("euler", {}), ("lms", {})):
        sched = SCHEDULERS[name][1].from_config({**SD_CONFIG, **extra})
        state = sched.set_timesteps(sched.create_state(), 25, SHAPE)
        for leaf in jax.tree.leaves(state):
            assert leaf.dtype in (jnp.float32, jnp.int32), (name, leaf.dtype)

        def bf16_model(x, t):
            return np_model(x, t).astype(jnp.bfloat16)

        _, x32, _ = run_flax(sched, 25)
        _, x16, st16 = run_flax(sched, 25, model=bf16_model)
        assert x16.dtype == np.float32 and np.isfinite(x16).all()
        assert rel_err(x16, x32) < 2e-2  # bf16 has 8 mantissa bits: ~4e-3 per value
        for leaf in jax.tree.leaves(st16):
            assert leaf.dtype in (jnp.float32, jnp.int32)
        # A bf16 sample comes back bf16, computed in fp32.
        out = sched.step(state, jnp.asarray(C, jnp.bfloat16), state.timesteps[0], jnp.asarray(X_T, jnp.bfloat16))
        assert out.prev_sample.dtype == jnp.bfloat16
        ref = sched.step(state, jnp.asarray(C, jnp.bfloat16).astype(jnp.float32), state.timesteps[0],
                         jnp.asarray(X_T, jnp.bfloat16).astype(jnp.float32))
        assert rel_err(out.prev_sample.astype(jnp.float32), ref.prev_sample) < 1e-2


# ----------------------------------------------------------------------------- stochastic schedulers

def _one_step_samples(name, extra, step_kw, shape=(4, 4, 64, 64)):
    sched = SCHEDULERS[name][1].from_config({**SD_CONFIG, **extra})
    state = sched.set_timesteps(sched.create_state(), 25, shape)
    state = sched.set_begin_index(state, 10)
    x = jnp.ones(shape) * 0.5
    out = jnp.full(shape, 0.1)
    t = state.timesteps[10]

    def draw(key):
        return np.asarray(sched.step(state, out, t, x, key=key, **step_kw).prev_sample, np.float64)

    return sched, state, draw


@pytest.mark.parametrize(
    "name,extra,step_kw",
    [("ddpm", {}, {}), ("ddpm", {"variance_type": "fixed_large"}, {}), ("euler_a", {}, {}), ("ddim", {}, {"eta": 1.0})],
)
def test_stochastic_steps_reproducible_with_right_noise_statistics(name, extra, step_kw):
    sched, state, draw = _one_step_samples(name, extra, step_kw)
    k1, k2 = jax.random.split(KEY)
    a, a_again, b = draw(k1), draw(k1), draw(k2)
    np.testing.assert_array_equal(a, a_again)  # same key, same sample
    assert not np.allclose(a, b)
    # a - b = std * (z1 - z2): mean 0, std sqrt(2) * std. The expected std comes from diffusers.
    ref = SCHEDULERS[name][0].from_config({**SD_CONFIG, **extra})
    ref.set_timesteps(25)
    t = int(ref.timesteps[10])
    if name == "ddpm":
        want = float(ref._get_variance(t)) ** 0.5  # the config's variance_type
    elif name == "ddim":
        want = step_kw["eta"] * float(ref._get_variance(t, t - 1000 // 25)) ** 0.5
    else:
        s_from, s_to = float(ref.sigmas[10]), float(ref.sigmas[11])
        want = (s_to**2 * (s_from**2 - s_to**2) / s_from**2) ** 0.5
    d = (a - b) / np.sqrt(2)
    assert abs(d.mean()) < 4 * want / np.sqrt(d.size)
    assert d.std() == pytest.approx(want, rel=0.02)
    z = (d / want).ravel()
    assert np.mean(z**4) == pytest.approx(3.0, rel=0.05)  # Gaussian kurtosis


def test_loop_noise_independent_across_steps():
    """Each iteration draws fresh noise (fold_in(key, i)); consecutive draws are uncorrelated."""
    z = np.stack([step_noise(KEY, i, (64, 64)).ravel() for i in range(4)])
    c = np.corrcoef(z)
    assert np.abs(c - np.eye(4)).max() < 0.03


# ----------------------------------------------------------------------------- config handling

@pytest.mark.parametrize("name", sorted(CONFIG_PAIRS))
def test_config_keys_and_defaults_mirror_diffusers(name):
    torch_cls, flax_cls = CONFIG_PAIRS[name]
    ref = {k: v for k, v in torch_cls().config.items() if not k.startswith("_")}
    assert flax_cls().config == ref


@pytest.mark.parametrize("name", sorted(CONFIG_PAIRS))
def test_from_config_cross_loads_any_scheduler_config(name, tmp_path):
    """Like diffusers' scheduler swapping: another class's config loads; foreign keys are ignored."""
    torch_cls, flax_cls = CONFIG_PAIRS[name]
    sources = ("PNDMScheduler", "DDIMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler",
               "UniPCMultistepScheduler")
    for source in sources:
        config = dict(getattr(diffusers, source).from_config(SD_CONFIG).config)
        ours = flax_cls.from_config(config)
        ref = torch_cls.from_config(config)
        for key, value in ours.config.items():
            # diffusers keeps a foreign null (DPM's variance_type=None), which means our default.
            assert value == ref.config[key] or ref.config[key] is None, (source, key)
    # from_pretrained reads a pipeline folder's scheduler/scheduler_config.json written by diffusers.
    torch_cls.from_config(SD_CONFIG).save_pretrained(tmp_path / "pipe" / "scheduler")
    loaded, _ = flax_cls.from_pretrained(tmp_path / "pipe", subfolder="scheduler")
    assert loaded == flax_cls.from_config(SD_CONFIG)
    # ...and diffusers reads what we save.
    loaded.save_pretrained(tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "scheduler_config.json").read_text())
    assert written["_class_name"] == torch_cls.__name__
    back = torch_cls.from_pretrained(tmp_path / "ours")
    assert {k: back.config[k] for k in loaded.config} == loaded.config


def test_sd_config_into_ddim_keeps_sd_values():
    sched = FlaxDDIMScheduler.from_config(SD_CONFIG)
    assert (sched.beta_schedule, sched.steps_offset, sched.set_alpha_to_one, sched.clip_sample) == (
        "scaled_linear", 1, False, False,
    )
    assert FlaxDDIMScheduler.from_config(SD_CONFIG, timestep_spacing="trailing").timestep_spacing == "trailing"


@pytest.mark.parametrize(
    "cls,config,match",
    [
        (FlaxDDIMScheduler, {"beta_schedule": "cosine"}, "beta_schedule='cosine'"),
        (FlaxEulerDiscreteScheduler, {"beta_schedule": "sigmoid"}, "beta_schedule"),
        (FlaxDDIMScheduler, {"prediction_type": "eps"}, "prediction_type"),
        (FlaxPNDMScheduler, {"prediction_type": "sample"}, "prediction_type"),
        (FlaxEulerAncestralDiscreteScheduler, {"prediction_type": "sample"}, "prediction_type"),
        (FlaxLMSDiscreteScheduler, {"timestep_spacing": "uniform"}, "timestep_spacing"),
        (FlaxDDPMScheduler, {"variance_type": "fixed_large_log"}, "variance_type"),
        (FlaxEulerDiscreteScheduler, {"use_exponential_sigmas": True}, "use_exponential_sigmas"),
        (FlaxEulerDiscreteScheduler, {"interpolation_type": "log_linear"}, "interpolation_type"),
        (FlaxDDIMScheduler, {"num_train_timesteps": 0}, "num_train_timesteps"),
        (FlaxDDIMScheduler, {"steps_offset": -1}, "steps_offset"),
        (FlaxDDIMScheduler, {"trained_betas": [0.1, 0.2]}, "trained_betas"),
        (FlaxDPMSolverMultistepScheduler, {"beta_schedule": "cosine"}, "beta_schedule='cosine'"),
        (FlaxUniPCMultistepScheduler, {"beta_schedule": "sigmoid"}, "beta_schedule='sigmoid'"),
        (FlaxUniPCMultistepScheduler, {"shift_terminal": 0.1}, "shift_terminal"),
    ],
)
def test_bad_configs_raise_clear_errors(cls, config, match):
    with pytest.raises(ValueError, match=match):
        cls.from_config(config)


@pytest.mark.parametrize("name", sorted(CONFIG_PAIRS))
def test_bad_step_counts_raise(name):
    sched = CONFIG_PAIRS[name][1].from_config(SD_CONFIG)
    state = sched.create_state()
    for n in (0, -3, 1001):
        with pytest.raises(ValueError, match="num_inference_steps"):
            sched.set_timesteps(state, n, SHAPE)
    with pytest.raises(ValueError, match="num_inference_steps"):
        sched.set_timesteps(state, 2.5, SHAPE)
    state = sched.set_timesteps(state, 5, SHAPE)
    with pytest.raises(ValueError, match="begin_index"):
        sched.set_begin_index(state, state.timesteps.shape[0] + 1)


def test_misuse_raises_clear_errors(tmp_path):
    inverse = FlaxDDIMInverseScheduler(timestep_spacing="linspace")  # loads, like diffusers; fails here
    with pytest.raises(ValueError, match="timestep_spacing='linspace'"):
        inverse.set_timesteps(inverse.create_state(), 10)
    with pytest.raises(ValueError, match="PRK warm-up"):
        pndm = FlaxPNDMScheduler()
        pndm.set_timesteps(pndm.create_state(), 3, SHAPE)
    x = jnp.asarray(X_T)
    ddim = FlaxDDIMScheduler()
    with pytest.raises(ValueError, match="set_timesteps"):
        ddim.step(ddim.create_state(), x, 0, x)
    state = ddim.set_timesteps(ddim.create_state(), 4)
    with pytest.raises(ValueError, match="key"):
        ddim.step(state, x, 0, x, eta=1.0)
    for cls in (FlaxDDPMScheduler, FlaxEulerAncestralDiscreteScheduler):
        s = cls()
        with pytest.raises(ValueError, match="key"):
            s.step(s.set_timesteps(s.create_state(), 4, SHAPE), x, 0, x)
    ddpm = FlaxDDPMScheduler()
    with pytest.raises(ValueError, match="does not match sample shape"):
        ddpm.step(ddpm.set_timesteps(ddpm.create_state(), 4), jnp.concatenate([x, x], 1), 0, x, key=KEY)
    with pytest.raises(TypeError, match="no config fields"):
        FlaxDDIMScheduler.from_config({}, skip_prk_steps=True)
    with pytest.raises(ValueError, match="scheduler_config.json"):
        FlaxDDIMScheduler.from_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # loading a foreign config is silent, like diffusers
        FlaxEulerDiscreteScheduler.from_config(SD_CONFIG)
