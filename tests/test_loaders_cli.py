"""The loaders through the CLI and sweep specs: --single-file/--config, --lora PATH[:WEIGHT],
--textual-inversion PATH[:TOKEN], and a sweep whose grid varies the LoRA weight with one compilation.

The CLI's images must equal the Python API's for the same loaders (within one 8-bit level: PNG
rounding of the same float images); a sweep result at a LoRA weight equals the CLI's at that weight.
"""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import tiny_loaders as tl
import tiny_sd
from flax_inpaint import FlaxStableDiffusionInpaintPipeline, cli
from flax_inpaint.loaders import options
from flax_inpaint.sweep import SweepSpec, SweepSpecError, run_sweep

STEPS = 2


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("loaders-cli")
    folder, pipe = tiny_sd.make_pipeline(root, in_channels=9)
    single = tl.write_file(tl.original_state(pipe, "sd1"), root / "model.safetensors")
    tl.write_lora(pipe, "kohya", root / "style.safetensors")
    torch.save({"string_to_param": {"*": torch.randn(2, 32, generator=torch.Generator().manual_seed(0))},
                "name": "neg"}, root / "neg.pt")
    image, mask = tiny_sd.sample_image_and_mask()
    image.save(root / "image.png")
    mask.save(root / "mask.png")
    return root, folder, single


def run_cli(*argv):
    cli.main([str(a) for a in argv])


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), np.int16)


def api_image(folder, single, loras, embeddings, prompt, negative):
    pipe, params = FlaxStableDiffusionInpaintPipeline.from_single_file(single, config=folder)
    params = options.apply(pipe, params, loras, embeddings)
    image, mask = tiny_sd.sample_image_and_mask()
    from flax_inpaint.pipelines.inputs import seed_keys

    out = pipe.inpaint([prompt], image, mask, params, seed_keys([0]), negative_prompt=[negative], height=32, width=32,
                       num_inference_steps=STEPS, guidance_scale=7.5)
    return np.asarray(out.images[0].convert("RGB"), np.int16)


def test_inpaint_with_single_file_lora_and_embedding_matches_the_api(files, tmp_path, capsys):
    root, folder, single = files
    run_cli("inpaint", "--single-file", single, "--config", folder, "--lora", f"{root / 'style.safetensors'}:0.6",
            "--textual-inversion", f"{root / 'neg.pt'}:<neg>", "--negative-prompt", "<neg>", "--image",
            root / "image.png", "--mask", root / "mask.png", "--prompt", "a red cat", "--steps", STEPS,
            "--out", tmp_path / "out", "--no-progress")
    got = pixels(tmp_path / "out" / "prompt0_seed0.png")
    expected = api_image(folder, single, [(str(root / "style.safetensors"), 0.6)], [(str(root / "neg.pt"), "<neg>")],
                         "a red cat", "<neg>")
    assert np.abs(got - expected).max() <= 1
    plain = api_image(folder, single, [], [], "a red cat", "")
    assert np.abs(expected - plain).max() > 10  # the loaders changed the image


def test_convert_single_file_writes_a_folder_that_loads(files, tmp_path, capsys):
    root, folder, single = files
    run_cli("convert", "--single-file", single, "--config", folder, "--out", tmp_path / "converted")
    assert "wrote Flax msgpack + safetensors weights" in capsys.readouterr().out
    FlaxStableDiffusionInpaintPipeline.from_pretrained(tmp_path / "converted")


@pytest.mark.parametrize("argv,message", [
    (["--model", "x", "--single-file", "y"], "give --model .* or --single-file .*, not both or neither"),
    ([], "give --model .* or --single-file .*, not both or neither"),
    (["--model", "x", "--lora", "{root}/style.safetensors:heavy"], "argument --lora: .*must be a number"),
    (["--model", "x", "--textual-inversion", "{root}/missing.pt"], "argument --textual-inversion: .*does not exist"),
    (["--single-file", "{root}/model.safetensors"], "--single-file .* could not be loaded: .*pass config="),
])
def test_errors_name_the_option(files, capsys, argv, message):
    import re

    root, folder, _ = files
    with pytest.raises(SystemExit) as exit_info:
        run_cli("inpaint", *[a.format(root=root) for a in argv], "--image", root / "image.png", "--mask",
                root / "mask.png", "--prompt", "a cat")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert "Traceback" not in err


def test_sweep_varies_lora_weight_without_recompiling(files, tmp_path):
    root, folder, single = files
    spec = {"single_file": "model.safetensors", "config": str(folder), "lora": ["style.safetensors:0.3"],
            "image": "image.png", "mask": "mask.png", "prompt": "a red cat", "steps": STEPS, "size": 32,
            "out": str(tmp_path / "sweep"), "grid": {"lora_weight": [0.0, 0.6, 1.0]}}
    (root / "spec.json").write_text(json.dumps(spec))
    summary = run_sweep(SweepSpec.from_file(root / "spec.json"), progress=False)
    assert summary.computed == 3 and list(summary.compiles.values()) == [1]
    by_weight = {r["config"]["lora_weight"]: pixels(tmp_path / "sweep" / r["file"])
                 for r in map(json.loads, (tmp_path / "sweep" / "manifest.jsonl").read_text().splitlines())}
    style = str(root / "style.safetensors")
    for weight in (0.0, 0.6):
        expected = api_image(folder, single, [(style, weight)], [], "a red cat", "")
        assert np.abs(by_weight[weight] - expected).max() <= 1
    assert np.abs(by_weight[1.0] - by_weight[0.6]).max() > 10


@pytest.mark.parametrize("update,message", [
    ({"grid": {"lora_weight": [0.5]}, "lora": []}, "lora_weight=0.5 needs the spec's 'lora' list"),
    ({"lora": ["style.safetensors:x"]}, r"lora\[0\]: .*must be a number"),
    ({"lora": ["nothere.safetensors"]}, r"lora\[0\] = .*no such file"),
    ({"model": "m", "single_file": "model.safetensors"}, "give 'model' .* or 'single_file'"),
])
def test_sweep_spec_errors(files, update, message):
    root, *_ = files
    spec = {"single_file": "model.safetensors", "image": "image.png", "mask": "mask.png", "prompt": "p", "out": "o",
            "lora": ["style.safetensors"], **update}
    with pytest.raises(SweepSpecError, match=message):
        SweepSpec.from_dict(spec, base_dir=root)
