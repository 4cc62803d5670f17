"""The `flax-inpaint` command line end to end on tiny_sd's random 9-channel model (2 steps): inpaint
(with its progress bar forced on), sweep (and its resume), convert, bench, help texts; every error path
ends in one line naming the option and the fix, with no traceback and no file written; Ctrl-C and
SIGTERM stop cleanly; without PyTorch nothing but our own output shows; a second sweep on a folder is
refused while the first runs, and a SIGKILLed one does not block the next run, which resumes.

`inpaint` and `sweep` sample every image with its own key jax.random.key(seed), so image k of a prompt
from `inpaint --seed s` equals the sweep's result for that prompt and seed s + k: within 1 level of
8 bits (two compiled programs, one on a device, one over the 8-device mesh).
"""
import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from PIL import Image

import tiny_sd
import flax_inpaint.io as checkpoint_io
from flax_inpaint import FlaxStableDiffusionControlNetImg2ImgPipeline, FlaxStableDiffusionInpaintPipeline, cli
from flax_inpaint.pipelines.inputs import seed_keys
from flax_inpaint.sweep import LOCK, ResultStore, iter_manifest

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


def fails(capsys, *argv, code: int = 2) -> str:
    """stderr of a command that must fail with exit status `code` and no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == code, err
    assert "Traceback" not in err
    return err


def last_line(err: str) -> str:
    return err.strip().splitlines()[-1]


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


def test_inpaint_step_bar_and_previews(sd, tmp_path, capsys, monkeypatch):
    """On a terminal each call gets a per-step bar; --preview writes a PNG per image and step (PNDM: 2 steps
    are 3 loop iterations)."""
    root, folder = sd
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    _, err = run(capsys, "inpaint", "--model", folder, "--image", root / "image.png", "--mask", root / "mask.png",
                 "--prompt", "a red cat", "a cat", "--steps", STEPS, "--out", tmp_path / "out",
                 "--preview", tmp_path / "previews", "--preview-every", "1")
    assert "batch 1:" in err and "batch 2:" in err and "0/3 " in err  # tqdm redraws at most every 0.1 s
    assert sorted(p.name for p in (tmp_path / "previews").iterdir()) == [
        f"batch{b}_000-step{s:03d}.png" for b in (1, 2) for s in range(3)]


def test_inpaint_vae_previews(sd, tmp_path, capsys):
    """--preview-vae writes the VAE's decode at the output size every --preview-every steps (PNDM: 2 steps
    are loop steps 0-2); without --preview it is one clear error before any model loads."""
    root, folder = sd
    common = ["inpaint", "--model", folder, "--image", root / "image.png", "--mask", root / "mask.png",
              "--prompt", "a red cat", "--steps", STEPS, "--out", tmp_path / "out", "--no-progress"]
    run(capsys, *common, "--preview", tmp_path / "previews", "--preview-every", "2", "--preview-vae")
    previews = sorted((tmp_path / "previews").iterdir())
    assert [p.name for p in previews] == ["batch1_000-step000.png", "batch1_000-step002.png"]
    assert Image.open(previews[0]).size == Image.open(tmp_path / "out" / "prompt0_seed0.png").size
    err = fails(capsys, *common, "--preview-vae")
    assert "--preview-vae decodes the previews of --preview DIR" in err


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
    for command in ("demo", "inpaint", "img2img", "sweep", "convert", "bench", "examples:"):
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
    (["inpaint", "--model", "m", "--image", "i", "--mask", "k", "--prompt", "p", "--size", "0"],
     "argument --size: must be > 0, got 0"),  # the model's VAE factor: test_size_is_checked_against_the_vae
    (["inpaint", "--model", "m", "--image", "nope.png", "--mask", "k", "--prompt", "p"],
     "--image 'nope.png' does not exist; pass the path of a PNG/JPEG file."),
    (["sweep", "nope.json"], "sweep spec 'nope.json' does not exist"),
    (["sweep", "s.json", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_errors_name_the_argument(capsys, argv, message):
    assert message in fails(capsys, *argv)


def test_size_is_checked_against_the_vae(tmp_path, capsys):
    """The bundled model's VAE downsamples 4x (not SD's 8x): --size 20 is a valid size, 18 is one line of error."""
    assets = Path(str(resources.files("flax_inpaint.assets")))
    common = ["inpaint", "--model", assets / "tiny-shapes-inpaint", "--image", assets / "sample_image.png",
              "--mask", assets / "sample_mask.png", "--prompt", "a circle", "--steps", "1", "--out", tmp_path]
    assert last_line(fails(capsys, *common, "--size", "18")) == (
        "flax-inpaint: error: --size 18 must be a multiple of 4 (the model's VAE scale factor); pass e.g. 16.")
    assert not list(tmp_path.iterdir())
    run(capsys, *common, "--size", "20")
    assert Image.open(tmp_path / "prompt0_seed0.png").size == (20, 20)


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


# ----------------------------------------------------------------------------- every error path

INPAINT = ["inpaint", "--model", "{M}", "--image", "{R}/image.png", "--mask", "{R}/mask.png", "--prompt", "p",
           "--steps", STEPS]
SPEC = {"model": "{M}", "prompt": "p", "image": "{R}/image.png", "mask": "{R}/mask.png", "steps": 2, "out": "{T}/out"}
SWEEP = ["sweep", "{T}/spec.json"]


def _with(argv, option, value):
    argv = list(argv)
    argv[argv.index(option) + 1] = value
    return argv


# (argv, spec written to {T}/spec.json or None, environment, the error line); {M}: the model, {R}: its
# folder with image.png and mask.png (32x32), {B}: the `bad` files, {T}: the test's folder.
ERRORS = {
    "inpaint --out is a file": (
        [*INPAINT, "--out", "{B}/file"], None, {},
        "--out '{B}/file' is a file, not a folder; pass a folder path (it is created if missing)."),
    "inpaint --out below a file": (
        [*INPAINT, "--out", "{B}/file/out"], None, {},
        "--out '{B}/file/out' cannot be created: '{B}/file' is a file; pass another folder."),
    "--image is a folder": (
        _with(INPAINT, "--image", "{B}/folder.png"), None, {},
        "--image '{B}/folder.png' is a folder; pass the path of a PNG/JPEG file."),
    "--image is not an image": (
        _with(INPAINT, "--image", "{B}/text.png"), None, {},
        "--image '{B}/text.png' is not a readable image (cannot identify image file '{B}/text.png'); pass a "
        "PNG/JPEG file."),
    "--image is truncated": (
        _with(INPAINT, "--image", "{B}/truncated.png"), None, {},
        "--image '{B}/truncated.png' is not a readable image ("),
    "--mask is not an image": (
        _with(INPAINT, "--mask", "{B}/text.png"), None, {}, "--mask '{B}/text.png' is not a readable image ("),
    "--mask size": (
        _with(INPAINT, "--mask", "{B}/mask16.png"), None, {},
        "--image is 32x32 but --mask is 16x16; they must be the same size."),
    "--image too small": (
        _with(_with(INPAINT, "--image", "{B}/small.png"), "--mask", "{B}/small_mask.png"), None, {},
        "--image is 3x3; the model needs at least 4x4 pixels (its VAE factor): pass a larger image or --size."),
    "--guidance nan": (
        [*INPAINT, "--guidance", "nan"], None, {}, "argument --guidance: must be a finite number, got nan"),
    "--guidance text": (
        [*INPAINT, "--guidance", "high"], None, {}, "argument --guidance: must be a number, got 'high'"),
    "--strength too low for --steps": (
        [*INPAINT, "--strength", "0.2"], None, {},
        "--strength 0.2 with --steps 2 leaves no denoising step; raise --strength or --steps (steps x strength must "
        "reach 1)."),
    "--scheduler": (
        [*INPAINT, "--scheduler", "Fancy"], None, {}, "--scheduler 'Fancy': Scheduler 'Fancy' is not supported"),
    "--seed with --batch": (
        [*INPAINT, "--seed", "4294967295", "--batch", "2"], None, {},
        "--seed 4294967295 with --batch 2 uses seeds up to 4294967296; seeds must lie in [0, 2**32)."),
    "params cache is a file": (
        [*INPAINT, "--out", "{T}/out"], None, {"FLAX_INPAINT_CACHE": "{B}/file"},
        "the params cache ($FLAX_INPAINT_CACHE, default ~/.cache/flax_inpaint) '{B}/file' is a file, not a folder"),
    "demo --out not .png": (["demo", "--out", "{T}/demo.jpg"], None, {}, "--out '{T}/demo.jpg' must end in .png"),
    "demo --out is a folder": (
        ["demo", "--out", "{B}/folder.png"], None, {},
        "--out '{B}/folder.png' is a folder; pass a file path such as '{B}/folder.png/demo.png'."),
    "demo --out below a file": (
        ["demo", "--out", "{B}/file/demo.png"], None, {},
        "--out '{B}/file/demo.png': its folder '{B}/file' is a file, not a folder"),
    "demo --scale": (["demo", "--scale", "1000"], None, {}, "argument --scale: must be > 0 and <= 32, got 1000"),
    "sweep spec is a folder": (
        ["sweep", "{B}/folder.png"], None, {},
        "sweep spec '{B}/folder.png' is a folder; pass the path of a .json or .yaml file."),
    "sweep spec not UTF-8": (
        ["sweep", "{B}/latin1.json"], None, {}, "sweep spec '{B}/latin1.json' is not readable UTF-8 text"),
    "sweep spec not JSON": (["sweep", "{B}/broken.json"], None, {}, "{B}/broken.json is not valid JSON: "),
    "sweep image not an image": (
        SWEEP, {**SPEC, "image": "{B}/text.png"}, {},
        "{T}/spec.json: image = '{B}/text.png': not a readable image (cannot identify image file"),
    "sweep mask size": (
        SWEEP, {**SPEC, "mask": "{B}/mask16.png"}, {},
        "{T}/spec.json: image '{R}/image.png' is 32x32 but its mask '{B}/mask16.png' is 16x16; pair each image with "
        "a mask of its size"),
    "sweep image too small": (
        SWEEP, {**SPEC, "image": "{B}/small.png", "mask": "{B}/small_mask.png"}, {},
        "image '{B}/small.png' is 3x3; the model needs at least 4x4 pixels (its VAE factor): pass a larger image or "
        "set 'size'."),
    "sweep --out is a file": ([*SWEEP, "--out", "{B}/file"], SPEC, {}, "--out '{B}/file' is a file, not a folder"),
    "sweep spec out is a file": (
        SWEEP, {**SPEC, "out": "{B}/file"}, {}, "the 'out' of {T}/spec.json '{B}/file' is a file, not a folder"),
    "sweep --process-id out of range": (
        [*SWEEP, "--num-processes", "2", "--process-id", "2"], SPEC, {},
        "--process-id 2 with --num-processes 2: give both, with the process id in 0 .. num-processes - 1."),
    "sweep --process-id alone": (
        [*SWEEP, "--process-id", "0"], SPEC, {}, "--process-id 0 with --num-processes None: give both"),
    "--controlnet without --control-image": (
        [*INPAINT, "--controlnet", "{B}/full"], None, {},
        "--controlnet DIR and --control-image IMG go together (--controlnet-scale S with them); pass both or "
        "neither."),
    "--controlnet not a ControlNet": (
        [*INPAINT, "--controlnet", "{B}/full", "--control-image", "{R}/image.png", "--out", "{T}/out"], None, {},
        "--controlnet '{B}/full' could not be loaded ("),
    "img2img with an inpainting model": (
        ["img2img", "--model", "{M}", "--image", "{R}/image.png", "--prompt", "p", "--out", "{T}/out"], None, {},
        "img2img needs a text-to-image model (a 4-channel UNet), but '{M}' is an inpainting model (9 channels); use "
        "`flax-inpaint inpaint` with it, or pass another --model."),
    "convert --out is a file": (
        ["convert", "--model", "{M}", "--out", "{B}/file"], None, {}, "--out '{B}/file' is a file, not a folder"),
    "convert --out not empty": (
        ["convert", "--model", "{M}", "--out", "{B}/full"], None, {},
        "--out '{B}/full' already exists and is not empty; pass a new folder"),
}


@pytest.fixture(scope="module")
def bad(sd):
    """Inputs that make commands fail."""
    root, _ = sd
    d = root / "bad"
    d.mkdir()
    (d / "text.png").write_text("not an image")
    png = (root / "image.png").read_bytes()
    (d / "truncated.png").write_bytes(png[:len(png) // 2])
    Image.new("RGB", (3, 3)).save(d / "small.png")
    Image.new("L", (3, 3)).save(d / "small_mask.png")
    Image.new("L", (16, 16)).save(d / "mask16.png")
    (d / "file").write_text("a file, not a folder")
    (d / "folder.png").mkdir()
    (d / "full").mkdir()
    (d / "full" / "x").write_text("x")
    (d / "latin1.json").write_bytes('{"prompt": "caf\xe9"}'.encode("latin-1"))
    (d / "broken.json").write_text('{"model": ')
    return d


@pytest.mark.parametrize("case", ERRORS)
def test_every_error_path_ends_in_one_line_naming_the_option(sd, bad, tmp_path, capsys, monkeypatch, case):
    """Exit status 2, no traceback, the last line of stderr names the option (or spec key) and the fix, and
    no file is written (a sweep that has started may leave its empty folders and lock file)."""
    root, folder = sd
    argv, spec, env, message = ERRORS[case]
    paths = {"M": folder, "R": root, "B": bad, "T": tmp_path}
    if spec is not None:
        (tmp_path / "spec.json").write_text(json.dumps({k: v.format(**paths) if isinstance(v, str) else v
                                                        for k, v in spec.items()}))
    for k, v in env.items():
        monkeypatch.setenv(k, v.format(**paths))
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    err = fails(capsys, *(a.format(**paths) for a in argv))
    assert message.format(**paths) in last_line(err), err
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before
    assert [p for p in (tmp_path / "out").rglob("*") if p.is_file() and p.name != LOCK] == []


def test_distributed_failure_names_the_options(sd, tmp_path, capsys, monkeypatch):
    root, folder = sd
    (tmp_path / "spec.json").write_text(json.dumps({"model": str(folder), "prompt": "p", "out": "out",
                                                    "image": str(root / "image.png"), "mask": str(root / "mask.png")}))

    def no_cluster(**kwargs):  # what jax says on a machine that is not part of a cluster
        raise ValueError("coordinator_address should be defined.")

    monkeypatch.setattr(jax.distributed, "initialize", no_cluster)
    err = fails(capsys, "sweep", tmp_path / "spec.json", "--distributed")
    assert last_line(err) == (
        "flax-inpaint: error: --distributed: jax.distributed.initialize() failed (ValueError: coordinator_address "
        "should be defined.); pass --coordinator-address HOST:PORT, --num-processes and --process-id, or run on a "
        "TPU pod or under SLURM.")


def test_img2img_and_inpaint_with_a_controlnet(sd, tmp_path_factory, capsys):
    """`img2img --controlnet DIR --control-image IMG` writes the ControlNet img2img pipeline's image (PNG: within
    one 8-bit level) with a text-to-image model; `inpaint` takes the same options."""
    root, _ = sd
    tmp = tmp_path_factory.mktemp("cli-controlnet")
    folder, _ = tiny_sd.make_pipeline(tmp, in_channels=4)
    tiny_sd.make_controlnet(1).save_pretrained(tmp / "controlnet", safe_serialization=True)
    edges, _ = tiny_sd.sample_image_and_mask(seed=1)
    edges.save(tmp / "edges.png")
    common = ["--model", folder, "--image", root / "image.png", "--prompt", "a red cat", "--steps", STEPS,
              "--controlnet", tmp / "controlnet", "--control-image", tmp / "edges.png", "--controlnet-scale", "0.6",
              "--no-progress"]
    out, _ = run(capsys, "img2img", *common, "--strength", "0.7", "--out", tmp / "img2img")
    assert "wrote 1 image(s)" in out
    written = np.asarray(Image.open(tmp / "img2img" / "prompt0_seed0.png"), np.float32) / 255
    pipe, params = FlaxStableDiffusionControlNetImg2ImgPipeline.from_pretrained(folder, controlnet=tmp / "controlnet")
    ours = pipe.img2img("a red cat", Image.open(root / "image.png"), edges, params, seed_keys([0]), strength=0.7,
                        num_inference_steps=int(STEPS), controlnet_conditioning_scale=0.6, output_type="np").images
    np.testing.assert_allclose(written, ours[0], atol=1 / 255 + 1e-6, rtol=0)
    out, _ = run(capsys, "inpaint", *common, "--mask", root / "mask.png", "--out", tmp / "inpaint")
    assert "wrote 1 image(s)" in out
    assert np.abs(pixels(tmp / "inpaint" / "prompt0_seed0.png") - pixels(root / "image.png")).max() > 0


def fake_inpaint(monkeypatch, *events):
    """Replace the pipeline's `inpaint`: call k does events[k] (raise an exception, send SIGTERM to this
    process), or returns gray images. Returns the prompts of each call."""
    calls = []

    def inpaint(self, prompts, *args, **kwargs):
        event = events[len(calls)] if len(calls) < len(events) else None
        calls.append(prompts)
        if isinstance(event, BaseException):
            raise event
        if event == signal.SIGTERM:
            os.kill(os.getpid(), signal.SIGTERM)  # the CLI's handler raises here
        return SimpleNamespace(images=[Image.new("RGB", (32, 32), "gray")] * len(prompts), nsfw_content_detected=None)

    monkeypatch.setattr(FlaxStableDiffusionInpaintPipeline, "inpaint", inpaint)
    return calls


def test_interrupts_and_failures_while_sampling(sd, tmp_path, capsys, monkeypatch):
    """Ctrl-C after the first of two batches keeps that batch's complete files; SIGTERM, device memory
    running out, a full disk and a bug each end in one line (a bug's traceback on request)."""
    root, folder = sd
    argv = [*(a.format(M=folder, R=root) for a in INPAINT), "--prompt", "a", "b", "--out", tmp_path / "out"]

    calls = fake_inpaint(monkeypatch, None, KeyboardInterrupt())
    err = fails(capsys, *argv, code=130)
    assert last_line(err) == ("flax-inpaint: interrupted; every file written so far is complete (none is "
                              "half-written).")
    assert len(calls) == 2 and sorted(p.name for p in (tmp_path / "out").iterdir()) == ["prompt0_seed0.png"]
    assert Image.open(tmp_path / "out/prompt0_seed0.png").size == (32, 32)

    fake_inpaint(monkeypatch, signal.SIGTERM)
    assert last_line(fails(capsys, *argv, code=143)).startswith("flax-inpaint: terminated (SIGTERM); every file")
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # main() put the handler back

    # What jax 0.11.2 raised on an H200 for `inpaint --size 4096` with the bundled model (2 TiB of attention).
    oom = jax.errors.JaxRuntimeError(
        "RESOURCE_EXHAUSTED: Failed to get configs for: 4 out of 238 instructions. See logs for all failures. "
        "Example failure: \nOut of memory while trying to allocate 2.00TiB with allocator GPU_0_bfc on device 0. "
        "[tf-allocator-allocation-error='']")
    fake_inpaint(monkeypatch, oom)
    assert last_line(fails(capsys, *argv)) == (
        "flax-inpaint: error: out of memory (Out of memory while trying to allocate 2.00TiB with allocator "
        "GPU_0_bfc on device 0. [tf-allocator-allocation-error='']); lower --batch or --size, or pass --dtype "
        "bfloat16.")

    def disk_full(path, payload):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    fake_inpaint(monkeypatch)
    monkeypatch.setattr(checkpoint_io, "write_bytes_atomic", disk_full)
    assert last_line(fails(capsys, *argv)) == (
        f"flax-inpaint: error: --out: could not write '{tmp_path / 'out/prompt0_seed0.png'}' (No space left on "
        "device); free space or pass another --out.")
    monkeypatch.undo()

    fake_inpaint(monkeypatch, RuntimeError("boom"))
    assert last_line(fails(capsys, *argv)) == (
        "flax-inpaint: error: unexpected RuntimeError: boom; this is a bug: rerun with FLAX_INPAINT_TRACEBACK=1 "
        "and report the traceback.")
    monkeypatch.setenv("FLAX_INPAINT_TRACEBACK", "1")
    fake_inpaint(monkeypatch, RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        cli.main([str(a) for a in argv])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["prompt0_seed0.png"]  # no temp files left


def test_interrupted_sweep_says_how_to_resume(sd, tmp_path, capsys, monkeypatch):
    root, folder = sd
    spec = {"model": str(folder), "image": str(root / "image.png"), "mask": str(root / "mask.png"), "prompt": "p",
            "steps": int(STEPS), "guidance": 6, "negative_prompt": "blurry",  # the first test's program
            "grid": {"seed": list(range(9))}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    real_write = ResultStore.write

    def write_then_stop(self, record, png):
        real_write(self, record, png)
        raise KeyboardInterrupt

    monkeypatch.setattr(ResultStore, "write", write_then_stop)
    argv = ["sweep", tmp_path / "spec.json", "--out", tmp_path / "out", "--no-progress"]
    assert last_line(fails(capsys, *argv, code=130)) == (
        "flax-inpaint: interrupted; every file written so far is complete (none is half-written); rerun the same "
        "command to resume.")
    monkeypatch.setattr(ResultStore, "write", real_write)
    out = run(capsys, *argv).out
    assert "9 result(s)" in out and "1 found, 8 computed" in out


def test_our_warnings_show_as_one_line(sd, tmp_path, capsys):
    """A warning of ours (here: an unknown UNet config key) reads like our errors, not file:line + source."""
    _, folder = sd
    model = tmp_path / "model"
    shutil.copytree(folder, model)
    config = json.loads((model / "unet/config.json").read_text())
    (model / "unet/config.json").write_text(json.dumps({**config, "shiny_new_key": 1}))
    err = run(capsys, "convert", "--model", model).err
    assert "flax-inpaint: warning: FlaxUNet2DConditionModel: ignoring unknown config keys ['shiny_new_key']." in err
    assert "warnings.warn" not in err and "UserWarning" not in err


@pytest.mark.parametrize("argv,message", [
    (["vae", "--out", "{B}/file"], "flax-inpaint: error: --out '{B}/file' is a file, not a folder"),
    (["vae", "--out", "{T}/run", "--export-to", "{B}/file/assets"],
     "flax-inpaint: error: --export-to '{B}/file/assets' cannot be created: '{B}/file' is a file"),
    (["controlnet", "--out", "{T}/run"],
     "error: stage controlnet reads the inpaint stage's output {T}/run/tiny-shapes-inpaint, which is missing; train "
     "inpaint first (or 'all') with the same --out."),
], ids=["out-is-a-file", "export-to-below-a-file", "missing-stage"])
def test_train_errors_name_the_option(bad, tmp_path, capsys, argv, message):
    """`python -m flax_inpaint.train` fails before training, in one line (it trained first, then raised)."""
    from flax_inpaint.train.__main__ import main as train_main

    paths = {"B": bad, "T": tmp_path}
    with pytest.raises(SystemExit) as exit_info:
        train_main([a.format(**paths) for a in argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert message.format(**paths) in last_line(err)
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- real processes, without PyTorch

# Users install without PyTorch; transformers decides by importlib.util.find_spec("torch"), which a None
# in sys.modules answers with None.
HIDE_TORCH = "import sys; sys.modules['torch'] = None; "


def cli_argv(*argv) -> list:
    """The `flax-inpaint` entry point (cli.main) in a fresh interpreter that has no PyTorch."""
    return [sys.executable, "-c", HIDE_TORCH + "from flax_inpaint.cli import main; main()", *map(str, argv)]


def test_transformers_notice_about_pytorch_is_silenced():
    notice = "PyTorch was not found. Models won't be available"
    plain = subprocess.run([sys.executable, "-c", HIDE_TORCH + "import transformers"], capture_output=True, text=True)
    assert notice in plain.stderr  # what every command printed before
    ours = subprocess.run([sys.executable, "-c", HIDE_TORCH + "import flax_inpaint, transformers, logging; "
                           "logging.getLogger('transformers').warning('other messages still show')"],
                          capture_output=True, text=True)
    assert ours.returncode == 0 and ours.stderr == "[transformers] other messages still show\n", ours.stderr


def test_second_sweep_is_refused_and_a_killed_holder_does_not_block(sd, tmp_path):
    """Sweep A holds the folder mid-run (stopped with SIGSTOP): sweep B is refused with A's pid and host and
    computes nothing. A is SIGKILLed; sweep C is not blocked by A's lock, keeps A's finished results and
    computes only the rest, each result once. No process shows anything but our own output."""
    root, folder = sd
    spec = {"model": str(folder), "image": str(root / "image.png"), "mask": str(root / "mask.png"),
            "prompt": "a cat", "guidance": 1.0, "grid": {"steps": [2, 3], "seed": [0, 1, 2]}}  # 2 groups: 2 compiles
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    out = (tmp_path / "out").resolve()
    argv = cli_argv("sweep", tmp_path / "spec.json", "--out", out, "--no-progress")
    manifest = out / "manifest.jsonl"

    a = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (manifest.is_file() and manifest.read_bytes()):  # A has written a result of its first group
            assert a.poll() is None, a.communicate()
            assert time.monotonic() < deadline, "sweep A wrote no result in 300 s"
            time.sleep(0.02)
        os.kill(a.pid, signal.SIGSTOP)
        b = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    finally:
        a.kill()
        a.communicate()
    assert b.returncode == 2 and b.stdout == "", b.stderr
    holder = rf"pid {a.pid} on host {socket.gethostname()}, since \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d"
    assert re.fullmatch(
        rf"flax-inpaint: error: --out: {out} is in use by another sweep \({holder}; lock file {out / LOCK}\); wait "
        r"for it to finish or stop it, or write to another folder\.\n", b.stderr), b.stderr
    found = len(list(iter_manifest(out)))
    assert 1 <= found < 6  # A was killed mid-run

    c = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert c.returncode == 0 and c.stderr == "", c.stderr
    assert f"6 result(s) in {out}, {found} found, {6 - found} computed" in c.stdout
    ids = [r["id"] for r in iter_manifest(out)]
    assert len(ids) == len(set(ids)) == 6
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(f"{i}.png" for i in ids)
    assert (out / LOCK).read_bytes() == b""  # released: names nobody
