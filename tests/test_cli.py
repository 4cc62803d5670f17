"""The `flax-inpaint` command line end to end on tiny_sd's random 9-channel model (2 steps): inpaint
(with its progress bar forced on), sweep (and its resume), convert, bench, help texts and errors that
name the argument and the fix.

`inpaint` and `sweep` sample every image with its own key jax.random.key(seed), so image k of a prompt
from `inpaint --seed s` equals the sweep's result for that prompt and seed s + k: within 1 level of
8 bits (two compiled programs, one on a device, one over the 8-device mesh).
"""
import json
import sys

import numpy as np
import pytest
from PIL import Image

import tiny_sd
from flax_inpaint import FlaxStableDiffusionInpaintPipeline, cli
from flax_inpaint.sweep import iter_manifest

STEPS = "2"


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    folder, _ = tiny_sd.make_pipeline(root, in_channels=9)
    image, mask = tiny_sd.sample_image_and_mask()
    image.save(root / "image.png")
    mask.save(root / "mask.png")
    return root, folder


def run(capsys, *argv):
    """(stdout, stderr) of a successful command."""
    cli.main([str(a) for a in argv])
    return capsys.readouterr()


def fails(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([str(a) for a in argv])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), np.int16)


def test_inpaint_and_sweep_agree_and_sweep_resumes(sd, tmp_path, capsys, monkeypatch):
    root, folder = sd
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # as on a terminal: the progress bar shows
    out, err = run(capsys, "inpaint", "--model", folder, "--image", root / "image.png", "--mask", root / "mask.png",
                   "--prompt", "a red cat", "a cat", "--batch", "2", "--seed", "3", "--steps", STEPS,
                   "--guidance", "6", "--negative-prompt", "blurry", "--out", tmp_path / "inpaint")
    assert "wrote 4 image(s)" in out
    assert "inpaint:  50%" in err and "inpaint: 100%" in err and "4/4" in err  # one batch of 2 per prompt
    assert "Loading pipeline components" in err
    names = sorted(p.name for p in (tmp_path / "inpaint").iterdir())
    assert names == ["prompt0_seed3.png", "prompt0_seed4.png", "prompt1_seed3.png", "prompt1_seed4.png"]
    a, b = pixels(tmp_path / "inpaint/prompt0_seed3.png"), pixels(tmp_path / "inpaint/prompt0_seed4.png")
    assert a.shape == (32, 32, 3) and np.abs(a - b).max() > 10  # another seed, another image

    spec = {"model": str(folder), "image": str(root / "image.png"), "mask": str(root / "mask.png"),
            "steps": int(STEPS), "guidance": 6, "negative_prompt": "blurry",
            "grid": {"prompt": ["a red cat", "a cat"], "seed": [3, 4]}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    out = run(capsys, "sweep", tmp_path / "spec.json", "--out", tmp_path / "sweep", "--no-progress").out
    assert "4 result(s)" in out and "0 found, 4 computed" in out
    records = list(iter_manifest(tmp_path / "sweep"))
    assert len(records) == 4 and (tmp_path / "sweep/contact_sheet.png").is_file()
    for r in records:
        c = r["config"]
        mine = pixels(tmp_path / "inpaint" / f"prompt{['a red cat', 'a cat'].index(c['prompt'])}_seed{c['seed']}.png")
        assert np.abs(pixels(tmp_path / "sweep" / r["file"]) - mine).max() <= 1, c

    out = run(capsys, "sweep", tmp_path / "spec.json", "--out", tmp_path / "sweep", "--no-progress").out
    assert "4 found, 0 computed" in out and len(list(iter_manifest(tmp_path / "sweep"))) == 4


def test_inpaint_scheduler_and_overlay_errors(sd, tmp_path, capsys):
    root, folder = sd
    common = ["inpaint", "--model", folder, "--image", root / "image.png", "--mask", root / "mask.png",
              "--prompt", "a cat", "--steps", STEPS, "--out", tmp_path]
    err = fails(capsys, *common, "--scheduler", "FancyScheduler")
    assert "Scheduler 'FancyScheduler' is not supported; supported: [" in err and "'DDIMScheduler'" in err
    err = fails(capsys, *common, "--overlay", "--size", "16")
    assert "--overlay pastes the unmasked pixels of --image back" in err and "is 16x16" in err
    assert not list(tmp_path.iterdir())


def test_convert_caches_msgpack_and_writes_a_loadable_folder(sd, tmp_path, capsys, monkeypatch):
    _, folder = sd
    monkeypatch.setenv("FLAX_INPAINT_CACHE", str(tmp_path / "cache"))
    out = run(capsys, "convert", "--model", folder, "--out", tmp_path / "flax").out
    assert str(tmp_path / "cache") in out
    cached = sorted(p.name.split("-")[0] for p in (tmp_path / "cache").glob("*.msgpack"))
    assert cached == ["FlaxAutoencoderKL", "FlaxCLIPTextModel", "FlaxUNet2DConditionModel"]
    assert list((tmp_path / "flax" / "unet").glob("*.msgpack"))
    a = FlaxStableDiffusionInpaintPipeline.from_pretrained(folder)[1]
    b = FlaxStableDiffusionInpaintPipeline.from_pretrained(tmp_path / "flax")[1]
    import jax

    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_bench_passes_its_arguments_to_the_script(tmp_path, capsys):
    script = tmp_path / "bench.py"
    script.write_text("def main(argv):\n    print('ARGS', argv)\n    return 3\n")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--script", str(script), "--preset", "tiny", "--batch", "1", "--steps", "2"])
    assert exit_info.value.code == 3
    assert "ARGS ['--preset', 'tiny', '--batch', '1', '--steps', '2']" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:  # the real script's own help
        cli.main(["bench", "--help"])
    assert exit_info.value.code == 0 and "--preset" in capsys.readouterr().out
    err = fails(capsys, "bench", "--script", tmp_path / "missing.py")
    assert "pass --script PATH/TO/bench_inpaint.py" in err


def test_help_reads_well(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    for command in ("demo", "inpaint", "sweep", "convert", "bench", "examples:"):
        assert command in text
    with pytest.raises(SystemExit):
        cli.main(["sweep", "--help"])
    text = capsys.readouterr().out
    assert "resumes" in text or "computes only what is missing" in text
    assert "(default: None)" not in text


@pytest.mark.parametrize("argv,message", [
    (["inpaint", "--model", "m", "--image", "i", "--mask", "k", "--prompt", "p", "--strength", "1.5"],
     "argument --strength: must lie in [0, 1], got 1.5"),
    (["inpaint", "--model", "m", "--image", "i", "--mask", "k", "--prompt", "p", "--steps", "0"],
     "argument --steps: must be > 0, got 0"),
    (["inpaint", "--model", "m", "--image", "i", "--mask", "k", "--prompt", "p", "--size", "20"],
     "argument --size: must be a multiple of 8, got 20"),
    (["inpaint", "--model", "m", "--image", "nope.png", "--mask", "k", "--prompt", "p"],
     "--image 'nope.png' does not exist; pass the path of a PNG/JPEG file."),
    (["sweep", "nope.json"], "sweep spec 'nope.json' does not exist"),
    (["sweep", "s.json", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_errors_name_the_argument(capsys, argv, message):
    assert message in fails(capsys, *argv)


@pytest.mark.parametrize("model,reason", [
    ("./no/such/folder", "'./no/such/folder' does not exist as a local folder"),
    ("nobody/not-a-model", "'nobody/not-a-model' is not a local folder, and as a hub repo id it could not be "
                           "fetched (local_files_only=False): LocalEntryNotFoundError: "),  # conftest: HF_HUB_OFFLINE
], ids=["missing-folder", "unfetchable-hub-id"])
@pytest.mark.parametrize("command", ["inpaint", "sweep", "convert"])
def test_model_errors_name_the_option_and_the_fix(sd, tmp_path, capsys, command, model, reason):
    root, _ = sd
    images = {"image": str(root / "image.png"), "mask": str(root / "mask.png")}
    if command == "sweep":
        (tmp_path / "s.json").write_text(json.dumps({"model": model, "prompt": "p", **images}))
        argv, option = ["sweep", tmp_path / "s.json", "--out", tmp_path / "out"], "sweep spec 'model'"
    else:
        argv, option = [command, "--model", model], "--model"
        if command == "inpaint":
            argv += ["--image", images["image"], "--mask", images["mask"], "--prompt", "p", "--out", tmp_path / "out"]
    err = fails(capsys, *argv)
    assert f"error: {option} {model!r} could not be loaded: {reason}" in err
    assert (f"\nFix {option}: name a local diffusers inpainting folder (the one holding model_index.json) or a hub "
            "repo id 'org/name' that is in the local hub cache or reachable online.") in err
    assert "Traceback" not in err


def test_sweep_spec_errors_and_yaml_without_pyyaml(sd, tmp_path, capsys, monkeypatch):
    _, folder = sd
    (tmp_path / "s.json").write_text(json.dumps({"model": str(folder), "out": "o", "grid": {"steps": [0]}}))
    assert "grid.steps[0] = 0: steps must be an int >= 1" in fails(capsys, "sweep", tmp_path / "s.json")
    (tmp_path / "s.yaml").write_text("model: m\n")
    monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml -> ImportError
    assert "needs PyYAML: `pip install pyyaml`, or write the spec as .json" in fails(capsys, "sweep",
                                                                                    tmp_path / "s.yaml")
