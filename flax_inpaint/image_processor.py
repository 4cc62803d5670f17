"""Host-side image and mask processing for the inpaint pipelines (numpy / PIL, outside jit).

Behaviour follows diffusers' `VaeImageProcessor` (diffusers/image_processor.py) and
`diffusers.utils.make_image_grid` output for output, so images prepared here equal the ones diffusers'
StableDiffusionInpaintPipeline feeds its VAE:

* sizes are floored to multiples of `vae_scale_factor`; PIL images are resized with Lanczos, numpy
  arrays with nearest-neighbour (the index rule of torch's `F.interpolate(mode="nearest")`);
* images go to [-1, 1] (`do_normalize`), masks to single-channel {0, 1} (`do_convert_grayscale`,
  `do_binarize`, threshold 0.5); `masked_image = image * (mask < 0.5)`;
* accepted inputs: a PIL image or a list of them; numpy arrays (or anything `np.asarray` reads, e.g.
  jax arrays), channels-last, float in [0, 1]: HW, HWC, NHWC or a list of them; masks also NHW and NHW1.
  diffusers reads channel-first arrays only as torch tensors; a channel-first numpy array (NCHW, N1HW)
  it silently misreads, so here it is an error that says how to transpose.

Deliberate differences, all where diffusers fails late or returns garbage: inputs it misreads (integer
or out-of-range numpy arrays, channel-first numpy, palette/CMYK PIL images for an RGB processor,
differently sized arrays in one batch, crop coordinates with numpy input, an all-black mask for
`padding_mask_crop`, unknown `output_type`) raise a ValueError naming the argument and the fix.
`preprocess` always returns float32 NCHW (diffusers keeps a float64 input's dtype).
"""
from __future__ import annotations

import dataclasses
import io
import numbers
import os
import urllib.request
import warnings
from typing import Any, Callable, List, Literal, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import PIL.Image
from PIL import Image, ImageFilter, ImageOps

ResizeMode = Literal["default", "fill", "crop"]
CropCoords = Tuple[int, int, int, int]  # (x1, y1, x2, y2), PIL box order
ImageInput = Union[PIL.Image.Image, np.ndarray, Sequence[PIL.Image.Image], Sequence[np.ndarray]]

# diffusers' `resample` names -> PIL filters ("linear" is an alias of "bilinear").
_RESAMPLE = {name: Image.Resampling[name.upper()] for name in ("bilinear", "bicubic", "lanczos", "nearest")}
_RESAMPLE["linear"] = _RESAMPLE["bilinear"]
_RESIZE_MODES = ("default", "fill", "crop")
_OUTPUT_TYPES = ("np", "pil", "latent")
_PIL_PIXEL_MODES = ("RGB", "RGBA", "L")  # modes np.array() reads as 0..255 pixels with 3/4/1 channels
_RANGE_SLACK = 1e-3  # tolerated float error past the ends of [0, 1]


def _is_torch(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


def _as_array(x: Any, name: str) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    if _is_torch(x):
        raise TypeError(
            f"`{name}` is a torch tensor; pass a PIL image or a channels-last numpy array in [0, 1] instead, "
            "e.g. `t.permute(0, 2, 3, 1).cpu().numpy()` for an NCHW tensor."
        )
    if hasattr(x, "__array__") and hasattr(x, "shape"):  # jax arrays and other array-likes
        return np.asarray(x)
    raise TypeError(
        f"`{name}` must be a PIL image, a numpy array, or a list of either; got {type(x).__name__}."
    )


@dataclasses.dataclass(frozen=True)
class VaeImageProcessor:
    """Pre/post-processing between user images and the VAE; field names are diffusers' config keys.

    vae_scale_factor: output height/width are floored to multiples of this (8 for SD VAEs).
    do_resize: resize to the requested (or floored) size; off, inputs pass at their own size.
    do_normalize: map [0, 1] to [-1, 1] (images); off for masks.
    do_binarize: values < 0.5 -> 0, >= 0.5 -> 1 (masks).
    do_convert_grayscale: PIL inputs are converted to "L"; numpy inputs must be single-channel (masks).
    do_convert_rgb: PIL inputs are converted to "RGB"; numpy inputs must have 3 channels.
    resample: PIL filter for resizing: "lanczos" (default), "bicubic", "bilinear"/"linear", "nearest".
    reducing_gap: PIL `Image.resize` reducing_gap (None = exact resampling).
    """

    vae_scale_factor: int = 8
    do_resize: bool = True
    do_normalize: bool = True
    do_binarize: bool = False
    do_convert_grayscale: bool = False
    do_convert_rgb: bool = False
    resample: str = "lanczos"
    reducing_gap: Optional[float] = None

    def __post_init__(self):
        if not isinstance(self.vae_scale_factor, numbers.Integral) or self.vae_scale_factor < 1:
            raise ValueError(f"vae_scale_factor must be a positive int, got {self.vae_scale_factor!r}.")
        if self.resample not in _RESAMPLE:
            raise ValueError(f"resample={self.resample!r} is not supported; use one of {sorted(_RESAMPLE)}.")
        if self.do_convert_rgb and self.do_convert_grayscale:
            raise ValueError(
                "do_convert_rgb and do_convert_grayscale cannot both be True: set do_convert_grayscale=False "
                "to get RGB images, or do_convert_rgb=False to get grayscale ones."
            )

    @classmethod
    def for_masks(cls, vae_scale_factor: int = 8, **kwargs: Any) -> "VaeImageProcessor":
        """The mask processor of diffusers' inpaint pipelines: grayscale, not normalised, binarised at 0.5."""
        kwargs = {"do_normalize": False, "do_binarize": True, "do_convert_grayscale": True, **kwargs}
        return cls(vae_scale_factor=vae_scale_factor, **kwargs)

    @property
    def config(self) -> "VaeImageProcessor":
        """diffusers-style access (`processor.config.vae_scale_factor`)."""
        return self

    def _default_name(self) -> str:
        return "mask_image" if self.do_binarize and self.do_convert_grayscale else "image"

    # ------------------------------------------------------------------ conversions (static, as diffusers)

    @staticmethod
    def numpy_to_pil(images: np.ndarray) -> List[PIL.Image.Image]:
        """[N,]H,W,C floats in [0, 1] -> list of PIL images (C=1 gives mode "L"); rounds to nearest."""
        batch = np.asarray(images)
        batch = batch[np.newaxis] if batch.ndim == 3 else batch
        if batch.ndim != 4:
            raise ValueError(f"numpy_to_pil expects an HWC or NHWC array, got shape {batch.shape}.")
        pixels = np.round(batch * 255).astype(np.uint8)
        if pixels.shape[-1] == 1:  # a 2-D uint8 array becomes mode "L"
            pixels = pixels[..., 0]
        return list(map(Image.fromarray, pixels))

    @staticmethod
    def pil_to_numpy(images: Union[PIL.Image.Image, Sequence[PIL.Image.Image]]) -> np.ndarray:
        """PIL image(s) -> float32 N,H,W[,C] array in [0, 1] (pixels / 255)."""
        batch = [images] if isinstance(images, PIL.Image.Image) else images
        return np.stack([np.asarray(img, dtype=np.float32) for img in batch]) / np.float32(255)

    @staticmethod
    def normalize(images: np.ndarray) -> np.ndarray:
        """[0, 1] -> [-1, 1]."""
        return 2.0 * images - 1.0

    @staticmethod
    def denormalize(images: np.ndarray) -> np.ndarray:
        """[-1, 1] -> [0, 1], clipped."""
        return np.clip(images * 0.5 + 0.5, 0, 1)

    @staticmethod
    def convert_to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
        return image.convert("RGB")

    @staticmethod
    def convert_to_grayscale(image: PIL.Image.Image) -> PIL.Image.Image:
        return image.convert("L")

    @staticmethod
    def blur(image: PIL.Image.Image, blur_factor: float = 4) -> PIL.Image.Image:
        """Gaussian blur with radius `blur_factor` (softens a mask's edge before inpainting)."""
        if not isinstance(image, PIL.Image.Image):
            raise TypeError(f"blur expects a PIL image, got {type(image).__name__}.")
        return image.filter(ImageFilter.GaussianBlur(blur_factor))

    def binarize(self, image: np.ndarray) -> np.ndarray:
        """Values < 0.5 -> 0, >= 0.5 -> 1 (NaN stays NaN). Returns a new array."""
        image = np.asarray(image)
        low_or_nan = np.where(image < 0.5, 0, image)
        return np.where(image >= 0.5, 1, low_or_nan).astype(image.dtype, copy=False)

    # ------------------------------------------------------------------ sizes and resizing

    def _array_hw(self, image: np.ndarray) -> Tuple[int, int]:
        """Height and width of a numpy input, in the layout `preprocess` reads it."""
        if image.ndim == 2:  # HW
            return image.shape[0], image.shape[1]
        if image.ndim == 3:
            if self.do_convert_grayscale and image.shape[-1] != 1:  # NHW mask
                return image.shape[1], image.shape[2]
            return image.shape[0], image.shape[1]  # HWC (or HW1)
        return image.shape[1], image.shape[2]  # NHWC

    def get_default_height_width(
        self, image: ImageInput, height: Optional[int] = None, width: Optional[int] = None
    ) -> Tuple[int, int]:
        """(height, width) from the arguments or, where None, from `image`; both floored to multiples
        of `vae_scale_factor` (diffusers floors rather than raising; pipelines reject explicit
        non-multiples themselves)."""
        if height is None or width is None:
            first = image[0] if isinstance(image, (list, tuple)) and len(image) else image
            if isinstance(first, PIL.Image.Image):
                h, w = first.height, first.width
            else:
                h, w = self._array_hw(_as_array(first, "image"))
            height = h if height is None else height
            width = w if width is None else width
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
        floored = tuple(int(x - x % self.vae_scale_factor) for x in (height, width))
        if 0 in floored:
            raise ValueError(
                f"height={height}, width={width} floor to {floored[0]}x{floored[1]}: both must be at least "
                f"vae_scale_factor={self.vae_scale_factor}. Pass a larger image or larger height/width."
            )
        return floored

    def _scale_and_centre(
        self, image: PIL.Image.Image, width: int, height: int, cover: bool
    ) -> Tuple[PIL.Image.Image, Tuple[int, int]]:
        """`image` scaled with its aspect ratio kept to fit inside (cover=False) or to cover (cover=True)
        a width x height frame, and the top-left offset that centres it there."""
        src_w, src_h = image.size
        # Scaling to the frame's width fits inside when the source is relatively wider than the frame,
        # and covers it when it is narrower (at equal aspect ratios both scalings give width x height).
        source_is_wider = src_w * height > width * src_h
        size = (width, src_h * width // src_w) if source_is_wider != cover else (src_w * height // src_h, height)
        scaled = image.resize(size, resample=_RESAMPLE[self.resample])
        # Each side is halved before subtracting (diffusers' rounding), not (frame - size) // 2.
        return scaled, (width // 2 - size[0] // 2, height // 2 - size[1] // 2)

    def _resize_and_fill(self, image: PIL.Image.Image, width: int, height: int) -> PIL.Image.Image:
        """Fit inside (width, height) keeping the aspect ratio, centre it, and fill the bars by
        stretching the image's edge rows/columns."""
        scaled, (left, top) = self._scale_and_centre(image, width, height, cover=False)
        canvas = Image.new("RGB", (width, height))
        canvas.paste(scaled, box=(left, top))
        w, h = scaled.size
        # Each bar stretches a zero-thickness source box on the matching edge of `scaled`; both bars
        # are as thick as the leading one. PIL's default filter, as diffusers.
        if top > 0:  # bars above and below
            bar_size, bars = (w, top), [((0, 0, w, 0), (0, 0)), ((0, h, w, h), (0, top + h))]
        elif left > 0:  # bars left and right
            bar_size, bars = (left, h), [((0, 0, 0, h), (0, 0)), ((w, 0, w, h), (left + w, 0))]
        else:
            return canvas
        for source_box, corner in bars:
            canvas.paste(scaled.resize(bar_size, box=source_box), box=corner)
        return canvas

    def _resize_and_crop(self, image: PIL.Image.Image, width: int, height: int) -> PIL.Image.Image:
        """Cover (width, height) keeping the aspect ratio, centre it, and crop the excess."""
        scaled, corner = self._scale_and_centre(image, width, height, cover=True)
        canvas = Image.new("RGB", (width, height))
        canvas.paste(scaled, box=corner)
        return canvas

    def resize(
        self,
        image: Union[PIL.Image.Image, np.ndarray],
        height: int,
        width: int,
        resize_mode: ResizeMode = "default",
    ) -> Union[PIL.Image.Image, np.ndarray]:
        """Resize a PIL image (filter `resample`; modes "default" = stretch, "fill", "crop") or a numpy
        NHWC / NHW array (nearest neighbour, "default" only; NHW comes back NHW1)."""
        if resize_mode not in _RESIZE_MODES:
            raise ValueError(f"resize_mode={resize_mode!r} is not supported; use one of {_RESIZE_MODES}.")
        if isinstance(image, PIL.Image.Image):
            keep_aspect = {"fill": self._resize_and_fill, "crop": self._resize_and_crop}.get(resize_mode)
            if keep_aspect is not None:
                return keep_aspect(image, width, height)
            return image.resize((width, height), resample=_RESAMPLE[self.resample], reducing_gap=self.reducing_gap)
        if resize_mode != "default":
            raise ValueError(
                f"resize_mode={resize_mode!r} needs PIL image input; numpy arrays support only 'default'."
            )
        image = _as_array(image, "image")
        if image.ndim == 3:
            image = image[..., None]
        if image.ndim != 4:
            raise ValueError(f"resize expects a PIL image or an NHWC / NHW array, got shape {image.shape}.")
        rows = nearest_indices(image.shape[1], height)
        cols = nearest_indices(image.shape[2], width)
        return image[:, rows][:, :, cols]

    # ------------------------------------------------------------------ preprocess / postprocess

    def _gather(self, image: Any, name: str) -> Union[List[PIL.Image.Image], np.ndarray]:
        """User input -> a list of PIL images, or one float32 NHWC array (layout decided as diffusers)."""
        if isinstance(image, tuple):
            image = list(image)
        if not isinstance(image, list):
            if isinstance(image, PIL.Image.Image):
                return [image]
            array = _as_array(image, name)
            if self.do_convert_grayscale and array.ndim == 3:
                if array.shape[-1] == 1:  # HW1
                    array = array[None]
                elif array.shape[-1] in (3, 4):
                    raise ValueError(
                        f"`{name}` has shape {array.shape}, which reads as a colour HWC image; a mask array "
                        f"must be single-channel (HW, HW1, NHW or NHW1): pass `{name}[..., 0]` or a PIL image."
                    )
                else:  # NHW
                    array = array[..., None]
            image = [array]
        if not image:
            raise ValueError(f"`{name}` is an empty list; pass at least one image.")

        if all(isinstance(i, PIL.Image.Image) for i in image):
            return image
        if any(isinstance(i, PIL.Image.Image) for i in image):
            raise ValueError(f"`{name}` mixes PIL images and arrays; pass a list of one kind.")

        arrays = [_as_array(i, name) for i in image]
        ndims = {a.ndim for a in arrays}
        if len(ndims) > 1 or not ndims <= {2, 3, 4}:
            raise ValueError(
                f"`{name}` arrays must all be HW, HWC or NHWC (2, 3 or 4 dims, channels last); got shapes "
                f"{[a.shape for a in arrays]}."
            )
        item_shapes = {a.shape[1:] if a.ndim == 4 else a.shape for a in arrays}
        if len(item_shapes) > 1:
            raise ValueError(
                f"`{name}` arrays have different shapes {[a.shape for a in arrays]}; resize them to one size "
                "first, or pass PIL images (which are all resized to the first image's size)."
            )
        array = np.concatenate(arrays, axis=0) if arrays[0].ndim == 4 else np.stack(arrays, axis=0)
        if array.ndim == 3:
            array = array[..., None]

        channels = array.shape[-1]
        layout_hint = (
            f"numpy images are channels-last: transpose NCHW with `np.transpose({name}, (0, 2, 3, 1))`"
        )
        if self.do_convert_grayscale and channels != 1:
            raise ValueError(
                f"`{name}` reads as {array.shape} (NHWC) with {channels} channels; a mask array must be "
                f"single-channel (HW, HW1, NHW or NHW1). {layout_hint}; for a colour mask take one channel, "
                f"`{name}[..., :1]`; or pass a PIL image."
            )
        if self.do_convert_rgb and channels != 3:
            raise ValueError(
                f"`{name}` reads as {array.shape} (NHWC) with {channels} channels; this processor needs 3 (RGB). "
                f"{layout_hint}, or pass a PIL image."
            )
        if channels not in (1, 3, 4):
            raise ValueError(
                f"`{name}` reads as {array.shape} (NHWC) with {channels} channels; expected 1, 3 or 4. {layout_hint}."
            )

        if array.dtype != np.bool_ and not np.issubdtype(array.dtype, np.floating):
            raise ValueError(
                f"`{name}` has dtype {array.dtype}; numpy images must be float in [0, 1]: "
                f"use `{name}.astype(np.float32) / 255` for 8-bit pixels."
            )
        return array.astype(np.float32, copy=False)

    def _check_range(self, image: np.ndarray, name: str) -> bool:
        """Validates numpy value ranges; returns whether to normalise (diffusers skips it, with a
        FutureWarning, for inputs that already have negative values, i.e. are in [-1, 1])."""
        if not np.isfinite(image).all():
            raise ValueError(f"`{name}` contains NaN or infinite values.")
        lo, hi = float(image.min()), float(image.max())
        if self.do_normalize and lo < 0:
            warnings.warn(
                f"`{name}` has values in [{lo}, {hi}]; it is taken to be normalised to [-1, 1] already and "
                "is not normalised again. Pass images in [0, 1].",
                FutureWarning,
                stacklevel=3,
            )
            if lo < -1 - _RANGE_SLACK or hi > 1 + _RANGE_SLACK:
                raise ValueError(f"`{name}` has values in [{lo}, {hi}]; pass images in [0, 1].")
            return False
        if lo < -_RANGE_SLACK or hi > 1 + _RANGE_SLACK:
            raise ValueError(
                f"`{name}` has values in [{lo}, {hi}]; numpy images and masks must be in [0, 1] "
                f"(divide 8-bit pixel values by 255)."
            )
        return self.do_normalize

    def preprocess(
        self,
        image: ImageInput,
        height: Optional[int] = None,
        width: Optional[int] = None,
        resize_mode: ResizeMode = "default",
        crops_coords: Optional[CropCoords] = None,
        *,
        input_name: Optional[str] = None,
    ) -> np.ndarray:
        """User image(s) -> float32 NCHW array ([-1, 1] for images, {0, 1} N1HW for masks).

        height/width default to the (first) image's size; both are floored to multiples of
        vae_scale_factor. resize_mode "fill"/"crop" and crops_coords (x1, y1, x2, y2) need PIL input.
        input_name names the argument in error messages ("image" / "mask_image" by default).
        """
        name = input_name or self._default_name()
        if resize_mode not in _RESIZE_MODES:
            raise ValueError(f"resize_mode={resize_mode!r} is not supported; use one of {_RESIZE_MODES}.")
        images = self._gather(image, name)

        if isinstance(images, list):  # PIL
            if not (self.do_convert_rgb or self.do_convert_grayscale):
                bad = sorted({i.mode for i in images} - set(_PIL_PIXEL_MODES))
                if bad:
                    raise ValueError(
                        f"`{name}` has PIL mode {bad[0]!r}; this processor reads {_PIL_PIXEL_MODES}: "
                        f"convert it first, e.g. `{name}.convert('RGB')`."
                    )
            if crops_coords is not None:
                images = [i.crop(tuple(crops_coords)) for i in images]
            if self.do_resize:
                height, width = self.get_default_height_width(images[0], height, width)
                images = [self.resize(i, height, width, resize_mode=resize_mode) for i in images]
            elif len({i.size for i in images}) > 1:
                raise ValueError(
                    f"`{name}` images have different sizes {[i.size for i in images]} and do_resize=False; "
                    "resize them to one size first."
                )
            if self.do_convert_rgb:
                images = [self.convert_to_rgb(i) for i in images]
            elif self.do_convert_grayscale:
                images = [self.convert_to_grayscale(i) for i in images]
            array = self.pil_to_numpy(images)
            if array.ndim == 3:
                array = array[..., None]
            do_normalize = self.do_normalize
        else:
            array = images
            if resize_mode != "default":
                raise ValueError(
                    f"resize_mode={resize_mode!r} needs PIL input, but `{name}` is a numpy array; "
                    "use resize_mode='default' or pass PIL images."
                )
            if crops_coords is not None:
                raise ValueError(
                    f"crops_coords needs PIL input, but `{name}` is a numpy array; crop the array yourself "
                    "or pass PIL images."
                )
            do_normalize = self._check_range(array, name)
            if self.do_resize:
                height, width = self.get_default_height_width(array, height, width)
                array = self.resize(array, height, width)

        array = np.ascontiguousarray(array.transpose(0, 3, 1, 2))
        if do_normalize:
            array = self.normalize(array)
        if self.do_binarize:
            array = self.binarize(array)
        return array.astype(np.float32, copy=False)

    def postprocess(
        self,
        image: np.ndarray,
        output_type: str = "pil",
        do_denormalize: Optional[Sequence[bool]] = None,
    ) -> Union[np.ndarray, List[PIL.Image.Image]]:
        """Decoded NCHW images in [-1, 1] -> float32 NHWC in [0, 1] ("np") or PIL images ("pil").
        "latent" returns the input unchanged. do_denormalize: per-image override of do_normalize."""
        if output_type not in _OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r} is not supported; use one of {_OUTPUT_TYPES}.")
        image = _as_array(image, "image")
        if output_type == "latent":
            return image
        if image.ndim != 4:
            raise ValueError(f"postprocess expects an NCHW batch, got shape {image.shape}.")
        image = image.astype(np.float32)
        if do_denormalize is None:
            if self.do_normalize:
                image = self.denormalize(image)
        else:
            if len(do_denormalize) != image.shape[0]:
                raise ValueError(
                    f"do_denormalize has {len(do_denormalize)} entries for a batch of {image.shape[0]} images."
                )
            image = np.stack([self.denormalize(x) if d else x for x, d in zip(image, do_denormalize)])
        image = np.ascontiguousarray(image.transpose(0, 2, 3, 1))
        if output_type == "np":
            return image
        return self.numpy_to_pil(image)

    # ------------------------------------------------------------------ padding_mask_crop support

    @staticmethod
    def get_crop_region(mask_image: PIL.Image.Image, width: int, height: int, pad: int = 0) -> CropCoords:
        """(x1, y1, x2, y2): the bounding box of the mask's non-zero pixels, grown by `pad` on each side
        (clipped to the image) and then widened to the aspect ratio width:height of the processing size."""
        if not isinstance(mask_image, PIL.Image.Image):
            raise TypeError(f"get_crop_region expects `mask_image` as a PIL image, got {type(mask_image).__name__}.")
        mask = np.asarray(mask_image.convert("L"))
        h, w = mask.shape
        cols = np.flatnonzero(mask.any(axis=0))
        rows = np.flatnonzero(mask.any(axis=1))
        if cols.size == 0:
            raise ValueError(
                "`mask_image` is all black, so padding_mask_crop has no region to crop; paint the area to "
                "inpaint white, or leave padding_mask_crop=None."
            )
        x1, x2 = _pad_span(int(cols[0]), int(cols[-1]) + 1, pad, w)
        y1, y2 = _pad_span(int(rows[0]), int(rows[-1]) + 1, pad, h)
        aspect = width / height
        if (x2 - x1) / (y2 - y1) > aspect:  # too wide for width:height: grow the rows
            y1, y2 = _stretch_span(y1, y2, (x2 - x1) / aspect, h)
        else:  # too narrow (or exact): grow the columns
            x1, x2 = _stretch_span(x1, x2, (y2 - y1) * aspect, w)
        return x1, y1, x2, y2

    def apply_overlay(
        self, mask: Image.Image, init_image: Image.Image, image: Image.Image, crop_coords: Optional[CropCoords] = None
    ) -> Image.Image:
        """Paste the unmasked pixels of `init_image` over the generated `image`, so they come back exactly.

        With crop_coords, `image` is the inpainted crop: it is resized ("crop" mode) into the box on
        an empty canvas the size of init_image first. Returns an RGB image of init_image's size.
        """
        for name, value in (("mask", mask), ("init_image", init_image), ("image", image)):
            if not isinstance(value, PIL.Image.Image):
                raise TypeError(f"apply_overlay expects `{name}` as a PIL image, got {type(value).__name__}.")
        width, height = init_image.size
        if mask.size != init_image.size:
            raise ValueError(
                f"apply_overlay: `mask` is {mask.size[0]}x{mask.size[1]} but `init_image` is {width}x{height}; "
                "pass the original, unresized mask and image."
            )
        if crop_coords is None and image.size != init_image.size:
            raise ValueError(
                f"apply_overlay: `image` is {image.size[0]}x{image.size[1]} but `init_image` is {width}x{height}; "
                "pass crop_coords for an inpainted crop, or resize `image` to init_image's size."
            )

        # init_image where the mask is black, fading to transparent where it is white. Pasted as
        # premultiplied RGBa so that masked-out pixels carry no colour (as diffusers).
        keep_mask = ImageOps.invert(mask.convert("L"))  # 255 where init_image stays
        kept = Image.new("RGBa", (width, height))
        kept.paste(init_image.convert("RGBA").convert("RGBa"), mask=keep_mask)

        if crop_coords is None:
            result = image.convert("RGBA")
        else:  # the inpainted crop goes back into its box on a black, opaque canvas
            left, top, right, bottom = crop_coords
            canvas = Image.new("RGB", (width, height))
            canvas.paste(self.resize(image, bottom - top, right - left, resize_mode="crop"), (left, top))
            result = canvas.convert("RGBA")
        result.alpha_composite(kept.convert("RGBA"))
        return result.convert("RGB")


def _pad_span(lo: int, hi: int, pad: int, size: int) -> Tuple[int, int]:
    """[lo, hi) grown by `pad` on both sides and clipped to [0, size]."""
    return int(max(lo - pad, 0)), int(min(hi + pad, size))


def _stretch_span(lo: int, hi: int, length: float, size: int) -> Tuple[int, int]:
    """[lo, hi) grown towards `length`: the shortfall, truncated to an int, is split half before (rounded
    down) and the rest after. The span is then slid back inside [0, size] (first off the far end, then
    off 0) and, if still longer, cut at size."""
    grow = int(length - (hi - lo))
    lo, hi = lo - grow // 2, hi + (grow - grow // 2)
    overshoot = max(hi - size, 0)
    lo, hi = lo - overshoot, hi - overshoot
    undershoot = max(-lo, 0)
    return lo + undershoot, min(hi + undershoot, size)


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source indices of torch's `F.interpolate(mode="nearest")` along one axis (float32 scale, floor)."""
    if out_size == in_size:
        return np.arange(out_size)
    if out_size == 2 * in_size:
        return np.arange(out_size) >> 1
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(src, in_size - 1)


def masked_image(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The inpaint UNet's masked-image input: `image * (mask < 0.5)`, i.e. the pixels to keep, with the
    region to repaint zeroed (0 in [-1, 1] is mid-gray).

    image: [N, C, H, W] from `VaeImageProcessor.preprocess`; mask: [N or 1, 1, H, W] from the mask
    processor (a batch of 1 on either side broadcasts).
    """
    image = np.asarray(image)
    mask = np.asarray(mask)
    if image.ndim != 4 or mask.ndim != 4 or mask.shape[1] != 1:
        raise ValueError(
            f"masked_image expects `image` [N, C, H, W] and `mask_image` [N, 1, H, W] (preprocessed); got "
            f"{image.shape} and {mask.shape}."
        )
    if image.shape[2:] != mask.shape[2:]:
        raise ValueError(
            f"`image` is {image.shape[3]}x{image.shape[2]} but `mask_image` is {mask.shape[3]}x{mask.shape[2]} "
            "after preprocessing; preprocess both with the same height and width."
        )
    if image.shape[0] != mask.shape[0] and 1 not in (image.shape[0], mask.shape[0]):
        raise ValueError(
            f"`image` has a batch of {image.shape[0]} but `mask_image` one of {mask.shape[0]}; pass one mask, "
            "one image, or as many masks as images."
        )
    return (image * (mask < 0.5)).astype(np.float32)


class InpaintInputs(NamedTuple):
    image: np.ndarray  # [N, C, H, W] float32 in [-1, 1]
    mask: np.ndarray  # [M, 1, H, W] float32 in {0, 1}; 1 = repaint
    masked_image: np.ndarray  # image * (mask < 0.5)
    crops_coords: Optional[CropCoords]  # set when padding_mask_crop was used; pass to postprocess_inpaint


def preprocess_inpaint(
    image: ImageInput,
    mask_image: ImageInput,
    height: int,
    width: int,
    padding_mask_crop: Optional[int] = None,
    image_processor: Optional[VaeImageProcessor] = None,
    mask_processor: Optional[VaeImageProcessor] = None,
) -> InpaintInputs:
    """Steps 5 and 7 of diffusers' StableDiffusionInpaintPipeline: image, mask and masked image at
    (height, width). With padding_mask_crop=p, only the mask's bounding box grown by p pixels (widened to
    the height:width aspect ratio) is processed, at full resolution ("fill" resize); paste the result
    back with `postprocess_inpaint`. Needs single PIL images of one size then."""
    image_processor = image_processor or VaeImageProcessor()
    mask_processor = mask_processor or VaeImageProcessor.for_masks(image_processor.vae_scale_factor)
    crops_coords, resize_mode = None, "default"
    if padding_mask_crop is not None:
        for name, value in (("image", image), ("mask_image", mask_image)):
            if not isinstance(value, PIL.Image.Image):
                raise ValueError(
                    f"padding_mask_crop needs `{name}` as one PIL image, got {type(value).__name__}."
                )
        if image.size != mask_image.size:
            raise ValueError(
                f"padding_mask_crop needs `image` and `mask_image` of one size; got {image.size[0]}x{image.size[1]} "
                f"and {mask_image.size[0]}x{mask_image.size[1]}. Resize the mask to the image first."
            )
        crops_coords = mask_processor.get_crop_region(mask_image, width, height, pad=padding_mask_crop)
        resize_mode = "fill"
    init = image_processor.preprocess(
        image, height, width, resize_mode=resize_mode, crops_coords=crops_coords, input_name="image"
    )
    mask = mask_processor.preprocess(
        mask_image, height, width, resize_mode=resize_mode, crops_coords=crops_coords, input_name="mask_image"
    )
    return InpaintInputs(init, mask, masked_image(init, mask), crops_coords)


def postprocess_inpaint(
    images: Sequence[PIL.Image.Image],
    image: PIL.Image.Image,
    mask_image: PIL.Image.Image,
    crops_coords: Optional[CropCoords],
    image_processor: Optional[VaeImageProcessor] = None,
) -> List[PIL.Image.Image]:
    """After padding_mask_crop: paste each generated crop back into the original `image`, keeping its
    unmasked pixels exactly. Without crops_coords the images are returned unchanged (as diffusers)."""
    if crops_coords is None:
        return list(images)
    image_processor = image_processor or VaeImageProcessor()
    return [image_processor.apply_overlay(mask_image, image, i, crops_coords) for i in images]


def make_image_grid(
    images: Sequence[PIL.Image.Image], rows: int, cols: int, resize: Optional[int] = None
) -> PIL.Image.Image:
    """Tile `rows * cols` images row by row into one RGB image (each first resized to resize x resize)."""
    if len(images) != rows * cols:
        raise ValueError(
            f"make_image_grid got {len(images)} images for a {rows}x{cols} grid; pass exactly {rows * cols}."
        )
    tiles = list(images) if resize is None else [img.resize((resize, resize)) for img in images]
    tile_w, tile_h = tiles[0].size
    grid = Image.new("RGB", (cols * tile_w, rows * tile_h))
    for index, tile in enumerate(tiles):
        row, col = divmod(index, cols)
        grid.paste(tile, box=(col * tile_w, row * tile_h))
    return grid


def load_image(image: Union[str, os.PathLike, PIL.Image.Image],
               convert_method: Optional[Callable[[PIL.Image.Image], PIL.Image.Image]] = None,
               timeout: float = 60.0) -> PIL.Image.Image:
    """An image from a local path, an http(s) URL or a PIL image, as `diffusers.utils.load_image` gives
    it: EXIF orientation applied, then `convert_method(image)` or, by default, converted to RGB."""
    if isinstance(image, (str, os.PathLike)):
        name = os.fspath(image)
        if name.startswith(("http://", "https://")):
            with urllib.request.urlopen(name, timeout=timeout) as response:
                image = Image.open(io.BytesIO(response.read()))
        elif os.path.isfile(name):
            image = Image.open(name)
        else:
            raise ValueError(f"load_image: {name!r} is neither an existing file nor an http(s) URL.")
    elif not isinstance(image, PIL.Image.Image):
        raise ValueError(f"load_image takes a path, an http(s) URL or a PIL image; got {type(image).__name__}.")
    image = ImageOps.exif_transpose(image)
    return convert_method(image) if convert_method is not None else image.convert("RGB")
