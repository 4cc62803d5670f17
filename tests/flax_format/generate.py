"""Make the Flax-format test fixtures with the last Flax releases of diffusers and transformers.

    python tests/flax_format/generate.py [--venv DIR]

Run it with an interpreter that has flax_inpaint installed (the project's venv). It creates (or reuses)
a throwaway venv at DIR with the reference stack below (diffusers 0.39 is the last release with Flax and
cannot be installed beside the diffusers the tests use), and then:

1. build (in the throwaway venv): tiny random PyTorch models, their weights rounded to float16 values, are
   converted by diffusers'/transformers' own `from_pretrained(from_pt=True)` (the script checks that the
   conversion filled every parameter, and prints how far each Flax model is from its PyTorch twin) and saved
   with their Flax `save_pretrained(params=...)`, next to the PyTorch weights for the reference comparison:

     sd-inpaint-flax/      FlaxStableDiffusionInpaintPipeline.save_pretrained(params=...): UNet, VAE
                           (diffusion_flax_model.msgpack), CLIP text encoder, safety checker
                           (flax_model.msgpack), tokenizer, feature extractor, FlaxPNDMScheduler
     sd-inpaint-pytorch/   the same pipeline saved by PyTorch (float16 safetensors: the values are
                           float16 numbers, so float16 storage is exact and half the size)
     controlnet-flax/      FlaxControlNetModel.save_pretrained(params=...) (linear projections, one block)
     controlnet-pytorch/

2. resave (here, with flax_inpaint): every Flax folder is loaded through our public API and written back
   with our `save_pretrained(params=...)` into a temporary folder.
3. verify (in the throwaway venv): diffusers' and transformers' Flax `from_pretrained` load what we wrote;
   every parameter tree must equal the fixture's, key for key and value for value.

diffusers' Flax UNet and ControlNet use 32 GroupNorm groups, hence channels of 32; the ControlNet's
conditioning embedding has four stages because diffusers' Flax `init_weights` assumes three downsamplings.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import venv
from pathlib import Path

HERE = Path(__file__).resolve().parent
REFERENCE_STACK = ["torch==2.13.0", "diffusers==0.39.0", "transformers==4.57.6", "jax==0.6.2", "flax==0.10.7"]
TOKENIZER = HERE.parents[1] / "flax_inpaint" / "assets" / "tiny-shapes-inpaint" / "tokenizer"
SIZE = 32  # pixels of the pipeline's images and of the safety checker's CLIP input
PIPELINE, CONTROLNET = "sd-inpaint", "controlnet"
COMPONENTS = ("unet", "vae", "text_encoder", "safety_checker")  # the pipeline's models
FOLDERS = [f"{name}-{kind}" for name in (PIPELINE, CONTROLNET) for kind in ("flax", "pytorch")]


# ----------------------------------------------------------------------------- 1. build (reference stack)

def _fp16_exact(model):
    """Round every weight to a float16 value (kept in float32), so float16 files store it exactly."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    return model.eval()


def _torch_models():
    import torch
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPTextConfig, CLIPTextModel, CLIPTokenizerFast

    torch.manual_seed(0)
    tokenizer = CLIPTokenizerFast.from_pretrained(TOKENIZER)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=9, out_channels=4, layers_per_block=1, block_out_channels=(32, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        norm_num_groups=4, sample_size=SIZE,
    )
    with torch.no_grad():  # a near-deterministic posterior (logvar = -30), so posterior samples are the mean
        vae.quant_conv.weight[4:] = 0
        vae.quant_conv.bias[4:] = -30
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length, hidden_act="quick_gelu", pad_token_id=1,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    ))
    tower = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2)
    checker = StableDiffusionSafetyChecker(CLIPConfig(
        text_config=dict(vocab_size=100, **tower), projection_dim=16,
        vision_config=dict(image_size=SIZE, patch_size=8, hidden_act="quick_gelu", **tower),
    ))
    with torch.no_grad():  # concept directions and thresholds that flag some images and pass others
        checker.concept_embeds.normal_()
        checker.special_care_embeds.normal_()
        checker.concept_embeds_weights.uniform_(0.2, 0.6)
        checker.special_care_embeds_weights.uniform_(0.2, 0.6)
    controlnet = ControlNetModel(
        in_channels=4, layers_per_block=1, block_out_channels=(32,), down_block_types=("CrossAttnDownBlock2D",),
        cross_attention_dim=32, attention_head_dim=4, use_linear_projection=True,
        conditioning_embedding_out_channels=(4, 8, 8, 16),
    )
    with torch.no_grad():  # torch's default init for the zero convolutions, so the residuals are not zero
        for conv in (*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                     controlnet.controlnet_cond_embedding.conv_out):
            conv.reset_parameters()
    models = dict(unet=unet, vae=vae, text_encoder=text_encoder, safety_checker=checker, controlnet=controlnet)
    return {k: _fp16_exact(m) for k, m in models.items()}, tokenizer


def _flax_twin(name, torch_model, tmp: Path):
    """(Flax model, params) converted by diffusers'/transformers' own from_pt, checked to be complete."""
    import jax
    from diffusers import FlaxAutoencoderKL, FlaxControlNetModel, FlaxUNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.safety_checker_flax import FlaxStableDiffusionSafetyChecker
    from flax.traverse_util import flatten_dict
    from transformers import FlaxCLIPTextModel

    folder = tmp / name
    torch_model.save_pretrained(folder, safe_serialization=False)  # from_pt reads the pickled .bin
    if name in ("text_encoder", "safety_checker"):
        cls = FlaxCLIPTextModel if name == "text_encoder" else FlaxStableDiffusionSafetyChecker
        kwargs = {"input_shape": (1, SIZE, SIZE, 3)} if name == "safety_checker" else {}
        model = cls.from_pretrained(folder, from_pt=True, **kwargs)
        params, required = model.params, model.required_params
    else:
        cls = dict(unet=FlaxUNet2DConditionModel, vae=FlaxAutoencoderKL, controlnet=FlaxControlNetModel)[name]
        small = {"sample_size": 4} if name == "controlnet" else {}  # init_weights' input: 8x that in pixels
        model, params = cls.from_pretrained(folder, from_pt=True, **small)
        required = set(flatten_dict(jax.eval_shape(model.init_weights, jax.random.PRNGKey(0))))
    got = set(flatten_dict(params))
    if got != required:
        raise SystemExit(f"{name}: diffusers/transformers left {sorted(required - got)} unfilled and "
                         f"{sorted(got - required)} unused")
    return model, params


def _twin_distance(name, torch_model, flax_model, params) -> float:
    """Max abs difference of the Flax and PyTorch models on one random input (a sanity check of the fixture)."""
    import jax.numpy as jnp
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    t = np.array([3, 500])
    with torch.no_grad():
        if name == "unet":
            x, ctx = rng.standard_normal((2, 9, 8, 8), np.float32), rng.standard_normal((2, 16, 32), np.float32)
            ref = torch_model(torch.tensor(x), torch.tensor(t), torch.tensor(ctx)).sample.numpy()
            out = flax_model.apply({"params": params}, x, jnp.asarray(t), ctx).sample
        elif name == "controlnet":
            x, ctx = rng.standard_normal((2, 4, 8, 8), np.float32), rng.standard_normal((2, 16, 32), np.float32)
            cond = rng.random((2, 3, 64, 64), np.float32)
            ref = torch_model(torch.tensor(x), torch.tensor(t), torch.tensor(ctx), torch.tensor(cond))
            ref = ref.mid_block_res_sample.numpy()
            out = flax_model.apply({"params": params}, x, jnp.asarray(t), ctx, cond).mid_block_res_sample
            out = np.asarray(out).transpose(0, 3, 1, 2)  # diffusers' Flax ControlNet returns NHWC residuals
        elif name == "vae":
            z = rng.standard_normal((2, 4, 8, 8), np.float32)
            ref = torch_model.decode(torch.tensor(z)).sample.numpy()
            out = flax_model.apply({"params": params}, z, method=flax_model.decode).sample
        elif name == "text_encoder":
            ids = rng.integers(0, 500, (2, 16))
            ref = torch_model(torch.tensor(ids)).last_hidden_state.numpy()
            out = flax_model(ids, params=params).last_hidden_state
        else:
            pixels = rng.standard_normal((2, 3, SIZE, SIZE), np.float32)
            ref = torch_model.visual_projection(torch_model.vision_model(torch.tensor(pixels))[1]).numpy()
            out = flax_model.module.apply({"params": params}, pixels.transpose(0, 2, 3, 1),
                                          method=lambda m, x: m.visual_projection(m.vision_model(x)[1]))
    return float(np.abs(np.asarray(out) - ref).max())


def build(out: Path) -> None:
    import torch
    from diffusers import (
        FlaxPNDMScheduler, FlaxStableDiffusionInpaintPipeline, PNDMScheduler, StableDiffusionInpaintPipeline,
    )
    from transformers import CLIPImageProcessor

    models, tokenizer = _torch_models()
    feature_extractor = CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                              skip_prk_steps=True, set_alpha_to_one=False)
    flax, params = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in models.items():
            flax[name], params[name] = _flax_twin(name, model, Path(tmp))
            print(f"  {name}: {sum(p.numel() for p in model.parameters())} parameters; diffusers/transformers Flax "
                  f"vs PyTorch max abs {_twin_distance(name, model, flax[name], params[name]):.2e}")

    flax_pipe = FlaxStableDiffusionInpaintPipeline(
        vae=flax["vae"], text_encoder=flax["text_encoder"], tokenizer=tokenizer, unet=flax["unet"],
        scheduler=FlaxPNDMScheduler.from_config(scheduler.config), safety_checker=flax["safety_checker"],
        feature_extractor=feature_extractor,
    )
    flax_pipe.save_pretrained(out / f"{PIPELINE}-flax", params={k: params[k] for k in COMPONENTS})
    flax["controlnet"].save_pretrained(out / f"{CONTROLNET}-flax", params=params["controlnet"])

    torch_pipe = StableDiffusionInpaintPipeline(
        vae=models["vae"], text_encoder=models["text_encoder"], tokenizer=tokenizer, unet=models["unet"],
        scheduler=scheduler, safety_checker=models["safety_checker"], feature_extractor=feature_extractor,
    )
    torch_pipe.to(torch.float16).save_pretrained(out / f"{PIPELINE}-pytorch")
    models["controlnet"].half().save_pretrained(out / f"{CONTROLNET}-pytorch")


# ----------------------------------------------------------------------------- 2. resave (flax_inpaint)

def resave(out: Path, saved: Path) -> None:
    from flax_inpaint import FlaxControlNetModel, FlaxStableDiffusionInpaintPipeline

    pipe, params = FlaxStableDiffusionInpaintPipeline.from_pretrained(out / f"{PIPELINE}-flax")
    pipe.save_pretrained(saved / PIPELINE, params)
    for name in COMPONENTS:
        getattr(pipe, name).save_pretrained(saved / name, params[name])
    net, net_params = FlaxControlNetModel.from_pretrained(out / f"{CONTROLNET}-flax")
    net.save_pretrained(saved / CONTROLNET, net_params)


# ----------------------------------------------------------------------------- 3. verify (reference stack)

def _same_tree(what: str, got, want) -> None:
    import numpy as np
    from flax.traverse_util import flatten_dict

    got, want = flatten_dict(got), flatten_dict(want)
    if set(got) != set(want):
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        raise SystemExit(f"{what}: missing {missing[:5]}, extra {extra[:5]}")
    for k in want:
        if not np.array_equal(np.asarray(got[k], np.float32), np.asarray(want[k], np.float32)):
            raise SystemExit(f"{what}: {'/'.join(k)} differs")
    print(f"  {what}: {len(want)} arrays, all equal to the fixture's")


def verify(out: Path, saved: Path) -> None:
    from diffusers import (
        FlaxAutoencoderKL, FlaxControlNetModel, FlaxStableDiffusionInpaintPipeline, FlaxUNet2DConditionModel,
    )
    from diffusers.pipelines.stable_diffusion.safety_checker_flax import FlaxStableDiffusionSafetyChecker
    from transformers import FlaxCLIPTextModel

    # diffusers' pipeline loader initialises a safety checker for 224-pixel images (its own fixture's
    # included), so the 32-pixel checker is loaded on its own.
    def checker(folder):
        return FlaxStableDiffusionSafetyChecker.from_pretrained(folder, input_shape=(1, SIZE, SIZE, 3)).params

    want_pipe, want = FlaxStableDiffusionInpaintPipeline.from_pretrained(out / f"{PIPELINE}-flax", safety_checker=None)
    want["safety_checker"] = checker(out / f"{PIPELINE}-flax" / "safety_checker")
    pipe, got = FlaxStableDiffusionInpaintPipeline.from_pretrained(saved / PIPELINE, safety_checker=None)
    ids = [pipe.tokenizer(text).input_ids for text in ("a red cat", "red, a cat")]
    if ids != [want_pipe.tokenizer(text).input_ids for text in ("a red cat", "red, a cat")]:
        raise SystemExit(f"our pipeline folder's tokenizer ({type(pipe.tokenizer).__name__}) tokenizes differently")
    print(f"  tokenizer of our pipeline folder, loaded by diffusers (Flax) as {type(pipe.tokenizer).__name__}: "
          "the same token ids")
    got["safety_checker"] = checker(saved / PIPELINE / "safety_checker")
    for name in COMPONENTS:
        _same_tree(f"{name} of our pipeline folder, loaded by diffusers (Flax)", got[name], want[name])
    _same_tree("FlaxUNet2DConditionModel.from_pretrained(our unet folder)",
               FlaxUNet2DConditionModel.from_pretrained(saved / "unet")[1], want["unet"])
    _same_tree("FlaxAutoencoderKL.from_pretrained(our vae folder)", FlaxAutoencoderKL.from_pretrained(saved / "vae")[1],
               want["vae"])
    _same_tree("FlaxCLIPTextModel.from_pretrained(our text_encoder folder)",
               FlaxCLIPTextModel.from_pretrained(saved / "text_encoder").params, want["text_encoder"])
    _same_tree("FlaxStableDiffusionSafetyChecker.from_pretrained(our safety_checker folder)",
               checker(saved / "safety_checker"), want["safety_checker"])
    _same_tree("FlaxControlNetModel.from_pretrained(our controlnet folder)",
               FlaxControlNetModel.from_pretrained(saved / CONTROLNET)[1],
               FlaxControlNetModel.from_pretrained(out / f"{CONTROLNET}-flax")[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, help="the throwaway venv, created if missing (default: a temporary one)")
    parser.add_argument("--stage", choices=["build", "verify"], help=argparse.SUPPRESS)
    parser.add_argument("--saved", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage is None:
        import flax_inpaint  # noqa: F401  (step 2 runs here: fail now, not after the build)
    if args.stage == "build":
        return build(HERE)
    if args.stage == "verify":
        return verify(HERE, args.saved)
    with tempfile.TemporaryDirectory() as tmp:
        python = (args.venv or Path(tmp) / "venv") / "bin" / "python"
        if not python.exists():
            venv.create(python.parents[1], with_pip=True)
            subprocess.run([python, "-m", "pip", "install", "-q", *REFERENCE_STACK], check=True)
        for old in FOLDERS:
            shutil.rmtree(HERE / old, ignore_errors=True)
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        print("1. build: the reference stack writes the fixtures")
        subprocess.run([python, __file__, "--stage", "build"], check=True, env=env)
        print("2. resave: flax_inpaint loads them and saves them again")
        resave(HERE, Path(tmp) / "saved")
        print("3. verify: the reference stack loads what flax_inpaint saved")
        subprocess.run([python, __file__, "--stage", "verify", "--saved", Path(tmp) / "saved"], check=True, env=env)


if __name__ == "__main__":
    main()
