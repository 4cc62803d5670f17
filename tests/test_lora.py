"""LoRA adapters against diffusers + peft (`load_lora_weights`, `set_adapters`, `fuse_lora(lora_scale=)`).

Random LoRAs for a tiny random inpainting pipeline's UNet and text encoder are written in each format
people share (diffusers/PEFT with adapter metadata, kohya/A1111 with alphas and LoCon convs, diffusers'
older attention-processor format). diffusers loads the same files into its PyTorch pipeline; images must
agree within 1e-3 max abs (fp32, values in [0, 1]). All adapters live in one params tree, so every
parity case below after the first runs the same compiled program.
"""
import jax
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionInpaintPipeline

import tiny_loaders as tl
import tiny_sd
from flax_inpaint import FlaxStableDiffusionInpaintPipeline
from flax_inpaint.loaders import lora
from flax_inpaint.io import CheckpointError

ATOL = 1e-3
STEPS = 3
FORMATS = ("peft", "kohya", "old")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    folder, pipe = tiny_sd.make_pipeline(root, in_channels=9)
    files = {fmt: tl.write_lora(pipe, fmt, root / f"{fmt}.safetensors", seed=k) for k, fmt in enumerate(FORMATS)}
    ours, base = FlaxStableDiffusionInpaintPipeline.from_pretrained(folder)
    params = base
    for fmt, path in files.items():
        params = ours.load_lora_weights(params, path, adapter_name=fmt)
    return folder, files, ours, base, params


def reference(folder, files, adapters=FORMATS):
    ref = StableDiffusionInpaintPipeline.from_pretrained(folder, safety_checker=None)
    for fmt in adapters:
        ref.load_lora_weights(str(files[fmt]), adapter_name=fmt)
    return ref


@pytest.fixture(scope="module")
def ref(setup):
    folder, files, *_ = setup
    return reference(folder, files)


def diffusers_images(ref, **kwargs):
    image, mask = tiny_sd.sample_image_and_mask()
    with torch.no_grad():
        return ref("a red cat", image=image, mask_image=mask, negative_prompt="blurry", height=32, width=32,
                   num_inference_steps=STEPS, guidance_scale=7.5, generator=torch.Generator().manual_seed(0),
                   output_type="np", **kwargs).images


def our_images(pipe, params, **kwargs):
    image, mask = tiny_sd.sample_image_and_mask()
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0)).numpy()
    return pipe.inpaint("a red cat", image, mask, params, jax.random.key(0), negative_prompt="blurry", height=32,
                        width=32, num_inference_steps=STEPS, guidance_scale=7.5, latents=noise,
                        output_type="np", **kwargs).images


@pytest.fixture(scope="module")
def plain(setup):
    """diffusers' images without any adapter: a LoRA must change them."""
    folder, *_ = setup
    return diffusers_images(StableDiffusionInpaintPipeline.from_pretrained(folder, safety_checker=None))


@pytest.mark.parametrize("names,weights", [
    ("peft", None),
    ("kohya", None),
    ("old", None),
    (["peft", "kohya"], [0.7, 0.4]),
    (["kohya", "old"], [{"unet": 0.5, "text_encoder": 1.5}, 0.8]),
], ids=["peft", "kohya", "old", "two-weighted", "per-component-weights"])
def test_adapters_match_diffusers(setup, ref, plain, names, weights):
    *_, ours, _, params = setup
    ref.set_adapters(names, adapter_weights=weights)
    expected = diffusers_images(ref)
    got = our_images(ours, ours.set_adapters(params, names, weights))
    assert expected.std() > 0.02
    assert np.abs(expected - plain).max() > 0.05  # the adapters matter
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)


def test_changing_adapters_and_weights_does_not_recompile(setup):
    *_, ours, _, params = setup
    our_images(ours, ours.set_adapters(params, "peft"))  # compiled (or reused) here
    with tiny_sd.count_compiles("generate") as compiles:
        for names, weights in (("kohya", 0.3), (["peft", "old"], [1.2, -0.5]), ("old", {"unet": 0.0})):
            our_images(ours, ours.set_adapters(params, names, weights))
    assert compiles == []


def test_cross_attention_scale_matches_diffusers(setup, ref):
    """cross_attention_kwargs={"scale": s} scales every active adapter, in the UNet and the text encoder
    (diffusers + PEFT: scale_lora_layers on both); a traced value, so another scale reuses the program."""
    *_, ours, _, params = setup
    ref.set_adapters(["peft", "kohya"], [0.7, 0.4])
    chosen = ours.set_adapters(params, ["peft", "kohya"], [0.7, 0.4])
    full = diffusers_images(ref)
    expected = diffusers_images(ref, cross_attention_kwargs={"scale": 0.4})
    assert np.abs(expected - full).max() > 0.05  # the scale matters
    np.testing.assert_allclose(our_images(ours, chosen, cross_attention_kwargs={"scale": 0.4}), expected,
                               atol=ATOL, rtol=0)
    with tiny_sd.count_compiles("generate") as compiles:
        our_images(ours, chosen, cross_attention_kwargs={"scale": 1.3})
    assert compiles == []


def test_fuse_and_unfuse(setup):
    folder, files, ours, base, params = setup
    ref = reference(folder, files, ("peft", "kohya"))
    ref.set_adapters(["peft", "kohya"], [0.7, 0.4])
    ref.fuse_lora(lora_scale=0.6)
    expected = diffusers_images(ref)

    chosen = ours.set_adapters(params, ["peft", "kohya"], [0.7, 0.4])
    fused = ours.fuse_lora(chosen, lora_scale=0.6)
    assert ours.get_active_adapters(fused) == ["peft", "kohya"]
    np.testing.assert_allclose(our_images(ours, fused), expected, atol=ATOL, rtol=0)

    restored = ours.unfuse_lora(fused)
    for component in ("unet", "text_encoder"):  # bit for bit
        jax.tree_util.tree_map(np.testing.assert_array_equal, restored[component], base[component])
    assert "originals" not in restored["lora"]
    without = ours.delete_adapters(restored, ["peft", "kohya", "old"])
    assert "lora" not in without and ours.get_active_adapters(without) == []


def test_loading_leaves_the_input_params_alone(setup):
    *_, ours, base, params = setup
    assert "lora" not in base and ours.get_list_adapters(base) == {}
    assert ours.get_list_adapters(params) == {"unet": list(FORMATS), "text_encoder": list(FORMATS)}
    again = ours.load_lora_weights(params, setup[1]["peft"])
    assert list(again["lora"]["adapters"]) == [*FORMATS, "default_3"]
    assert list(params["lora"]["adapters"]) == list(FORMATS)


def kernel_deltas(params, base, component):
    flat = lambda t: dict(jax.tree_util.tree_leaves_with_path(t))  # noqa: E731
    merged, orig = flat(lora.merge_adapters(params)[component]), flat(base[component])
    return {jax.tree_util.keystr(k): np.asarray(merged[k]) - np.asarray(orig[k]) for k in orig}


def test_kohya_alphas_per_module(setup, tmp_path):
    """Each kohya module scales by its own alpha / rank (LoCon files carry a conv alpha besides the linear
    one). diffusers 0.42 applies the most common alpha to every module, so the reference here is the
    definition W + alpha / rank * up @ down, computed in torch from the file's tensors."""
    folder, _, ours, base, _ = setup
    _, pipe = tiny_sd.make_pipeline(tmp_path, in_channels=9)
    conv = "down_blocks.0.resnets.0.conv1"
    path = tl.write_lora(pipe, "kohya", tmp_path / "alphas.safetensors", alphas={conv: 1.0})
    params = ours.load_lora_weights(base, path)
    tensors, _ = lora.read_lora(path)
    key = "lora_unet_" + conv.replace(".", "_")
    down, up = torch.from_numpy(tensors[f"{key}.lora_down.weight"]), torch.from_numpy(tensors[f"{key}.lora_up.weight"])
    expected = (1.0 / 4) * torch.einsum("or,rihw->oihw", up[:, :, 0, 0], down)  # torch OIHW
    got = kernel_deltas(params, base, "unet")["['down_blocks_0']['resnets_0']['conv1']['kernel']"]
    np.testing.assert_allclose(got.transpose(3, 2, 0, 1), expected.numpy(), rtol=1e-5, atol=1e-6)
    attn = "['down_blocks_0']['attentions_0']['transformer_blocks_0']['attn1']['to_q']['kernel']"
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    down, up = tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"]
    np.testing.assert_allclose(kernel_deltas(params, base, "unet")[attn].T, (2.0 / 4) * up @ down, rtol=1e-5, atol=1e-6)


def test_original_unet_names_load_like_diffusers_names(setup, tmp_path):
    """kohya names a UNet module after the original layout in some files (lora_unet_input_blocks_1_1_...):
    the single-file table maps them to the same layers."""
    from flax_inpaint.loaders import single_file as sf

    folder, files, ours, base, _ = setup
    tensors, _ = lora.read_lora(files["kohya"])
    table = sf.Layout("unet", "", "unet").key_fn(tl.torch_config(
        StableDiffusionInpaintPipeline.from_pretrained(folder, safety_checker=None).unet))
    renamed = {}
    for key, value in tensors.items():
        name, _, role = key.partition(".")
        if name.startswith("lora_unet_"):
            module = next(m for m in lora.targets(base["unet"]) if m.replace(".", "_") == name[len("lora_unet_"):])
            name = "lora_unet_" + table(module + ".weight")[0].removesuffix(".weight").replace(".", "_")
        renamed[f"{name}.{role}"] = value
    assert any(k.startswith("lora_unet_input_blocks_1_1_") for k in renamed)
    a, b = ours.load_lora_weights(base, files["kohya"]), ours.load_lora_weights(base, renamed)
    for component in ("unet", "text_encoder"):
        jax.tree_util.tree_map(np.testing.assert_array_equal, lora.merge_adapters(a)[component],
                               lora.merge_adapters(b)[component])


def test_oldest_files_without_the_unet_prefix(setup):
    """The first diffusers LoRA files (attention processors) name UNet modules without `unet.`."""
    _, files, ours, base, _ = setup
    tensors, _ = lora.read_lora(files["old"])
    unprefixed = {k.removeprefix("unet."): v for k, v in tensors.items()}
    a, b = ours.load_lora_weights(base, tensors), ours.load_lora_weights(base, unprefixed)
    for component in ("unet", "text_encoder"):
        jax.tree_util.tree_map(np.testing.assert_array_equal, lora.merge_adapters(a)[component],
                               lora.merge_adapters(b)[component])


@pytest.mark.parametrize("tensors,message", [
    ({"lora_unet_nowhere_to_q.lora_down.weight": np.ones((4, 32), np.float32),
      "lora_unet_nowhere_to_q.lora_up.weight": np.ones((32, 4), np.float32)}, "lora_unet_nowhere_to_q.lora_down"),
    ({"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": np.ones((4, 32), np.float32)},
     "SDXL LoRA"),
    ({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": np.ones((4, 2048), np.float32),
      "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight": np.ones((16, 4), np.float32)},
     r"2048-wide text embeddings \(SDXL\); this pipeline's takes 32"),
    ({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": np.ones((4, 16, 1, 1), np.float32),
      "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": np.ones((16, 3, 1, 1), np.float32)},
     r"up factor \[16, 3, 1, 1\] does not fit the down factor's rank 4"),
    ({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": np.ones((4, 24, 1, 1), np.float32),
      "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": np.ones((16, 4, 1, 1), np.float32)},
     r"do not fit the layer's weight \(Flax kernel \[1, 1, 16, 16\]\)"),
    ({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": np.ones((4, 16, 1, 1), np.float32)},
     "needs both the down"),
    ({"lora_unet_down_blocks_0_resnets_0_conv1.dora_scale": np.ones((16,), np.float32)}, "DoRA"),
])
def test_errors(setup, tensors, message):
    *_, ours, base, _ = setup
    with pytest.raises(CheckpointError, match=message):
        ours.load_lora_weights(base, tensors)


def test_api_errors(setup):
    *_, ours, _, params = setup
    with pytest.raises(ValueError, match="already loaded"):
        ours.load_lora_weights(params, setup[1]["peft"], adapter_name="peft")
    with pytest.raises(ValueError, match=r"adapters \['nope'\] are not loaded"):
        ours.set_adapters(params, ["nope"])
    with pytest.raises(ValueError, match="2 adapter_names but 3 adapter_weights"):
        ours.set_adapters(params, ["peft", "old"], [1, 2, 3])
    with pytest.raises(ValueError, match="unfuse_lora first"):
        ours.delete_adapters(ours.fuse_lora(params), "peft")


def test_bench_lora_analysis_runs():
    """benchmarks/bench_lora.py's size analysis (abstract params: no weights, no sampling) prints one JSON line."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_lora.py"
    proc = subprocess.run([sys.executable, str(script), "--preset", "tiny", "--analysis", "--steps", "2"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(proc.stdout)
    assert record["mode"] == "analysis" and record["targeted_kernels"] > 0
    assert 0 < record["merge_fraction_of_program"] < 1
