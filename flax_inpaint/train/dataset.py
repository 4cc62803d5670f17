"""Training rows (image, conditioning image, caption) from user data, as fixed-shape numpy batches.

Sources, as diffusers' training scripts read them:

* an image folder with `metadata.jsonl` (one JSON object per image; `file_name` is the `image`
  column and `<name>_file_name` an image column `<name>`, as in `datasets`' imagefolder; columns
  holding relative paths such as fill50k's `"conditioning_image": "conditioning_images/0.png"` work
  too), or a JSONL file of such rows, paths relative to its folder. Neither needs `datasets`;
* a `datasets` dataset saved with `save_to_disk`, or any name `datasets.load_dataset` understands
  (`pip install 'flax-inpaint[train]'`).

The order of the examples is a pure function of the seed: example `p` of the training stream is
row `permutation(seed, epoch)[p % rows_per_epoch]`, and its empty-prompt draw, caption choice and
inpainting mask come from `default_rng([seed, p])`. Any process can therefore build any part of
any step's batch, which is how each host reads only its own shard and how a resumed run continues
with exactly the batches the interrupted one would have seen.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import io
import json
import queue
import threading
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np
from PIL import Image

Batch = Dict[str, np.ndarray]


class DataError(ValueError):
    """A training data source that cannot be read, with what to change."""


# ----------------------------------------------------------------------------- sources


class JsonRows:
    """Rows of a metadata.jsonl / JSONL file; image paths are relative to `base`."""

    def __init__(self, records: List[Dict[str, Any]], base: Path, source: str):
        self.records, self.base, self.source = records, base, source
        self.column_names = list(dict.fromkeys(k for r in records for k in r))

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        return self.records[index]


class HFRows:
    """Rows of a `datasets.Dataset` (images decoded by its Image feature, or paths / bytes)."""

    def __init__(self, dataset, source: str):
        self.dataset, self.base, self.source = dataset, Path.cwd(), source
        self.column_names = list(dataset.column_names)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        return self.dataset[int(index)]


class Subset:
    """The rows `indices` of `rows` (--max_train_samples)."""

    def __init__(self, rows, indices: np.ndarray):
        self.rows, self.indices = rows, indices
        self.base, self.source, self.column_names = rows.base, rows.source, rows.column_names

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        return self.rows[int(self.indices[index])]


def _imagefolder_name(key: str) -> str:
    """`datasets` imagefolder naming: `file_name` is the `image` column, `x_file_name` the `x` column."""
    if key == "file_name":
        return "image"
    return key[: -len("_file_name")] if key.endswith("_file_name") else key


def read_jsonl(path: Path) -> JsonRows:
    """Rows of a JSONL file (or a folder's metadata.jsonl), imagefolder column names applied."""
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n} is not a JSON object ({e.msg}); write one JSON object per line.") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{n} holds a {type(row).__name__}; write one JSON object per line.")
        records.append({_imagefolder_name(k): v for k, v in row.items()})
    if not records:
        raise DataError(f"{path} has no rows; write one JSON object per training example.")
    return JsonRows(records, path.parent, str(path))


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def _datasets(option: str):
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{option} needs the `datasets` package: pip install 'flax-inpaint[train]' (or pass --train_data_dir "
            "with an image folder holding metadata.jsonl, or a JSONL file, which need nothing extra)."
        ) from None
    return datasets


def _train_split(data, source: str):
    """The `train` split of a DatasetDict (or its only split), or a Dataset as it is."""
    if not hasattr(data, "keys"):
        return data
    if "train" in data:
        return data["train"]
    if len(data) == 1:
        return next(iter(data.values()))
    raise DataError(f"{source} has the splits {sorted(data)} but no 'train'; save the training split as 'train'.")


def open_rows(dataset_name: Optional[str] = None, train_data_dir: Optional[str] = None,
              dataset_config_name: Optional[str] = None, cache_dir: Optional[str] = None):
    """The training rows of `--dataset_name` or `--train_data_dir` (exactly one is given)."""
    if (dataset_name is None) == (train_data_dir is None):
        raise DataError("pass exactly one of --dataset_name (a `datasets` dataset) and --train_data_dir "
                        "(an image folder with metadata.jsonl, a JSONL file or a saved dataset).")
    option = "--dataset_name" if dataset_name is not None else "--train_data_dir"
    source = dataset_name if dataset_name is not None else train_data_dir
    path = Path(source)
    if path.is_file() and path.suffix == ".jsonl":
        return read_jsonl(path)
    if path.is_dir() and (path / "metadata.jsonl").is_file():
        return read_jsonl(path / "metadata.jsonl")
    if path.is_dir() and _is_saved_dataset(path):
        data = _datasets(option).load_from_disk(str(path))
        return HFRows(_train_split(data, source), source)
    if train_data_dir is not None and not path.exists():
        raise DataError(f"--train_data_dir {source!r} does not exist; pass an image folder with metadata.jsonl, a "
                        "JSONL file or a folder written by datasets' save_to_disk.")
    datasets = _datasets(option)
    try:
        data = datasets.load_dataset(source, dataset_config_name, cache_dir=cache_dir)
    except Exception as e:  # datasets raises many types for a name it cannot resolve
        raise DataError(f"{option} {source!r}: datasets.load_dataset failed ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}).") from e
    return HFRows(_train_split(data, source), source)


# ----------------------------------------------------------------------------- examples


@dataclasses.dataclass(frozen=True)
class Columns:
    image: str = "image"
    conditioning_image: str = "conditioning_image"
    caption: str = "text"

    def check(self, rows) -> None:
        for option, name in (("--image_column", self.image), ("--conditioning_image_column", self.conditioning_image),
                             ("--caption_column", self.caption)):
            if name not in rows.column_names:
                raise DataError(f"{option} {name!r} is not a column of {rows.source}; its columns are "
                                f"{', '.join(rows.column_names)}.")


def open_image(value: Any, base: Path, where: str) -> Image.Image:
    """An RGB PIL image from a decoded image, a `datasets` {bytes, path} dict, an array or a path."""
    try:
        if isinstance(value, Image.Image):
            return value.convert("RGB")
        if isinstance(value, dict) and value.get("bytes"):
            return Image.open(io.BytesIO(value["bytes"])).convert("RGB")
        if isinstance(value, dict) and value.get("path"):
            value = value["path"]
        if isinstance(value, np.ndarray):
            return Image.fromarray(value).convert("RGB")
        if isinstance(value, str):
            with Image.open(base / value) as image:  # an absolute value replaces base
                return image.convert("RGB")
    except (OSError, ValueError, TypeError) as e:
        raise DataError(f"{where}: cannot read the image {str(value)[:200]!r} ({e}).") from None
    raise DataError(f"{where} holds a {type(value).__name__}; expected an image or the path of one.")


def resize_and_crop(image: Image.Image, resolution: int) -> np.ndarray:
    """[resolution, resolution, 3] uint8: the shorter side resized to `resolution` (bilinear), then
    the centre crop, as diffusers' Resize + CenterCrop transforms do."""
    w, h = image.size
    if min(w, h) != resolution:
        long = int(resolution * max(w, h) / min(w, h))
        image = image.resize((resolution, long) if w <= h else (long, resolution), Image.BILINEAR)
    w, h = image.size
    left, top = int(round((w - resolution) / 2.0)), int(round((h - resolution) / 2.0))
    return np.asarray(image.crop((left, top, left + resolution, top + resolution)), np.uint8)


def box_or_whole_mask(rng: np.random.Generator, resolution: int, whole: float) -> np.ndarray:
    """[resolution, resolution] uint8 {0, 1} inpainting mask (1 = repaint): the whole image with
    probability `whole`, else a box whose sides are 1/4 to 3/4 of the image, anywhere inside it."""
    if rng.random() < whole:
        return np.ones((resolution, resolution), np.uint8)
    h, w = (rng.uniform(0.25, 0.75, 2) * resolution).astype(int)
    top, left = rng.integers(0, resolution - h + 1), rng.integers(0, resolution - w + 1)
    mask = np.zeros((resolution, resolution), np.uint8)
    mask[top: top + h, left: left + w] = 1
    return mask


@dataclasses.dataclass(frozen=True)
class Stream:
    """The training stream over `num_rows` rows in `global_batch`-sized micro-batches: example
    position p -> row index, epochs in a fresh seeded order, the last partial batch of each dropped."""

    num_rows: int
    global_batch: int
    seed: int

    @property
    def batches_per_epoch(self) -> int:
        return self.num_rows // self.global_batch

    @functools.lru_cache(maxsize=4)
    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)

    def rows(self, positions: np.ndarray) -> np.ndarray:
        per_epoch = self.batches_per_epoch * self.global_batch
        epochs, within = np.divmod(positions, per_epoch)
        return np.array([self._order(int(e))[i] for e, i in zip(epochs, within)], np.int64)


@dataclasses.dataclass(frozen=True)
class Examples:
    """How a row becomes a training example."""

    rows: Any
    columns: Columns
    resolution: int
    seed: int
    proportion_empty_prompts: float = 0.0
    whole_image_mask_proportion: Optional[float] = None  # None: no inpainting masks

    def example(self, position: int, index: int) -> Dict[str, Any]:
        row = self.rows[index]
        where = f"{self.rows.source} row {index}"
        rng = np.random.default_rng([self.seed, position])
        caption = row[self.columns.caption]
        empty = rng.random() < self.proportion_empty_prompts
        if isinstance(caption, (list, tuple, np.ndarray)) and len(caption) and all(isinstance(c, str) for c in caption):
            caption = caption[rng.integers(len(caption))]  # one of several captions, at random
        elif not isinstance(caption, str):
            raise DataError(f"{where}: column {self.columns.caption!r} holds {caption!r}; expected a caption string "
                            "or a list of them (--caption_column).")
        out = {
            "image": resize_and_crop(open_image(row[self.columns.image], self.rows.base,
                                                f"{where} column {self.columns.image!r}"), self.resolution),
            "conditioning_image": resize_and_crop(
                open_image(row[self.columns.conditioning_image], self.rows.base,
                           f"{where} column {self.columns.conditioning_image!r}"), self.resolution),
            "caption": "" if empty else caption,
        }
        if self.whole_image_mask_proportion is not None:
            out["mask"] = box_or_whole_mask(rng, self.resolution, self.whole_image_mask_proportion)
        return out


def make_batches(examples: Examples, stream: Stream, tokenize: Callable[[List[str]], np.ndarray],
                 rows_of_this_process: slice, workers: int = 0) -> Callable[[int], Batch]:
    """`batch(step)`: this process's rows of micro-batch `step` as numpy arrays — uint8 NHWC `image`
    and `conditioning_image`, int32 `input_ids`, int32 `position` (of each example in the stream,
    which seeds its noise), and uint8 `mask` for inpainting UNets. `workers` threads decode images."""
    pool = concurrent.futures.ThreadPoolExecutor(workers) if workers > 0 else None

    def batch(step: int) -> Batch:
        positions = np.arange(step * stream.global_batch, (step + 1) * stream.global_batch)[rows_of_this_process]
        indices = stream.rows(positions)
        items = list((pool.map if pool else map)(examples.example, positions, indices))
        out = {k: np.stack([it[k] for it in items]) for k in items[0] if k != "caption"}
        out["input_ids"] = tokenize([it["caption"] for it in items])
        out["position"] = positions.astype(np.int32)
        return out

    return batch


class Prefetcher:
    """Iterates `put(batch(step))` for step = start .. stop - 1, built `depth` steps ahead on a
    background thread: image decoding and the host-to-device copy overlap the training step, so the
    accelerator does not wait on PIL. An error in the thread is raised by `next`."""

    _DONE = object()

    def __init__(self, batch: Callable[[int], Batch], put: Callable[[Batch], Any], start: int, stop: int,
                 depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()

        def run():
            try:
                for step in range(start, stop):
                    item = put(batch(step))
                    while not self._stop.is_set():
                        try:
                            self._queue.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if self._stop.is_set():
                        return
                self._queue.put(self._DONE)
            except BaseException as e:  # handed to the consumer
                self._queue.put(e)

        self._thread = threading.Thread(target=run, name="flax-inpaint-prefetch", daemon=True)
        self._thread.start()

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self):
        item = self._queue.get()
        if item is self._DONE:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# ----------------------------------------------------------------------------- example data


def make_example_dataset(folder: Path, num_examples: int = 2048, resolution: int = 64, seed: int = 0) -> Path:
    """Write a fill50k-like folder: `images/<i>.png` (a filled circle on a plain or textured
    background), `conditioning_images/<i>.png` (its outline, white on black) and `metadata.jsonl`
    rows {"text": "a red circle on a blue background", "image": ..., "conditioning_image": ...}.

    Captions use the words of the bundled tiny shapes model's tokenizer, so the folder trains a
    ControlNet for `flax_inpaint/assets/tiny-shapes-inpaint`. Every file is written atomically and
    metadata.jsonl last, so an interrupted run leaves no folder that looks complete.
    """
    from flax_inpaint.io import write_bytes_atomic
    from flax_inpaint.train import data

    def png(array: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(np.round(array * 255).astype(np.uint8)).save(buf, format="PNG")
        return buf.getvalue()

    folder = Path(folder)
    rng = np.random.default_rng(seed)
    circle = data.SHAPES.index("circle")
    lines: List[str] = []
    for start in range(0, num_examples, 256):
        scenes = data.sample_scenes(rng, min(256, num_examples - start), resolution, shapes=(circle,), distractor=0.0)
        outlines = data.circle_outlines(scenes)
        for j, (image, outline, text) in enumerate(zip(scenes.images, outlines, scenes.captions)):
            name = f"{start + j}.png"
            write_bytes_atomic(folder / "images" / name, png(image))
            write_bytes_atomic(folder / "conditioning_images" / name, png(outline))
            lines.append(json.dumps({"text": text, "image": f"images/{name}",
                                     "conditioning_image": f"conditioning_images/{name}"}))
    write_bytes_atomic(folder / "metadata.jsonl", ("\n".join(lines) + "\n").encode())
    return folder


def shard_of_process(global_batch: int, process_index: int, process_count: int) -> slice:
    """The rows of each global micro-batch that process `process_index` reads (contiguous, in the
    order of the mesh's devices, which lists each process's devices together)."""
    local = global_batch // process_count
    return slice(process_index * local, (process_index + 1) * local)


def check_sizes(num_rows: int, global_batch: int, source: str, names: Sequence[str] = ()) -> None:
    if num_rows < global_batch:
        raise DataError(f"{source} has {num_rows} rows, fewer than one step's batch of {global_batch} "
                        f"({' x '.join(names) or 'train_batch_size x devices'}); lower --train_batch_size or add data.")
