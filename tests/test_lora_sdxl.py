"""SDXL LoRAs against diffusers + peft: StableDiffusionXLPipeline.load_lora_weights, then fuse_lora(lora_scale=)
on the UNet and both text encoders.

Random LoRAs for a tiny random SDXL pipeline are written as diffusers/PEFT files (`unet.`, `text_encoder.`,
`text_encoder_2.`, with adapter metadata) and kohya files (`lora_unet_` with the original UNet's names,
`lora_te1_`, `lora_te2_`, alphas, LoCon convs). The pipeline-level methods are exercised on a bare
LoraLoaderMixin with SDXL params (the SDXL pipeline classes inherit them). Fused weights must match
diffusers' to 1e-5 (fp32 rounding of W + s * B @ A, summed in another order); UNet and text-encoder outputs
to 1e-4 max abs (the same math in another framework; outputs are O(1)).
"""
import jax
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline

import tiny_loaders as tl
import tiny_sd
from flax_inpaint import FlaxCLIPTextModel, FlaxCLIPTextModelWithProjection, FlaxUNet2DConditionModel
from flax_inpaint.io import CheckpointError
from flax_inpaint.loaders.lora import LoraLoaderMixin, merge_adapters
from flax_inpaint.models.conversion import to_torch_state_dict

TOL, WEIGHT_TOL = 1e-4, 1e-5
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
FORMATS = ("peft", "kohya")
LOADERS = {"unet": FlaxUNet2DConditionModel, "text_encoder": FlaxCLIPTextModel,
           "text_encoder_2": FlaxCLIPTextModelWithProjection}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-sdxl")
    folder, pipe = tl.make_sdxl(root, "base")
    files = {fmt: tl.write_lora(pipe, fmt, root / f"{fmt}.safetensors", seed=k) for k, fmt in enumerate(FORMATS)}
    models, base = {}, {}
    for name, cls in LOADERS.items():
        models[name], base[name] = cls.from_pretrained(folder / name)
    ids = np.asarray(pipe.tokenizer_2(["a red cat", "cat"], padding="max_length").input_ids)
    rng = np.random.default_rng(0)
    inputs = (rng.standard_normal((2, 4, 8, 8), np.float32), np.array([3, 951]),
              rng.standard_normal((2, 7, models["unet"].cross_attention_dim), np.float32),
              {"text_embeds": rng.standard_normal((2, tl.POOLED), np.float32),
               "time_ids": rng.uniform(0, 128, (2, 6)).astype(np.float32)}, ids)

    @jax.jit
    def ours(params):  # one program for every params below (fused, merged): compiled once
        x, t, ctx, added, ids = inputs
        out = [models["unet"].apply({"params": params["unet"]}, x, t, ctx, added).sample]
        for name in COMPONENTS[1:]:
            hidden = models[name].apply({"params": params[name]}, ids, output_hidden_states=True)
            out.append(hidden.hidden_states[-2])
        return out + [hidden.text_embeds]

    return folder, files, (inputs, ours), base


def outputs(run, params, ref=None):
    """(UNet output, text encoders' penultimate hidden states, text_embeds) of ours, or of the torch `ref`."""
    (x, t, ctx, added, ids), ours = run
    if ref is None:
        return ours({c: params[c] for c in COMPONENTS})
    with torch.no_grad():
        out = [ref.unet(torch.tensor(x), torch.tensor(t), torch.tensor(ctx),
                        added_cond_kwargs={k: torch.tensor(v) for k, v in added.items()}).sample.numpy()]
        for name in COMPONENTS[1:]:
            hidden = getattr(ref, name)(torch.tensor(ids), output_hidden_states=True)
            out.append(hidden.hidden_states[-2].numpy())
    return out + [hidden.text_embeds.numpy()]


@pytest.mark.parametrize("formats,weights", [("peft", None), (("kohya", "peft"), [0.7, -0.4])],
                         ids=["peft", "kohya-and-peft-weighted"])
def test_sdxl_lora_fuses_like_diffusers(setup, formats, weights):
    folder, files, run, base = setup
    formats = [formats] if isinstance(formats, str) else list(formats)
    ref = StableDiffusionXLPipeline.from_pretrained(folder)
    plain = outputs(run, base, ref)
    loader, params = LoraLoaderMixin(), base
    for fmt in formats:
        ref.load_lora_weights(str(files[fmt]), adapter_name=fmt)
        params = loader.load_lora_weights(params, files[fmt], adapter_name=fmt)
    assert loader.get_list_adapters(params) == {c: formats for c in COMPONENTS}
    ref.set_adapters(formats, adapter_weights=weights)
    params = loader.set_adapters(params, formats, weights)
    ref.fuse_lora(lora_scale=0.6, components=list(COMPONENTS))
    ref.unload_lora_weights()  # the fused weights stay; the adapter layers go
    fused = loader.fuse_lora(params, lora_scale=0.6)
    for name in COMPONENTS:
        got, want = to_torch_state_dict(fused[name]), tl.diffusers_state(getattr(ref, name))
        assert set(got) == set(want), name
        for key in want:
            np.testing.assert_allclose(got[key], want[key], atol=WEIGHT_TOL, rtol=0, err_msg=f"{name}: {key}")
    expected = outputs(run, base, ref)
    for want, before in zip(expected, plain):
        assert np.abs(want - before).max() > 1e-2  # the LoRA changes every output
    for got, want in zip(outputs(run, fused), expected):
        np.testing.assert_allclose(np.asarray(got), want, atol=TOL, rtol=0)
    # Unfused, the adapters merge inside the program (scaled like fuse_lora's lora_scale) to the same outputs.
    for got, want in zip(outputs(run, merge_adapters(params, np.float32(0.6))), expected):
        np.testing.assert_allclose(np.asarray(got), want, atol=TOL, rtol=0)
    restored = loader.unfuse_lora(fused)
    for name in COMPONENTS:  # bit for bit
        jax.tree_util.tree_map(np.testing.assert_array_equal, restored[name], base[name])


def test_lora_for_another_architecture_names_both(setup, tmp_path):
    _, files, _, base = setup
    loader = LoraLoaderMixin()
    sd15 = {"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight":
            np.ones((4, 768), np.float32),
            "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight":
            np.ones((32, 4), np.float32)}
    with pytest.raises(CheckpointError, match=r"768-wide text embeddings \(Stable Diffusion 1.x\); this pipeline's "
                                              r"takes 40 \(SDXL\)"):
        loader.load_lora_weights(base, sd15)
    sd_folder, _ = tiny_sd.make_pipeline(tmp_path, in_channels=9)
    sd_params = {name: LOADERS[name].from_pretrained(sd_folder / name)[1] for name in COMPONENTS[:2]}
    with pytest.raises(CheckpointError, match=r"This is an SDXL LoRA .* this pipeline is Stable Diffusion 1.x/2.x"):
        loader.load_lora_weights(sd_params, files["peft"])
