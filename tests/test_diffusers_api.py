"""diffusers 0.39's Flax public API, entry by entry, exists here with the same keywords and defaults.

tests/data/diffusers_flax_api.json is generated from the diffusers 0.39.0 wheel by
tools/diffusers_flax_reference.py (classes, methods with their keywords and defaults, dataclass fields,
class attributes, enum members). Each entry must be found where a diffusers user imports it (diffusers'
top-level names at `flax_inpaint`, `diffusers.<package>` names at `flax_inpaint.<package>`) and:
  * a method accepts every keyword diffusers' does, by the same name, at the same position when
    diffusers takes it positionally, with an equal default, and requires nothing diffusers does not;
  * a field, property or attribute exists (fields with diffusers' default where ours has one too).
The exceptions are NOT_PROVIDED below: each says why, and accessing the entry raises an error that
names what to use instead (the test checks the message). Nothing else may be missing.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import importlib
import inspect
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_inpaint import FlaxModelMixin

API_FILE = Path(__file__).parent / "data" / "diffusers_flax_api.json"
API = json.loads(API_FILE.read_text())["api"]

# Entry pattern (fnmatch over "Class", "Class.member" or "Class.method(keyword)") -> (why, what the error
# message names instead). A class's entry covers its members; a keyword's entry needs the method to take
# **kwargs, so that passing it reaches the method's own error (test_push_to_hub_options_raise).
PUSH = ("hub uploads are not done here", "upload_folder")
NOT_PROVIDED: dict[str, tuple[str, str]] = {
    "FlaxImagePipelineOutput": ("no unconditional image pipelines here", "FlaxStableDiffusionPipelineOutput"),
    "*.push_to_hub": PUSH,
    "*.save_pretrained(commit_message)": PUSH, "*.save_pretrained(private)": PUSH,
    "*.save_pretrained(create_pr)": PUSH, "*.save_pretrained(token)": PUSH, "*.save_pretrained(repo_id)": PUSH,
    "*.save_config(commit_message)": PUSH, "*.save_config(private)": PUSH, "*.save_config(create_pr)": PUSH,
    "*.save_config(token)": PUSH, "*.save_config(repo_id)": PUSH, "*.save_config(subfolder)": PUSH,
    # diffusers' config machinery, internal to its registration of __init__ arguments.
    "*.register_to_config": ("configs are fixed at construction", "from_config"),
    "*.register_for_auto_class": ("no Auto classes here", "import the class itself"),
    "*.extract_init_dict": ("config parsing is internal", "from_config"),
    "*.get_config_dict": ("deprecated in diffusers too", "load_config"),
    # hub-client download options we do not pass on.
    "*.load_config(local_dir)": ("download options", "snapshot_download"),
    "*.load_config(local_dir_use_symlinks)": ("download options", "snapshot_download"),
    "*.load_config(mirror)": ("download options", "snapshot_download"),
    "*.load_config(user_agent)": ("download options", "snapshot_download"),
    "*.load_config(dduf_entries)": ("DDUF single-file archives are not read", "snapshot_download"),
    # Pipelines: components are fixed at construction (they decide the compiled program).
    "*Pipeline.register_modules": ("components are fixed at construction", "from_pipe"),
    "*Pipeline.from_config": ("a pipeline is built from a folder", "from_pretrained"),
    "*.from_config(pretrained_model_name_or_path)": ("deprecated in diffusers: from_config takes a dict", "load_config"),
    # diffusers' checker was a transformers FlaxPreTrainedModel; ours is a linen module like every model.
    "FlaxStableDiffusionSafetyChecker.config_class": ("transformers plumbing", "apply({'params': params}, clip_input)"),
    "FlaxStableDiffusionSafetyChecker.main_input_name": ("transformers plumbing", "apply({'params': params}, clip_input)"),
    "FlaxStableDiffusionSafetyChecker.module_class": ("transformers plumbing", "apply({'params': params}, clip_input)"),
    # Variance-exploding samplers for unconditional score models, not Stable Diffusion.
    **{name: ("variance-exploding, not for Stable Diffusion", "use_karras_sigmas=True")
       for name in ("FlaxKarrasVeScheduler", "FlaxScoreSdeVeScheduler", "KarrasVeSchedulerState",
                    "ScoreSdeVeSchedulerState", "FlaxKarrasVeOutput", "FlaxSdeVeOutput")},
    # Scheduler states: one fixed-shape pytree per scheduler, read by step() through step_index.
    **{f"{state}.{name}": ("states are laid out for one jitted loop", use)
       for state in ("DDIMSchedulerState", "DDPMSchedulerState", "PNDMSchedulerState", "LMSDiscreteSchedulerState",
                     "EulerDiscreteSchedulerState", "DPMSolverMultistepSchedulerState")
       for name, use in (("common", "CommonSchedulerState.create(scheduler)"), ("create", "create_state()"))},
    "PNDMSchedulerState.prk_timesteps": ("one timesteps array", "num_prk_steps"),
    "PNDMSchedulerState.plms_timesteps": ("one timesteps array", "num_prk_steps"),
    "LMSDiscreteSchedulerState.derivatives": ("LMS history", "history"),
    "DPMSolverMultistepSchedulerState.alpha_t": ("per-iteration nodes", "nodes.alpha_t"),
    "DPMSolverMultistepSchedulerState.sigma_t": ("per-iteration nodes", "nodes.sigma_t"),
    "DPMSolverMultistepSchedulerState.lambda_t": ("per-iteration nodes", "nodes.lambda_t"),
    "DPMSolverMultistepSchedulerState.prev_timestep": ("read from timesteps", "timesteps[step_index - 1]"),
    "DPMSolverMultistepSchedulerState.cur_sample": ("multistep history", "model_outputs"),
    # Internal stages of step() (one jitted update selected by the state).
    "FlaxDPMSolverMultistepScheduler.convert_model_output": ("a stage of step()", "call step("),
    "FlaxDPMSolverMultistepScheduler.*_order_update": ("a stage of step()", "call step("),
    "FlaxPNDMScheduler.step_p*": ("a stage of step()", "step() runs"),
    "FlaxLMSDiscreteScheduler.get_lms_coefficient": ("precomputed by set_timesteps", "lms_coeffs"),
}
# Entries that exist here with another calling convention -> (why, text the class docstring explains it with).
DIFFERS: dict[str, tuple[str, str]] = {
    "FlaxStableDiffusionSafetyChecker.__init__": ("a linen module's fields", "apply({'params': params}, clip_input)"),
    "FlaxStableDiffusionSafetyChecker.__call__": ("linen: params go to apply", "apply({'params': params}, clip_input)"),
    "FlaxStableDiffusionSafetyChecker.init_weights": ("linen models' init_weights(rng)", "from_pretrained(folder)"),
}


def not_provided(entry_id: str):
    return next((v for k, v in NOT_PROVIDED.items() if fnmatch.fnmatchcase(entry_id, k)), None)


def home_modules(name: str) -> list[str]:
    """Where a diffusers user's import of `name` goes here."""
    entry = API[name]
    if "diffusers" in entry.get("exported_from", ()) or entry["module"].startswith("diffusers.utils"):
        return ["flax_inpaint"]
    package = entry["module"].split(".")[1]
    return [f"flax_inpaint.{package}", "flax_inpaint"]


def find(name: str):
    """Our object for a class or function entry (None if absent), and the modules searched."""
    homes = home_modules(name)
    for module in homes:
        obj = getattr(importlib.import_module(module), name, None)
        if obj is not None:
            return obj, homes
    return None, homes


def default_value(source: str):
    return eval(source, {"jnp": jnp, "jax": jax, "np": np, "os": os})  # noqa: S307 (the wheel's literal defaults)


def same_default(theirs: str, ours) -> bool:
    try:
        value = default_value(theirs)
    except Exception:
        return False
    if isinstance(value, (tuple, list)) and isinstance(ours, (tuple, list)):
        return tuple(value) == tuple(ours)
    return type(value) is type(ours) and value == ours or value is ours


def check_signature(entry_id: str, fn, params: list[dict]) -> list[str]:
    """Problems of `fn`'s signature against diffusers' keyword list (empty when compatible)."""
    sig = inspect.signature(fn)
    ours = [p for p in sig.parameters.values() if p.name not in ("self", "cls")]
    by_name = {p.name: p for p in ours}
    positional = [p.name for p in ours if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    problems = []
    theirs_positional = [p["name"] for p in params if p["kind"] in ("POSITIONAL_ONLY", "POSITIONAL_OR_KEYWORD")]
    takes_kwargs = any(q.kind == q.VAR_KEYWORD for q in ours)
    for p in params:
        if p["kind"] in ("VAR_POSITIONAL", "VAR_KEYWORD"):
            continue
        if not_provided(f"{entry_id}({p['name']})"):
            if not takes_kwargs and p["name"] not in by_name:
                problems.append(f"{p['name']!r} is not provided, but passing it fails without naming why (take **kwargs)")
            continue
        q = by_name.get(p["name"])
        if q is None or q.kind in (q.VAR_POSITIONAL, q.VAR_KEYWORD):
            problems.append(f"no keyword {p['name']!r}")
            continue
        if p["kind"] == "POSITIONAL_OR_KEYWORD" and "via" not in p:
            i = theirs_positional.index(p["name"])
            if i >= len(positional) or positional[i] != p["name"]:
                problems.append(f"{p['name']!r} is positional argument {i} in diffusers, not here ({positional})")
        elif q.kind == q.POSITIONAL_ONLY:
            problems.append(f"{p['name']!r} is positional-only here")
        if "default" in p:
            if q.default is inspect.Parameter.empty:
                problems.append(f"{p['name']!r} is required here; diffusers' default is {p['default']}")
            elif not same_default(p["default"], q.default):
                problems.append(f"{p['name']!r} defaults to {q.default!r} here, {p['default']} in diffusers")
    known = {p["name"] for p in params}
    for q in ours:
        if q.default is inspect.Parameter.empty and q.kind not in (q.VAR_POSITIONAL, q.VAR_KEYWORD) \
                and q.name not in known:
            problems.append(f"requires {q.name!r}, which diffusers does not take")
    return problems


def assert_names_alternative(entry_id: str, access, use: str):
    with pytest.raises((AttributeError, ImportError, NotImplementedError, TypeError)) as info:
        access()
    assert use in str(info.value), f"{entry_id}: the error does not name {use!r}: {info.value}"


@pytest.mark.parametrize("entry_id", sorted(API))
def test_entry(entry_id: str):
    entry = API[entry_id]
    owner_name, _, member = entry_id.partition(".")
    if member and not_provided(owner_name):
        return  # the class's own entry checks its error
    exception = not_provided(entry_id)
    if exception is not None and not member:
        for module in home_modules(owner_name):
            assert_names_alternative(entry_id, lambda: getattr(importlib.import_module(module), owner_name),
                                     exception[1])
        return
    owner, homes = find(owner_name)
    if exception is not None:
        assert owner is not None, f"{owner_name} is missing from {homes}"
        assert_names_alternative(entry_id, lambda: getattr(owner, member), exception[1])
        return
    if entry_id in DIFFERS:
        assert DIFFERS[entry_id][1] in owner.__doc__, f"{owner_name}'s docstring does not explain {entry_id}"
        return
    assert owner is not None, f"{owner_name} is missing from {homes}"
    if not member:
        if entry["kind"] == "function":
            problems = check_signature(entry_id, owner, entry["params"])
            assert not problems, f"{entry_id}: " + "; ".join(problems)
        return
    kind = entry["kind"]
    if kind == "field":
        fields = {f.name: f for f in dataclasses.fields(owner)} if dataclasses.is_dataclass(owner) else {}
        static = inspect.getattr_static(owner, member, None)
        if member not in fields and static is None and issubclass(owner, FlaxModelMixin):
            # A config key our model takes without a field: one that changes nothing here, or one with
            # the values we implement (diffusers' default among them).
            accepted = owner.fixed_config.get(member)
            assert member in owner.ignored_config_keys or accepted is not None, \
                f"{entry_id}: {owner_name}.from_config does not take the config key {member!r}"
            assert accepted is None or default_value(entry["default"]) in accepted, \
                f"{entry_id}: diffusers' default {entry['default']} is not among the accepted {accepted}"
            return
        assert member in fields or static is not None, f"{entry_id}: no field or attribute {member!r} on {owner}"
        field = fields.get(member)
        if "default" in entry and field is not None and field.default is not dataclasses.MISSING:
            assert same_default(entry["default"], field.default), \
                f"{entry_id}: defaults to {field.default!r} here, {entry['default']} in diffusers"
        return
    static = inspect.getattr_static(owner, member, None)
    assert static is not None, f"{entry_id}: {owner.__name__} has no {member!r}"
    if kind in ("property", "attribute", "enum_member"):
        return
    fn = getattr(owner, member)
    assert callable(fn), f"{entry_id}: {member!r} is not callable here"
    problems = check_signature(entry_id, fn, entry["params"])
    assert not problems, f"{entry_id}: " + "; ".join(problems)


def test_not_provided_patterns_are_used():
    """Every exception in NOT_PROVIDED matches some entry or keyword (no stale excuses)."""
    ids = set(API) | {f"{k}({p['name']})" for k, e in API.items() for p in e.get("params", ())}
    unused = [pattern for pattern in NOT_PROVIDED if not fnmatch.filter(ids, pattern)]
    assert not unused, f"NOT_PROVIDED patterns that match nothing: {unused}"
    assert set(DIFFERS) <= set(API)


# ------------------------------------------------------------------------------------------------
# What the walk above cannot see: the diffusers-only pieces doing what diffusers' do.

import diffusers  # noqa: E402
import torch  # noqa: E402

import tiny_sd  # noqa: E402
from flax_inpaint import (  # noqa: E402
    FlaxAutoencoderKL,
    FlaxDDIMScheduler,
    FlaxDDPMScheduler,
    FlaxDiffusionPipeline,
    FlaxKarrasDiffusionSchedulers,
    FlaxStableDiffusionImg2ImgPipeline,
    FlaxStableDiffusionInpaintPipeline,
    FlaxUNet2DConditionModel,
)
from flax_inpaint.schedulers import (  # noqa: E402
    CommonSchedulerState,
    FlaxSchedulerOutput,
    add_noise_common,
    get_velocity_common,
)

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    folder, _ = tiny_sd.make_pipeline(tmp_path_factory.mktemp("sd"), in_channels=9, scheduler="ddim")
    return folder


def test_scheduler_from_pretrained_returns_scheduler_and_state(sd_folder):
    sched, state = FlaxDDIMScheduler.from_pretrained(sd_folder, subfolder="scheduler")
    assert sched == FlaxDDIMScheduler.from_config(FlaxDDIMScheduler.load_config(sd_folder, subfolder="scheduler"))
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, state, sched.create_state()))
    assert sched.has_state and len(sched) == sched.config.num_train_timesteps == 1000
    sched2, _, unused = FlaxDDIMScheduler.from_pretrained(sd_folder, subfolder="scheduler", clip_sample=True,
                                                          return_unused_kwargs=True, something=1)
    assert sched2.clip_sample and unused == {"something": 1}
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['something'\\]"):
        FlaxDDIMScheduler.from_pretrained(sd_folder, subfolder="scheduler", something=1)
    with pytest.raises(ValueError, match="has no scheduler_config.json"):
        FlaxDDIMScheduler.from_pretrained(sd_folder)  # the pipeline folder itself: subfolder="scheduler" needed
    assert {e.name for e in FlaxKarrasDiffusionSchedulers} <= {c.__name__ for c in sched.compatibles}


def test_scheduler_step_outputs_and_dtype():
    sched = FlaxDDIMScheduler(**SD)
    state = sched.set_timesteps(sched.create_state(), 4, (1, 4, 8, 8))
    x = jax.random.normal(jax.random.key(0), (1, 4, 8, 8))
    out = sched.step(state, x, state.timesteps[0], x)
    assert isinstance(out, FlaxSchedulerOutput)
    assert out[0] is out.prev_sample and out["state"] is out.state and out.to_tuple()[:2] == (out.prev_sample, out.state)
    prev, new_state = sched.step(state, x, state.timesteps[0], x, 0.0, False)  # diffusers' positions: eta, return_dict
    np.testing.assert_array_equal(prev, out.prev_sample)
    assert int(new_state.step_index) == 1
    with pytest.raises(ValueError, match="dtype=.*bfloat16.*float32 here"):
        FlaxDDIMScheduler(dtype=jnp.bfloat16)
    assert FlaxDDIMScheduler(dtype=jnp.float32) == FlaxDDIMScheduler()
    assert "dtype" not in FlaxDDIMScheduler().config


def test_common_schedule_helpers_match_diffusers():
    """CommonSchedulerState, add_noise / get_velocity (and their *_common forms) against diffusers'
    DDPMScheduler: sqrt and products are correctly rounded float32 on both sides, but the order of the
    products may differ by an ulp, so 1e-6 relative."""
    ours, ref = FlaxDDPMScheduler(**SD), diffusers.DDPMScheduler(**SD)
    common, state = CommonSchedulerState.create(ours), ours.create_state()
    np.testing.assert_array_equal(common.alphas_cumprod, state.alphas_cumprod)
    np.testing.assert_allclose(common.betas, ref.betas.numpy(), rtol=1e-6)
    rng = np.random.default_rng(0)
    x0, noise = rng.standard_normal((2, 3, 4, 4), np.float32), rng.standard_normal((2, 3, 4, 4), np.float32)
    t = np.array([10, 900])
    v_ref = ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
    xt_ref = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
    for v in (ours.get_velocity(state, x0, noise, t), get_velocity_common(common, x0, noise, t)):
        np.testing.assert_allclose(v, v_ref, rtol=1e-6, atol=1e-6)
    for xt in (ours.add_noise(state, x0, noise, t), add_noise_common(common, x0, noise, t)):
        np.testing.assert_allclose(xt, xt_ref, rtol=1e-6, atol=1e-6)
    ours.create_state(common)  # the same schedule: accepted
    with pytest.raises(ValueError, match="another noise schedule"):
        ours.create_state(CommonSchedulerState.create(FlaxDDPMScheduler()))


def test_push_to_hub_options_raise(sd_folder, tmp_path):
    pipe, params = FlaxStableDiffusionInpaintPipeline.from_pretrained(sd_folder)
    for call in (lambda: pipe.save_pretrained(tmp_path / "p", params, push_to_hub=True),
                 lambda: pipe.unet.save_pretrained(tmp_path / "u", params["unet"], commit_message="x"),
                 lambda: pipe.scheduler.save_pretrained(tmp_path / "s", push_to_hub=True),
                 lambda: pipe.vae.save_config(tmp_path / "v", repo_id="me/vae")):
        with pytest.raises(ValueError, match="upload_folder"):
            call()
    assert not (tmp_path / "p").exists() and not (tmp_path / "u").exists()


def test_model_api(sd_folder, tmp_path):
    unet, params = FlaxUNet2DConditionModel.from_pretrained(sd_folder, jnp.bfloat16, subfolder="unet")
    assert unet.dtype == jnp.bfloat16 and unet.config.in_channels == 9 and unet.config["in_channels"] == 9
    # to_bf16 / to_fp16 / to_fp32 cast floating leaves, a mask picks which.
    p32 = unet.to_fp32(params)
    assert {x.dtype for x in jax.tree_util.tree_leaves(p32)} == {np.dtype(np.float32)}
    assert {x.dtype for x in jax.tree_util.tree_leaves(unet.to_fp16(p32))} == {np.dtype(np.float16)}
    mask = jax.tree_util.tree_map_with_path(lambda path, _: "conv_in" in jax.tree_util.keystr(path), p32)
    mixed = unet.to_bf16(p32, mask)
    assert mixed["conv_in"]["kernel"].dtype == jnp.bfloat16 and mixed["conv_out"]["kernel"].dtype == jnp.float32
    # Config files: save_config / load_config / from_config with overrides and the runtime dtype.
    unet.save_config(tmp_path / "cfg")
    config = FlaxUNet2DConditionModel.load_config(tmp_path / "cfg")
    assert config["_class_name"] == "UNet2DConditionModel" and config == json.loads(unet.to_json_string())
    other = FlaxUNet2DConditionModel.from_config(config, sample_size=16, dtype=jnp.float32)
    assert other.sample_size == 16 and other.dtype == jnp.float32
    _, unused = FlaxUNet2DConditionModel.from_config(config, return_unused_kwargs=True, foo=1)
    assert unused == {"foo": 1}
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['foo'\\]"):
        FlaxUNet2DConditionModel.from_config(config, foo=1)
    with pytest.raises(TypeError, match="load_config"):
        FlaxUNet2DConditionModel.from_config(pretrained_model_name_or_path=sd_folder)


def test_from_pt_loads_the_pytorch_weights(sd_folder, tmp_path):
    """A folder with both formats: Flax msgpack by default, PyTorch safetensors with from_pt=True."""
    vae, params = FlaxAutoencoderKL.from_pretrained(sd_folder, subfolder="vae")
    vae.save_pretrained(tmp_path / "vae", params, pytorch_format=True)
    changed = jax.tree_util.tree_map(lambda x: x + 1, params)
    vae.save_pretrained(tmp_path / "flax_only", changed)
    (tmp_path / "flax_only" / "diffusion_flax_model.msgpack").replace(tmp_path / "vae" / "diffusion_flax_model.msgpack")
    _, flax_params = FlaxAutoencoderKL.from_pretrained(tmp_path / "vae")
    _, pt_params = FlaxAutoencoderKL.from_pretrained(tmp_path / "vae", from_pt=True)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, flax_params, changed))
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, pt_params, params))


def test_vae_posterior_is_nhwc_like_diffusers_flax(sd_folder):
    """diffusers' Flax training scripts: `latent_dist.sample(rng)` is NHWC, transposed to NCHW by the user."""
    vae, params = FlaxAutoencoderKL.from_pretrained(sd_folder, subfolder="vae")
    x = jnp.zeros((2, 3, 32, 32))
    dist = vae.apply({"params": params}, x, deterministic=True, method=vae.encode).latent_dist
    latents = dist.sample(jax.random.key(0)).transpose((0, 3, 1, 2)) * vae.config.scaling_factor
    assert latents.shape == (2, 4, 8, 8)
    (decoded,) = vae.apply({"params": params}, latents / vae.config.scaling_factor, return_dict=False,
                           method=vae.decode)
    assert decoded.shape == x.shape


def test_pipeline_api(sd_folder, tmp_path):
    pipe, params = FlaxDiffusionPipeline.from_pretrained(sd_folder)  # model_index.json names the class
    assert type(pipe) is FlaxStableDiffusionInpaintPipeline
    assert pipe.config["unet"] == ["diffusers", "UNet2DConditionModel"] and pipe.config.vae[1] == "AutoencoderKL"
    img2img = FlaxStableDiffusionImg2ImgPipeline(**pipe.components)
    assert img2img.unet is pipe.unet and set(pipe.components) == set(FlaxDiffusionPipeline.component_names())
    assert [pipe.get_timestep_start(50, s) for s in (1.0, 0.75, 0.0)] == [0, 13, 50]  # diffusers: 50 - int(50 * s)
    pipe.set_progress_bar_config(disable=True)
    assert list(pipe.progress_bar(range(3))) == [0, 1, 2]
    # A component passed as an object brings no params, as in diffusers; the call says which to set.
    unet, unet_params = FlaxUNet2DConditionModel.from_pretrained(sd_folder, subfolder="unet")
    pipe2, params2 = FlaxStableDiffusionInpaintPipeline.from_pretrained(sd_folder, unet=unet)
    assert pipe2.unet is unet and "unet" not in params2
    ids, masked, masks = pipe2.prepare_inputs("a cat", *tiny_sd.sample_image_and_mask())
    with pytest.raises(ValueError, match=r"params has no \['unet'\].*set params\['unet'\]"):
        pipe2(ids, masks, masked, params2, jax.random.key(0), num_inference_steps=2)
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['controlnet'\\]"):
        FlaxStableDiffusionInpaintPipeline.from_pretrained(sd_folder, controlnet=None)
    with pytest.raises(ValueError, match="needs a unet, but .* was passed as None"):
        FlaxStableDiffusionInpaintPipeline.from_pretrained(sd_folder, unet=None)
    # save_pretrained(save_directory, params) writes a folder FlaxDiffusionPipeline loads back.
    pipe.save_pretrained(tmp_path / "saved", params)
    back, back_params = FlaxDiffusionPipeline.from_pretrained(tmp_path / "saved")
    assert type(back) is type(pipe)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, back_params["unet"], params["unet"]))
