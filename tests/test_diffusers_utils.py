"""`load_image`, `make_image_grid` and pipelines' `numpy_to_pil` against diffusers 0.42.1's own.

All three are exact integer / PIL operations (scaling by 255 and rounding, PIL decoding, pasting), so
outputs must be pixel-identical to diffusers', modes and sizes included.
"""
import functools
import http.server
import threading

import numpy as np
import PIL.Image
import pytest
from diffusers import DiffusionPipeline
from diffusers.utils import load_image as diffusers_load_image
from diffusers.utils import make_image_grid as diffusers_make_image_grid

from flax_inpaint import (
    FlaxDiffusionPipeline,
    FlaxStableDiffusionInpaintPipeline,
    load_image,
    make_image_grid,
)


def same_images(ours, theirs):
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert (a.mode, a.size) == (b.mode, b.size)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("shape", [(2, 8, 6, 3), (1, 5, 7, 1), (8, 6, 3), (3, 4, 4, 4)])
def test_numpy_to_pil_matches_diffusers(shape):
    images = np.random.default_rng(0).random(shape, dtype=np.float32)
    images.flat[:4] = [0.0, 1.0, 0.5 / 255, 254.5 / 255]  # the ends and two rounding ties
    for pipeline in (FlaxDiffusionPipeline, FlaxStableDiffusionInpaintPipeline):
        same_images(pipeline.numpy_to_pil(images), DiffusionPipeline.numpy_to_pil(images))


@pytest.mark.parametrize("resize", [None, 5])
def test_make_image_grid_matches_diffusers(resize):
    rng = np.random.default_rng(1)
    images = [PIL.Image.fromarray(rng.integers(0, 256, (6, 9, 3), dtype=np.uint8)) for _ in range(6)]
    same_images([make_image_grid(images, 2, 3, resize)], [diffusers_make_image_grid(images, 2, 3, resize)])
    same_images([make_image_grid(images, rows=3, cols=2)], [diffusers_make_image_grid(images, rows=3, cols=2)])
    with pytest.raises(ValueError, match="6 images for a 2x2 grid"):
        make_image_grid(images, 2, 2)


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    """Files in the modes load_image meets: RGBA PNG, grayscale PNG, a JPEG whose EXIF says 'rotate 90'."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(2)
    PIL.Image.fromarray(rng.integers(0, 256, (10, 14, 4), dtype=np.uint8)).save(root / "rgba.png")
    PIL.Image.fromarray(rng.integers(0, 256, (9, 5), dtype=np.uint8)).save(root / "gray.png")
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    PIL.Image.fromarray(rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)).save(root / "rotated.jpg", exif=exif)
    return root


@pytest.fixture(scope="module")
def server_url(image_files):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(image_files))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.parametrize("name", ["rgba.png", "gray.png", "rotated.jpg"])
def test_load_image_matches_diffusers(name, image_files, server_url, monkeypatch):
    for var in ("NO_PROXY", "no_proxy"):  # the server is local even where a proxy is configured
        monkeypatch.setenv(var, "127.0.0.1")
    path = str(image_files / name)
    same_images([load_image(path)], [diffusers_load_image(path)])
    same_images([load_image(image_files / name)], [diffusers_load_image(path)])  # a Path works too
    same_images([load_image(f"{server_url}/{name}")], [diffusers_load_image(f"{server_url}/{name}")])
    pil = PIL.Image.open(path)
    same_images([load_image(pil)], [diffusers_load_image(pil)])
    gray = lambda im: im.convert("L")  # noqa: E731
    same_images([load_image(path, convert_method=gray)], [diffusers_load_image(path, convert_method=gray)])
    assert load_image(path).mode == "RGB"


def test_load_image_errors(tmp_path):
    with pytest.raises(ValueError, match="neither an existing file nor an http"):
        load_image(str(tmp_path / "missing.png"))
    with pytest.raises(ValueError, match="takes a path, an http"):
        load_image(np.zeros((4, 4, 3)))
