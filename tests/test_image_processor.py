"""Parity of flax_inpaint.image_processor with diffusers' VaeImageProcessor / InpaintProcessor /
make_image_grid (float outputs to 1e-6, uint8 and PIL outputs exactly), plus its input errors."""
import warnings

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers.image_processor import InpaintProcessor as DInpaintProcessor
from diffusers.image_processor import VaeImageProcessor as DVaeImageProcessor
from diffusers.utils import make_image_grid as d_make_image_grid

from flax_inpaint import VaeImageProcessor, make_image_grid
from flax_inpaint.image_processor import masked_image, postprocess_inpaint, preprocess_inpaint

IMAGES = VaeImageProcessor()
MASKS = VaeImageProcessor.for_masks()
D_IMAGES = DVaeImageProcessor(vae_scale_factor=8)
D_MASKS = DVaeImageProcessor(vae_scale_factor=8, do_normalize=False, do_binarize=True, do_convert_grayscale=True)


def rng(seed=0):
    return np.random.default_rng(seed)


def pil_image(w, h, mode="RGB", seed=0):
    """Smooth-ish random picture (noise + gradient) so resampling filters have something to do."""
    r = rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx / w, yy / h, (xx + yy) / (w + h), 1 - xx / w], axis=-1)
    arr = np.clip(base + 0.3 * r.random((h, w, 4)), 0, 1)
    img = PIL.Image.fromarray((arr * 255).astype(np.uint8), "RGBA")
    return img if mode == "RGBA" else img.convert(mode)


def pil_mask(w, h, box, mode="L", soft=False):
    arr = np.zeros((h, w), np.uint8)
    x1, y1, x2, y2 = box
    arr[y1:y2, x1:x2] = 255
    if soft:  # grey levels around the threshold
        arr[y1:y2, x1] = 127
        arr[y1:y2, x2 - 1] = 128
    return PIL.Image.fromarray(arr, "L").convert(mode)


def d_pre(processor, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return processor.preprocess(*args, **kwargs).numpy()


def assert_parity(ours, theirs):
    assert ours.dtype == np.float32
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)


def assert_pil_equal(a, b):
    assert a.mode == b.mode and a.size == b.size
    np.testing.assert_array_equal(np.array(a), np.array(b))


# ---------------------------------------------------------------- preprocess: PIL


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
@pytest.mark.parametrize("resize_mode", ["default", "fill", "crop"])
@pytest.mark.parametrize("size,hw", [((61, 45), (None, None)), ((64, 48), (None, None)), ((61, 45), (40, 72))])
def test_preprocess_pil_parity(mode, resize_mode, size, hw):
    img = pil_image(*size, mode=mode)
    h, w = hw
    ours = IMAGES.preprocess(img, height=h, width=w, resize_mode=resize_mode)
    assert_parity(ours, d_pre(D_IMAGES, img, height=h, width=w, resize_mode=resize_mode))
    if h is None:
        assert ours.shape[2:] == (size[1] // 8 * 8, size[0] // 8 * 8)  # floored, not rounded


def test_preprocess_pil_list_of_different_sizes_resizes_to_first():
    imgs = [pil_image(61, 45, seed=0), pil_image(80, 80, seed=1), pil_image(33, 70, seed=2)]
    ours = IMAGES.preprocess(imgs)
    assert ours.shape == (3, 3, 40, 56)
    assert_parity(ours, d_pre(D_IMAGES, imgs))
    assert_parity(IMAGES.preprocess(tuple(imgs), 24, 32), d_pre(D_IMAGES, imgs, 24, 32))


def test_preprocess_reducing_gap_and_other_filters():
    img = pil_image(200, 120)
    for kwargs in ({"reducing_gap": 2.0}, {"resample": "bicubic"}, {"resample": "nearest"}, {"resample": "bilinear"}):
        ours = VaeImageProcessor(**kwargs).preprocess(img, 48, 64)
        assert_parity(ours, d_pre(DVaeImageProcessor(**kwargs), img, 48, 64))


def test_preprocess_convert_rgb_and_no_resize():
    img = pil_image(61, 45, mode="RGBA")
    assert_parity(
        VaeImageProcessor(do_convert_rgb=True).preprocess(img),
        d_pre(DVaeImageProcessor(do_convert_rgb=True), img),
    )
    for mode in ("P", "CMYK", "LA"):  # any mode is fine once converted
        assert VaeImageProcessor(do_convert_rgb=True).preprocess(img.convert(mode)).shape == (1, 3, 40, 56)
    no_resize = VaeImageProcessor(do_resize=False)
    assert_parity(no_resize.preprocess(img, 16, 16), d_pre(DVaeImageProcessor(do_resize=False), img, 16, 16))
    assert no_resize.preprocess(img).shape == (1, 4, 45, 61)


# ---------------------------------------------------------------- preprocess: numpy


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "shape",
    [(45, 61, 3), (1, 45, 61, 3), (3, 45, 61, 3), (45, 61), (45, 61, 1), (2, 45, 61, 4)],
)
@pytest.mark.parametrize("hw", [(None, None), (40, 72), (96, 120), (90, 122)])
def test_preprocess_numpy_parity(shape, dtype, hw):
    arr = rng().random(shape).astype(dtype)
    ours = IMAGES.preprocess(arr, *hw)
    assert_parity(ours, d_pre(D_IMAGES, arr, *hw))


def test_preprocess_numpy_lists_parity():
    r = rng()
    hwc = [r.random((45, 61, 3)) for _ in range(3)]
    assert_parity(IMAGES.preprocess(hwc), d_pre(D_IMAGES, hwc))
    nhwc = [r.random((2, 45, 61, 3)) for _ in range(2)]  # concatenated along the batch
    ours = IMAGES.preprocess(nhwc, 32, 48)
    assert ours.shape == (4, 3, 32, 48)
    assert_parity(ours, d_pre(D_IMAGES, nhwc, 32, 48))
    hw = [r.random((45, 61)) for _ in range(2)]
    assert_parity(IMAGES.preprocess(hw), d_pre(D_IMAGES, hw))


def test_preprocess_already_normalised_input_warns_and_is_kept():
    arr = rng().random((1, 32, 40, 3)) * 2 - 1
    with pytest.warns(FutureWarning, match=r"\[-1, 1\]"):
        ours = IMAGES.preprocess(arr)
    assert_parity(ours, d_pre(D_IMAGES, arr))
    np.testing.assert_allclose(ours, arr.transpose(0, 3, 1, 2), atol=1e-7)


def test_preprocess_jax_array_reads_like_numpy():
    jnp = pytest.importorskip("jax.numpy")
    arr = rng().random((2, 45, 61, 3)).astype(np.float32)
    np.testing.assert_array_equal(IMAGES.preprocess(jnp.asarray(arr)), IMAGES.preprocess(arr))


# ---------------------------------------------------------------- masks


@pytest.mark.parametrize("shape", [(45, 61), (2, 45, 61), (45, 61, 1), (1, 45, 61), (2, 45, 61, 1), (1, 45, 61, 1)])
@pytest.mark.parametrize("hw", [(None, None), (32, 48), (64, 64)])
def test_mask_numpy_shapes_parity(shape, hw):
    arr = rng(1).random(shape)
    ours = MASKS.preprocess(arr, *hw)
    theirs = d_pre(D_MASKS, arr, *hw)
    assert_parity(ours, theirs)
    assert ours.shape[1] == 1 and set(np.unique(ours)) <= {0.0, 1.0}


def test_mask_numpy_list_parity():
    masks = [rng(i).random((45, 61)) for i in range(3)]
    assert_parity(MASKS.preprocess(masks, 32, 48), d_pre(D_MASKS, masks, 32, 48))
    masks = [rng(i).random((45, 61, 1)) for i in range(2)]
    assert_parity(MASKS.preprocess(masks), d_pre(D_MASKS, masks))
    bool_mask = rng().random((45, 61)) > 0.5  # bools read as 0/1
    np.testing.assert_array_equal(MASKS.preprocess(bool_mask), MASKS.preprocess(bool_mask.astype(np.float32)))


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "1"])
@pytest.mark.parametrize("resize_mode", ["default", "fill", "crop"])
def test_mask_pil_parity(mode, resize_mode):
    mask = pil_mask(61, 45, (10, 5, 40, 30), mode=mode, soft=mode != "1")
    ours = MASKS.preprocess(mask, resize_mode=resize_mode)
    assert_parity(ours, d_pre(D_MASKS, mask, resize_mode=resize_mode))
    assert_parity(MASKS.preprocess([mask, mask], 64, 80), d_pre(D_MASKS, [mask, mask], 64, 80))


def test_binarize_threshold():
    x = np.array([0.0, 0.49999, 0.5, 0.7, 1.0, np.nan], np.float32)
    out = MASKS.binarize(x)
    np.testing.assert_array_equal(out[:5], [0, 0, 1, 1, 1])
    assert np.isnan(out[5]) and x[2] == 0.5  # input untouched


def test_masked_image_semantics():
    img = pil_image(61, 45)
    mask = pil_mask(61, 45, (10, 5, 40, 30), soft=True)
    init, m = IMAGES.preprocess(img), MASKS.preprocess(mask)
    ours = masked_image(init, m)
    theirs = (torch.from_numpy(d_pre(D_IMAGES, img)) * (torch.from_numpy(d_pre(D_MASKS, mask)) < 0.5)).numpy()
    assert_parity(ours, theirs)
    keep = m[:, 0] < 0.5
    np.testing.assert_array_equal(ours[:, :, ~keep[0]], 0)
    np.testing.assert_array_equal(ours[:, :, keep[0]], init[:, :, keep[0]])
    # a batch of 1 on either side broadcasts
    assert masked_image(np.repeat(init, 3, 0), m).shape == (3, 3, 40, 56)
    assert masked_image(init, np.repeat(m, 2, 0)).shape == (2, 3, 40, 56)


# ---------------------------------------------------------------- sizes, crop region, blur, overlay


def test_get_default_height_width():
    img = pil_image(61, 45)
    assert IMAGES.get_default_height_width(img) == D_IMAGES.get_default_height_width(img) == (40, 56)
    assert IMAGES.get_default_height_width(img, 100, 130) == D_IMAGES.get_default_height_width(img, 100, 130)
    nhwc = np.zeros((2, 45, 61, 3))
    assert IMAGES.get_default_height_width(nhwc) == D_IMAGES.get_default_height_width(nhwc) == (40, 56)
    nhw = np.zeros((2, 45, 61))
    assert MASKS.get_default_height_width(nhw) == D_MASKS.get_default_height_width(nhw) == (40, 56)
    # where diffusers reads a raw HWC / HW array's shape as if batched, we read it as preprocess does
    assert IMAGES.get_default_height_width(np.zeros((45, 61, 3))) == (40, 56)
    assert MASKS.get_default_height_width(np.zeros((45, 61))) == (40, 56)
    assert IMAGES.get_default_height_width([img, pil_image(8, 8)]) == (40, 56)
    assert VaeImageProcessor(vae_scale_factor=16).get_default_height_width(img) == (32, 48)


@pytest.mark.parametrize(
    "box", [(10, 5, 40, 30), (0, 0, 5, 60), (50, 2, 61, 8), (20, 40, 30, 45), (0, 0, 61, 45), (30, 20, 31, 21)]
)
@pytest.mark.parametrize("wh", [(512, 512), (768, 512), (512, 768), (64, 24)])
@pytest.mark.parametrize("pad", [0, 4, 32, 100])
def test_get_crop_region_parity(box, wh, pad):
    mask = pil_mask(61, 45, box)
    ours = VaeImageProcessor.get_crop_region(mask, *wh, pad=pad)
    assert ours == D_IMAGES.get_crop_region(mask, *wh, pad=pad)
    assert all(type(v) is int for v in ours)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
@pytest.mark.parametrize("blur_factor", [0, 1, 4, 9.5])
def test_blur_parity(mode, blur_factor):
    img = pil_image(40, 30, mode=mode)
    assert_pil_equal(VaeImageProcessor.blur(img, blur_factor), D_IMAGES.blur(img, blur_factor))
    assert_pil_equal(MASKS.blur(pil_mask(40, 30, (5, 5, 20, 20))), D_MASKS.blur(pil_mask(40, 30, (5, 5, 20, 20))))


@pytest.mark.parametrize("pad", [0, 6])
@pytest.mark.parametrize("hw", [(64, 64), (48, 80)])
def test_preprocess_with_crops_coords_parity(pad, hw):
    img = pil_image(61, 45, mode="RGB")
    mask = pil_mask(61, 45, (10, 5, 25, 30), soft=True)
    h, w = hw
    coords = VaeImageProcessor.get_crop_region(mask, w, h, pad=pad)
    for ours_p, d_p, x in ((IMAGES, D_IMAGES, img), (MASKS, D_MASKS, mask)):
        ours = ours_p.preprocess(x, h, w, resize_mode="fill", crops_coords=coords)
        assert ours.shape[2:] == hw
        assert_parity(ours, d_pre(d_p, x, h, w, resize_mode="fill", crops_coords=coords))


def test_apply_overlay_parity_and_exact_unmasked_pixels():
    init = pil_image(61, 45, seed=0)
    mask = pil_mask(61, 45, (10, 5, 40, 30), soft=True)
    generated = pil_image(61, 45, seed=7)
    ours = IMAGES.apply_overlay(mask, init, generated)
    assert_pil_equal(ours, D_IMAGES.apply_overlay(mask, init, generated))
    outside = np.array(mask) == 0
    np.testing.assert_array_equal(np.array(ours)[outside], np.array(init)[outside])
    inside = np.array(mask) == 255
    np.testing.assert_array_equal(np.array(ours)[inside], np.array(generated)[inside])
    # RGBA init image and an RGB mask take the same conversions
    init_rgba, mask_rgb = pil_image(61, 45, "RGBA"), mask.convert("RGB")
    assert_pil_equal(
        IMAGES.apply_overlay(mask_rgb, init_rgba, generated), D_IMAGES.apply_overlay(mask_rgb, init_rgba, generated)
    )


@pytest.mark.parametrize("hw", [(64, 64), (48, 80)])
def test_apply_overlay_with_crop_coords_parity(hw):
    init = pil_image(61, 45, seed=0)
    mask = pil_mask(61, 45, (10, 5, 25, 30))
    h, w = hw
    coords = VaeImageProcessor.get_crop_region(mask, w, h, pad=4)
    crop_result = pil_image(w, h, seed=3)  # what the pipeline decodes at full resolution
    ours = IMAGES.apply_overlay(mask, init, crop_result, coords)
    assert ours.size == init.size
    assert_pil_equal(ours, D_IMAGES.apply_overlay(mask, init, crop_result, coords))
    outside = np.array(mask) == 0
    np.testing.assert_array_equal(np.array(ours)[outside], np.array(init)[outside])


@pytest.mark.parametrize("padding_mask_crop", [None, 4])
def test_preprocess_postprocess_inpaint_match_diffusers_inpaint_processor(padding_mask_crop):
    img = pil_image(61, 45)
    mask = pil_mask(61, 45, (10, 5, 25, 30), soft=True)
    d = DInpaintProcessor(vae_scale_factor=8)
    d_img, d_mask, d_kwargs = d.preprocess(img, mask, height=48, width=64, padding_mask_crop=padding_mask_crop)
    ours = preprocess_inpaint(img, mask, 48, 64, padding_mask_crop=padding_mask_crop)
    assert_parity(ours.image, d_img.numpy())
    assert_parity(ours.mask, d_mask.numpy())
    assert_parity(ours.masked_image, (d_img * (d_mask < 0.5)).numpy())
    assert ours.crops_coords == d_kwargs["crops_coords"]

    decoded = torch.from_numpy(rng(3).random((2, 3, 48, 64)) * 2 - 1).float()
    d_out = d.postprocess(decoded, output_type="pil", **d_kwargs)
    out = postprocess_inpaint(IMAGES.postprocess(decoded.numpy()), img, mask, ours.crops_coords)
    assert len(out) == len(d_out) == 2
    for a, b in zip(out, d_out):
        assert_pil_equal(a, b)


# ---------------------------------------------------------------- postprocess, conversions, grid


def test_postprocess_parity():
    x = rng().random((2, 3, 16, 24)).astype(np.float32) * 2.4 - 1.2  # some values get clipped
    t = torch.from_numpy(x)
    ours = IMAGES.postprocess(x, output_type="np")
    assert_parity(ours, D_IMAGES.postprocess(t, output_type="np"))
    assert ours.shape == (2, 16, 24, 3) and ours.min() >= 0 and ours.max() <= 1
    for a, b in zip(IMAGES.postprocess(x), D_IMAGES.postprocess(t, output_type="pil")):
        assert_pil_equal(a, b)
    per_image = [True, False]
    assert_parity(
        IMAGES.postprocess(x, "np", do_denormalize=per_image),
        D_IMAGES.postprocess(t, "np", do_denormalize=per_image),
    )
    assert_parity(MASKS.postprocess(x, "np"), D_MASKS.postprocess(t, "np"))
    assert IMAGES.postprocess(x, "latent") is x


def test_numpy_pil_roundtrip_parity():
    r = rng()
    for arr in (r.random((2, 8, 12, 3)), r.random((8, 12, 3)), r.random((2, 8, 12, 1)), r.random((1, 8, 12, 4))):
        ours, theirs = VaeImageProcessor.numpy_to_pil(arr), DVaeImageProcessor.numpy_to_pil(arr)
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs):
            assert_pil_equal(a, b)
    for imgs in ([pil_image(12, 8, seed=0), pil_image(12, 8, seed=1)], pil_image(12, 8, "L"), pil_image(12, 8, "RGBA")):
        assert_parity(VaeImageProcessor.pil_to_numpy(imgs), DVaeImageProcessor.pil_to_numpy(imgs))
    x = r.random((2, 3, 4, 4))
    np.testing.assert_allclose(IMAGES.denormalize(IMAGES.normalize(x)), x, atol=1e-12)


@pytest.mark.parametrize("rows,cols,resize", [(1, 3, None), (2, 2, None), (2, 3, 16), (3, 1, 7)])
def test_make_image_grid_parity(rows, cols, resize):
    imgs = [pil_image(20, 14, mode=("RGB", "L", "RGBA")[i % 3], seed=i) for i in range(rows * cols)]
    assert_pil_equal(make_image_grid(imgs, rows, cols, resize), d_make_image_grid(imgs, rows, cols, resize))


# ---------------------------------------------------------------- bad input


def _errors():
    img, mask = pil_image(61, 45), pil_mask(61, 45, (10, 5, 40, 30))
    r = rng()
    return [
        (lambda: IMAGES.preprocess(r.random((1, 3, 45, 61))), r"channels-last.*np\.transpose\(image"),
        (lambda: MASKS.preprocess(r.random((2, 1, 45, 61))), r"mask_image.*single-channel.*np\.transpose"),
        (lambda: MASKS.preprocess(r.random((45, 61, 3))), r"mask_image.*colour HWC.*\[\.\.\., 0\]"),
        (lambda: MASKS.preprocess(r.random((2, 45, 61, 3))), r"mask_image.*3 channels.*\[\.\.\., :1\]"),
        (lambda: VaeImageProcessor(do_convert_rgb=True).preprocess(r.random((45, 61, 4))), r"needs 3 \(RGB\)"),
        (lambda: IMAGES.preprocess((r.random((45, 61, 3)) * 255).astype(np.uint8)), r"uint8.*/ 255"),
        (lambda: IMAGES.preprocess(r.random((45, 61, 3)) * 255), r"values in \[.*\].*divide.*255"),
        (lambda: MASKS.preprocess(r.random((45, 61)) * 255), r"mask_image.*\[0, 1\]"),
        (lambda: IMAGES.preprocess(np.full((45, 61, 3), np.nan)), r"NaN"),
        (lambda: IMAGES.preprocess([img, r.random((45, 61, 3))]), r"mixes PIL images and arrays"),
        (lambda: IMAGES.preprocess([r.random((45, 61, 3)), r.random((40, 61, 3))]), r"different shapes.*resize"),
        (lambda: IMAGES.preprocess([r.random((45, 61, 3)), r.random((45, 61))]), r"HW, HWC or NHWC"),
        (lambda: IMAGES.preprocess(r.random((2, 2, 45, 61, 3))), r"HW, HWC or NHWC"),
        (lambda: VaeImageProcessor(do_resize=False).preprocess([img, pil_image(40, 40)]), r"different sizes"),
        (lambda: IMAGES.preprocess([]), r"empty list"),
        (lambda: IMAGES.preprocess(r.random((45, 61, 3)), resize_mode="fill"), r"needs PIL input"),
        (lambda: IMAGES.preprocess(r.random((45, 61, 3)), crops_coords=(0, 0, 8, 8)), r"crops_coords needs PIL"),
        (lambda: IMAGES.preprocess(img, resize_mode="stretch"), r"resize_mode='stretch'.*'default'"),
        (lambda: IMAGES.preprocess(img.convert("P")), r"mode 'P'.*convert\('RGB'\)"),
        (lambda: IMAGES.preprocess(pil_image(7, 30)), r"at least vae_scale_factor"),
        (lambda: IMAGES.preprocess(img, height=0, width=64), r"`height` must be a positive int"),
        (lambda: IMAGES.preprocess(img, height=64.0, width=64), r"`height` must be a positive int"),
        (lambda: IMAGES.preprocess(torch.zeros(1, 3, 8, 8)), r"torch tensor.*permute"),
        (lambda: IMAGES.preprocess("image.png"), r"PIL image, a numpy array"),
        (lambda: IMAGES.postprocess(np.zeros((1, 3, 8, 8)), output_type="pt"), r"output_type='pt'"),
        (lambda: IMAGES.postprocess(np.zeros((3, 8, 8))), r"NCHW"),
        (lambda: IMAGES.postprocess(np.zeros((2, 3, 8, 8)), do_denormalize=[True]), r"do_denormalize"),
        (lambda: VaeImageProcessor(do_convert_rgb=True, do_convert_grayscale=True), r"cannot both be True"),
        (lambda: VaeImageProcessor(resample="box"), r"resample='box'"),
        (lambda: make_image_grid([img] * 3, 2, 2), r"3 images for a 2x2 grid"),
        (lambda: IMAGES.get_crop_region(pil_mask(61, 45, (0, 0, 0, 0)), 64, 64), r"all black"),
        (lambda: IMAGES.apply_overlay(mask.resize((30, 20)), img, img), r"`mask` is 30x20"),
        (lambda: IMAGES.apply_overlay(mask, img, img.resize((64, 48))), r"pass crop_coords"),
        (lambda: preprocess_inpaint(np.zeros((45, 61, 3)), mask, 64, 64, padding_mask_crop=4), r"`image` as one PIL"),
        (lambda: preprocess_inpaint(img, [mask], 64, 64, padding_mask_crop=4), r"`mask_image` as one PIL"),
        (lambda: preprocess_inpaint(img, mask.resize((30, 20)), 64, 64, padding_mask_crop=4), r"of one size"),
        (lambda: masked_image(np.zeros((1, 3, 64, 64)), np.zeros((1, 1, 32, 32))), r"same height and width"),
        (lambda: masked_image(np.zeros((2, 3, 64, 64)), np.zeros((3, 1, 64, 64))), r"batch of 2.*3"),
        (lambda: masked_image(np.zeros((1, 3, 64, 64)), np.zeros((1, 3, 64, 64))), r"\[N, 1, H, W\]"),
    ]


@pytest.mark.parametrize("case", range(len(_errors())))
def test_bad_input_raises_clear_error(case):
    fn, match = _errors()[case]
    with pytest.raises((ValueError, TypeError), match=match):
        fn()
