"""Procedural training data: coloured shapes on coloured or textured backgrounds, with captions.

Everything is drawn from signed distance functions in numpy, vectorised over the batch, so a batch of
64x64 scenes costs a few milliseconds and any step's batch can be regenerated from (seed, step) on
resume. Colours come from a small palette; every scene has a caption such as
"a red circle on a blue background". `build_tokenizer` writes a real CLIP BPE tokenizer whose merges
make each caption word one token, so the text encoder trains on words, not letters.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Dict, List, NamedTuple, Sequence, Tuple

import numpy as np

PALETTE: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
}
COLOURS: Tuple[str, ...] = tuple(PALETTE)
SHAPES: Tuple[str, ...] = ("circle", "square", "triangle")
WORDS: Tuple[str, ...] = ("a", "on", "background", *COLOURS, *SHAPES)
RGB = np.array([PALETTE[c] for c in COLOURS], np.float32) / 255.0  # [colours, 3] in [0, 1]

# Unit triangle with vertices (0, -1), (1, 1), (-1, 1) (image coordinates, y down): the outward
# normal of each edge and the edge's distance from the centre. It fills the square [-1, 1]^2.
_TRI_NORMALS = np.array([[0.0, 1.0], [2.0, -1.0], [-2.0, -1.0]]) / np.array([[1.0], [5**0.5], [5**0.5]])
_TRI_OFFSETS = np.array([1.0, 5**-0.5, 5**-0.5])


class Scenes(NamedTuple):
    """A batch of scenes; the captioned shape is drawn last, on top of any distractor."""

    images: np.ndarray  # [N, H, W, 3] float32 in [0, 1]
    shape: np.ndarray  # [N] int, index into SHAPES
    colour: np.ndarray  # [N] int, index into COLOURS (the shape's)
    background: np.ndarray  # [N] int, index into COLOURS
    centre: np.ndarray  # [N, 2] float (x, y) pixels
    radius: np.ndarray  # [N] float pixels (half the side of the shape's bounding box)

    @property
    def captions(self) -> List[str]:
        return [caption(s, c, b) for s, c, b in zip(self.shape, self.colour, self.background)]

    def distance(self) -> np.ndarray:
        """[N, H, W] signed distance (pixels) to the captioned shape, negative inside."""
        return signed_distance(self.shape, self.centre, self.radius, self.images.shape[1])


def caption(shape: int, colour: int, background: int) -> str:
    return f"a {COLOURS[colour]} {SHAPES[shape]} on a {COLOURS[background]} background"


def signed_distance(shape: np.ndarray, centre: np.ndarray, radius: np.ndarray, size: int) -> np.ndarray:
    """[N, size, size] signed distance to circles, axis-aligned squares or triangles (by `shape`).

    Exact inside every shape and for circles; outside squares and triangles it is the largest
    edge distance, which rounds nothing off the corners (fine for coverage and for dilated masks).
    """
    grid = np.arange(size, dtype=np.float32) + 0.5  # pixel centres
    dx = grid[None, None, :] - centre[:, 0, None, None]
    dy = grid[None, :, None] - centre[:, 1, None, None]
    r = radius[:, None, None]
    circle = np.hypot(dx, dy) - r
    square = np.maximum(np.abs(dx), np.abs(dy)) - r
    triangle = np.max(
        [n[0] * dx + n[1] * dy - h * r for n, h in zip(_TRI_NORMALS, _TRI_OFFSETS)], axis=0
    )
    return np.choose(shape[:, None, None], [circle, square, triangle]).astype(np.float32)


def coverage(distance: np.ndarray) -> np.ndarray:
    """Anti-aliased pixel coverage in [0, 1] from a signed distance (a one-pixel ramp)."""
    return np.clip(0.5 - distance, 0.0, 1.0)


def backgrounds(rng: np.random.Generator, colour: np.ndarray, size: int, textured: float) -> np.ndarray:
    """[N, size, size, 3] backgrounds of `colour`; a `textured` fraction are striped or checked in
    two shades of it (the caption still names the plain colour)."""
    n = len(colour)
    base = np.broadcast_to(RGB[colour][:, None, None, :], (n, size, size, 3))
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    period = rng.uniform(6.0, 14.0, n)[:, None, None]
    angle = rng.choice([0.0, 0.25, 0.5, 0.75], n)[:, None, None] * np.pi
    stripes = np.cos(angle) * x + np.sin(angle) * y
    checks = np.floor(x / period) + np.floor(y / period)
    kind = rng.choice(3, n, p=[1 - textured, textured / 2, textured / 2])[:, None, None]
    pattern = np.where(kind == 1, np.floor(stripes / period * 2) % 2, checks % 2)
    pattern = np.where(kind == 0, 0.5, pattern)
    return np.clip(base + 0.3 * (pattern[..., None] - 0.5), 0.0, 1.0)


def _other(rng: np.random.Generator, avoid: np.ndarray) -> np.ndarray:
    """A random colour index different from `avoid`, elementwise."""
    return (avoid + rng.integers(1, len(COLOURS), len(avoid))) % len(COLOURS)


def sample_scenes(
    rng: np.random.Generator,
    n: int,
    size: int = 64,
    shapes: Sequence[int] = tuple(range(len(SHAPES))),
    textured: float = 0.3,
    distractor: float = 0.3,
    min_radius: float = 0.125,
    max_radius: float = 0.3,
) -> Scenes:
    """`n` scenes: a background, an optional uncaptioned distractor shape, then the captioned shape
    (radius a fraction of `size` in [min_radius, max_radius], fully inside the image)."""
    background = rng.integers(0, len(COLOURS), n)
    images = backgrounds(rng, background, size, textured)

    def place(count_shapes):
        kind = rng.choice(np.asarray(count_shapes), n)
        radius = rng.uniform(min_radius, max_radius, n) * size
        centre = rng.uniform(radius[:, None] + 1, size - radius[:, None] - 1, (n, 2))
        return kind, centre.astype(np.float32), radius.astype(np.float32)

    kind, centre, radius = place(range(len(SHAPES)))
    alpha = coverage(signed_distance(kind, centre, radius, size)) * (rng.random(n) < distractor)[:, None, None]
    images = images + alpha[..., None] * (RGB[_other(rng, background)][:, None, None] - images)

    shape, centre, radius = place(shapes)
    colour = _other(rng, background)
    alpha = coverage(signed_distance(shape, centre, radius, size))
    images = images + alpha[..., None] * (RGB[colour][:, None, None] - images)
    return Scenes(images.astype(np.float32), shape, colour, background, centre, radius)


def box_masks(centre: np.ndarray, half: np.ndarray, size: int) -> np.ndarray:
    """[N, size, size] {0, 1} masks of axis-aligned boxes with the given centres and half-sides."""
    grid = np.arange(size, dtype=np.float32) + 0.5
    inside_x = np.abs(grid[None, :] - centre[:, 0, None]) <= half[:, None]
    inside_y = np.abs(grid[None, :] - centre[:, 1, None]) <= half[:, None]
    return (inside_y[:, :, None] & inside_x[:, None, :]).astype(np.float32)


def inpaint_masks(rng: np.random.Generator, scenes: Scenes) -> np.ndarray:
    """[N, H, W] {0, 1} masks (1 = repaint) teaching "draw the captioned shape in the hole":

    25% the shape's bounding box grown by 0-8 px, 45% its silhouette grown by 0-2 px, 20% a random
    box anywhere (generic inpainting from context), 10% the whole image (text-to-image). Silhouettes
    dominate, grown little: in a bounding box a triangle covers half the hole, and a small UNet that
    sees mostly loose holes learns to paint shapes smaller than a tight, shape-like hole.
    """
    n, size = len(scenes.shape), scenes.images.shape[1]
    kind = rng.choice(4, n, p=[0.25, 0.45, 0.2, 0.1])
    bbox = box_masks(scenes.centre, scenes.radius + rng.uniform(0, 8, n), size)
    silhouette = (scenes.distance() < rng.uniform(0, 2, n)[:, None, None]).astype(np.float32)
    half = rng.uniform(6, 20, n)
    anywhere = box_masks(rng.uniform(half[:, None], size - half[:, None], (n, 2)), half, size)
    full = np.ones_like(anywhere)
    return np.choose(kind[:, None, None], [bbox, silhouette, anywhere, full]).astype(np.float32)


def circle_outlines(scenes: Scenes, width: float = 1.5) -> np.ndarray:
    """[N, H, W, 3] ControlNet conditioning of the fill-the-circle task: the captioned shape's
    outline, white on black (fill50k style)."""
    ring = np.clip(width / 2 + 0.5 - np.abs(scenes.distance()), 0.0, 1.0)
    return np.repeat(ring[..., None], 3, axis=-1).astype(np.float32)


# ----------------------------------------------------------------------------- tokenizer


def _byte_symbols() -> List[str]:
    """GPT-2/CLIP's byte -> printable-character table (256 symbols)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def learn_merges(words: Sequence[str]) -> List[Tuple[str, str]]:
    """Byte-pair merges, learned on `words`, until every word is one symbol.

    Classic BPE training (most frequent pair first, ties by the pair itself): applying the merges
    in rank order, as CLIP's tokenizer does, then reproduces exactly the training segmentation.
    """
    pieces = {w: tuple(w[:-1]) + (w[-1] + "</w>",) for w in words}
    merges: List[Tuple[str, str]] = []
    while any(len(p) > 1 for p in pieces.values()):
        counts = Counter(pair for p in pieces.values() for pair in zip(p, p[1:]))
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        for w, p in pieces.items():
            out, i = [], 0
            while i < len(p):
                if p[i: i + 2] == best:
                    out.append(p[i] + p[i + 1])
                    i += 2
                else:
                    out.append(p[i])
                    i += 1
            pieces[w] = tuple(out)
    return merges


def build_tokenizer(folder: Path, max_length: int = 16, words: Sequence[str] = WORDS):
    """Write vocab.json and merges.txt for a CLIP BPE tokenizer over bytes plus `words`, and load it.

    Any text still tokenises (byte fallback); each of `words` is one token. Raises if the merges do
    not reproduce that (they always should: see `learn_merges`).
    """
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = _byte_symbols()
    merges = learn_merges(words)
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens + ["<|startoftext|>", "<|endoftext|>"]))}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)
    split = [w for w in words if len(tokenizer(w, add_special_tokens=False).input_ids) != 1]
    if split:
        raise RuntimeError(f"build_tokenizer: the merges split the words {split}; report this bug.")
    return tokenizer


def tokenize(tokenizer, captions: Sequence[str]) -> np.ndarray:
    """[N, max_length] int32 ids, padded and truncated like the pipelines do."""
    return tokenizer(
        list(captions), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
        return_tensors="np",
    ).input_ids.astype(np.int32)


def demo_sample(size: int = 64) -> Tuple[np.ndarray, np.ndarray]:
    """The bundled demo inputs: a yellow square on a striped blue background (HWC in [0, 1]) and a
    {0, 1} mask over the square grown by 3 px, which the demo prompt repaints as another shape (the
    training task: captions describe the shape under the hole)."""
    blue, yellow = COLOURS.index("blue"), COLOURS.index("yellow")
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    stripes = np.floor((x + y) / (2**0.5 * 6)) % 2  # 6 px wide diagonal stripes, as in training
    image = np.clip(RGB[blue] + 0.3 * (stripes[..., None] - 0.5), 0.0, 1.0)
    s = size / 64
    square = coverage(signed_distance(np.array([1]), np.array([[20.0 * s, 20.0 * s]]), np.array([10.0 * s]), size))[0]
    image = image + square[..., None] * (RGB[yellow] - image)
    mask = box_masks(np.array([[20.0 * s, 20.0 * s]]), np.array([13.0 * s]), size)[0]
    return image.astype(np.float32), mask
