"""`flax-inpaint diffedit` and DiffEdit sweeps end to end on the bundled 4-channel tiny-shapes-txt2img
model (4 steps, 2 maps per mask): the command writes the mask, the result and the side-by-side, and a
sweep with "pipeline": "diffedit" writes one result per configuration, both equal to the pipeline's own
`edit` (within 1 level of 8 bits: the same programs, PNG rounding); bad input ends in one line naming the
option or key, with nothing written."""
from pathlib import Path

import json

import jax
import numpy as np
import pytest
from PIL import Image

from flax_inpaint import cli
from flax_inpaint.cli_diffedit import DIFFEDIT_MODEL, OUTPUTS
from flax_inpaint.pipelines.diffedit import FlaxStableDiffusionDiffEditPipeline
from flax_inpaint.sweep import SweepSpec, SweepSpecError, iter_manifest
from flax_inpaint.train import quality

OPTIONS = ["--steps", "4", "--num-maps-per-mask", "2", "--guidance", "4", "--invert-guidance", "4",
           "--inpaint-strength", "1", "--seed", "3"]
SOURCE, TARGET = "a red circle on a green background", "a blue circle on a green background"


@pytest.fixture(scope="module")
def diffedit():
    return FlaxStableDiffusionDiffEditPipeline.from_pretrained(cli.ASSETS / DIFFEDIT_MODEL)


def edit(diffedit, image_path, seed: int, num_maps_per_mask: int):
    """(mask at pixel size, result in [0, 255]) from the pipeline's API, as the command and the sweep run it."""
    pipe, params = diffedit
    pixels = np.asarray(Image.open(image_path).convert("RGB"), np.float32).transpose(2, 0, 1)[None] / 127.5 - 1
    mask, images = pipe.edit(pixels, params, jax.random.key(seed), source_prompt=[SOURCE], target_prompt=[TARGET],
                             num_inference_steps=4, guidance_scale=4.0, invert_guidance_scale=4.0,
                             inpaint_strength=1.0, num_maps_per_mask=num_maps_per_mask)
    f = pipe.vae_scale_factor
    return np.kron(mask[0], np.ones((f, f))) > 0.5, np.round(images[0] * 255)


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """A red circle on a green background (64x64) saved as a PNG, and the image as the PNG holds it."""
    path = tmp_path_factory.mktemp("diffedit") / "scene.png"
    cases = quality.diffedit_cases(1, 0)
    Image.fromarray(np.round(cases.images[0] * 255).astype(np.uint8)).save(path)
    return path


def fails(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err
    return err.strip()


def test_diffedit_writes_mask_result_and_side_by_side(diffedit, scene, tmp_path, capsys):
    out = tmp_path / "edits"
    cli.main(["diffedit", "--image", str(scene), "--source-prompt", SOURCE, "--target-prompt", TARGET,
              "--out", str(out), *OPTIONS])
    assert "wrote mask.png, result.png, side_by_side.png" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS)  # no temporary file left behind
    mask, result, side = (Image.open(out / name) for name in OUTPUTS)
    assert (mask.mode, mask.size, result.size, side.size) == ("L", (64, 64), (64, 64), (192, 64))

    want_mask, want = edit(diffedit, scene, 3, num_maps_per_mask=2)
    np.testing.assert_array_equal(np.asarray(mask) > 127, want_mask)
    assert set(np.unique(np.asarray(mask))) <= {0, 255}
    assert np.abs(np.asarray(result, np.int16) - want).max() <= 1
    np.testing.assert_array_equal(np.asarray(side.crop((128, 0, 192, 64))), np.asarray(result))
    np.testing.assert_array_equal(np.asarray(side.crop((0, 0, 64, 64))), np.asarray(Image.open(scene).convert("RGB")))


@pytest.mark.parametrize("extra,message", [
    (["--model", cli.ASSETS / "tiny-shapes-inpaint"], "--model '{A}/tiny-shapes-inpaint' could not be loaded: "
                                                       "DiffEdit needs a plain text-to-image UNet (in_channels=4)"),
    (["--inpaint-strength", "0.1"], "--inpaint-strength 0.1 with --steps 4 runs no step; raise --inpaint-strength"),
    (["--size", "18"], "--size 18 must be a multiple of 4 (the model's VAE scale factor); pass e.g. 16."),
    (["--mask-encode-strength", "2"], "argument --mask-encode-strength: must lie in [0, 1], got 2"),
])
def test_diffedit_errors_name_the_option(scene, tmp_path, capsys, extra, message):
    out = tmp_path / "edits"
    err = fails(capsys, "diffedit", "--image", scene, "--source-prompt", SOURCE, "--target-prompt", TARGET,
                "--out", out, *OPTIONS, *[str(e) for e in extra])
    assert message.format(A=cli.ASSETS) in err
    assert not out.exists() or not any(out.iterdir())


def test_diffedit_image_errors(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    err = fails(capsys, "diffedit", "--image", tmp_path / "nope.png", "--source-prompt", "a", "--target-prompt", "b")
    assert err.endswith(f"--image '{tmp_path}/nope.png' does not exist; pass the path of a PNG/JPEG file.")
    err = fails(capsys, "diffedit", "--image", tmp_path / "file", "--source-prompt", "a", "--target-prompt", "b")
    assert "--image" in err and "not a readable image" in err
    assert Path(tmp_path / "file").read_text() == "x"


def test_sweep_runs_diffedit_configurations_and_resumes(diffedit, scene, tmp_path, capsys):
    spec = {"pipeline": "diffedit", "model": str(cli.ASSETS / DIFFEDIT_MODEL), "out": "results",
            "image": str(scene), "source_prompt": SOURCE, "prompt": TARGET, "steps": 4, "guidance": 4,
            "strength": 1.0, "grid": {"seed": [3, 5]}}
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(spec))
    cli.main(["sweep", str(path), "--no-progress"])
    assert "2 result(s)" in capsys.readouterr().out
    records = list(iter_manifest(tmp_path / "results"))
    assert [r["seed"] for r in records] == [3, 5]
    for r in records:
        mask, want = edit(diffedit, scene, r["seed"], num_maps_per_mask=10)  # diffusers' default, as the sweep runs
        got = np.asarray(Image.open(tmp_path / "results" / r["file"]).convert("RGB"), np.int16)
        assert np.abs(got - want).max() <= 1
        assert r["mask_fraction"] == pytest.approx(mask.mean()) and r["config"]["source_prompt"] == SOURCE
    cli.main(["sweep", str(path), "--no-progress"])
    assert "2 found, 0 computed" in capsys.readouterr().out


@pytest.mark.parametrize("change,message", [
    ({"mask": "scene.png"}, "sets ['mask'], which the 'diffedit' pipeline does not take"),
    ({"pipeline": "inpaint", "mask": "scene.png"}, "sets ['source_prompt'], which the 'inpaint' pipeline"),
    ({"source_prompt": None}, "source_prompt = None: source_prompt must be a string"),
    ({"pipeline": "pix2pix"}, "'pipeline' = 'pix2pix'; use one of ['inpaint', 'diffedit']"),
])
def test_diffedit_spec_errors_name_the_key(scene, change, message):
    spec = {"pipeline": "diffedit", "model": str(cli.ASSETS / DIFFEDIT_MODEL), "out": "results",
            "image": scene.name, "source_prompt": SOURCE, "prompt": TARGET, **change}
    with pytest.raises(SweepSpecError) as error:
        SweepSpec.from_dict(spec, base_dir=scene.parent)
    assert message in str(error.value)
