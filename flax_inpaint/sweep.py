"""Resumable research sweeps: many inpainting configurations, each result a PNG plus one manifest line.

A spec (a dict, or a .json / .yaml file) names the model and the configurations. Its keys mirror the
`flax-inpaint inpaint` options:

    {"model": "path/or/hub-id", "out": "results", "dtype": "float32", "per_device_batch": 1,
     "image": "photo.png", "mask": "mask.png", "steps": 25,          # defaults for every configuration
     "grid": {"prompt": ["a cat", "a dog"], "seed": [0, 1], "guidance": [3, 7.5]},
     "list": [{"image": "a.png", "mask": "a-mask.png"}, {"image": "b.png", "mask": "b-mask.png"}]}

The configurations are every `list` entry (or one empty entry) crossed with every combination of the
`grid` axes, over the top-level defaults. Relative paths are relative to the spec file.

Instead of "model", "single_file" (with an optional "config" folder) loads an original-layout checkpoint;
"lora": ["style.safetensors:0.8", ...] and "textual_inversion": ["negemb.pt:negemb", ...] load adapters
and embeddings (as the CLI's --lora / --textual-inversion), and the option "lora_weight" (a number for
every LoRA, or one per LoRA) may vary in the grid: the weights are traced, so it never recompiles.

"pipeline": "diffedit" runs DiffEdit on a text-to-image model instead: configurations give "source_prompt"
(what the image shows) and "prompt" (what it should show) but no "mask"; see `_compute_diffedit`.

How it runs (`run_sweep`):
  * Configurations are grouped by what the compiled program depends on (height, width, steps,
    scheduler, guidance > 1), so each group compiles once; prompts, seeds, guidance, strength and
    images are traced inputs. Batches fill all devices of a 1-D data mesh (`per_device_batch` each);
    the last batch of a group is padded by repeating its last configuration.
  * Every configuration samples with its own key `jax.random.key(seed)` (one key per prompt), so a
    result does not depend on which configurations share its batch, on the device count or on resuming.
  * Each result is written atomically as `images/<id>.png` and then recorded by one line of
    `manifest.jsonl` (flushed and fsynced); `<id>` hashes the configuration, model and dtype. A result
    counts once both exist: on restart, lines without their PNG (or torn by a kill) are dropped and
    our PNGs without a line are deleted, then only the missing results are computed.
  * One run at a time per folder: a run holds an advisory lock on `.sweep.lock` (flock, which the
    kernel releases when the holder exits or is killed); a second run is refused with the holder's
    pid and host, which the lock file records.
  * With several processes (`jax.distributed`) each process prepares its own rows of every global
    batch; process 0 alone reads and writes the output folder and tells the others what is done.
  * At the end `contact_sheet.png` tiles every result of the spec, captioned with what varies.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import io
import itertools
import json
import math
import os
import re
import socket
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from PIL import Image, ImageDraw

from flax_inpaint.io import write_bytes_atomic
from flax_inpaint.pipelines.inputs import seed_keys, strength_fields, strength_steps
from flax_inpaint.pipelines.loading import model_error, with_scheduler
from flax_inpaint.runtime import data_mesh

MANIFEST = "manifest.jsonl"
IMAGES = "images"
CONTACT_SHEET = "contact_sheet.png"
LOCK = ".sweep.lock"
# What `recover` may delete from images/: <id>.png, and write_bytes_atomic's temporary .<id>.png.*.tmp
_OWN_FILE = re.compile(r"[0-9a-f]{16}\.png|\.[0-9a-f]{16}\.png\..+\.tmp")
DTYPES = ("float32", "bfloat16")
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_SETTINGS = ("model", "single_file", "config", "lora", "textual_inversion", "out", "dtype", "per_device_batch", "grid",
             "list", "pipeline")
PIPELINES = ("inpaint", "diffedit")


class SweepSpecError(ValueError):
    """A sweep spec that cannot run; the message names the key, the value and the fix."""


class SweepLockError(RuntimeError):
    """The output folder is in use by another sweep (or cannot be locked); the message names the holder."""


@dataclasses.dataclass(frozen=True)
class Config:
    """One result: the `inpaint` options for one image (paths as written in the spec)."""

    prompt: str
    image: str
    mask: Optional[str] = None  # None for DiffEdit, which finds the mask itself
    negative_prompt: Optional[str] = None
    seed: int = 0
    guidance: float = 7.5
    strength: float = 1.0
    steps: int = 50
    scheduler: Optional[str] = None  # a diffusers scheduler class name; None keeps the model's
    size: Optional[int] = None  # square output size; None keeps the image's size (floored to 8)
    lora_weight: Optional[Union[float, Tuple[float, ...]]] = None  # the spec's LoRAs' weights (traced: no recompile)
    source_prompt: Optional[str] = None  # DiffEdit: what the image shows (`prompt`: what it should show)

    def result_id(self, model: str, dtype: str) -> str:
        """Deterministic id: a hash of this configuration, the model and the dtype."""
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in _ID_IF_SET or v is not None}
        payload = json.dumps({"model": model, "dtype": dtype, **fields}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


AXES = tuple(f.name for f in dataclasses.fields(Config))
_REQUIRED = {"inpaint": ("prompt", "image", "mask"), "diffedit": ("prompt", "image", "source_prompt")}
_ID_IF_SET = ("mask", "lora_weight", "source_prompt")  # in a result's id only when set (older ids stay)
_ONLY_IN = {"mask": "inpaint", "scheduler": "inpaint", "source_prompt": "diffedit"}  # options of one pipeline


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# axis -> (test, what is allowed)
_CHECKS = {
    "prompt": (lambda v: isinstance(v, str), "a string"),
    "image": (lambda v: isinstance(v, str), "an image file path"),
    "mask": (lambda v: isinstance(v, str), "an image file path (white = repaint)"),
    "negative_prompt": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "seed": (lambda v: _is_int(v) and 0 <= v < 2**32, "an int in [0, 2**32)"),
    "guidance": (_is_number, "a number (> 1 enables classifier-free guidance)"),
    "strength": (lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "steps": (lambda v: _is_int(v) and v >= 1, "an int >= 1"),
    "scheduler": (lambda v: v is None or isinstance(v, str),
                  "a scheduler class name such as 'DDIMScheduler', or null for the model's"),
    "size": (lambda v: v is None or (_is_int(v) and v > 0), "a positive int (a multiple of the model's VAE scale "
                                                             "factor), or null"),
    "lora_weight": (lambda v: v is None or _is_number(v) or (isinstance(v, list) and all(map(_is_number, v))),
                    "a number (every LoRA of the spec) or a list of numbers (one per LoRA)"),
    "source_prompt": (lambda v: isinstance(v, str), "a string (DiffEdit: what the image shows)"),
}


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    """A parsed, validated sweep: settings plus the expanded configurations (deduplicated)."""

    model: str
    out: Path
    configs: Tuple[Config, ...]
    dtype: str = "float32"
    per_device_batch: int = 1
    base_dir: Path = Path(".")
    single_file: Optional[str] = None  # instead of `model`: an original-layout checkpoint (with `config`)
    config: Optional[str] = None
    loras: Tuple[Tuple[str, float], ...] = ()  # (path, default weight)
    embeddings: Tuple[Tuple[str, Optional[str]], ...] = ()  # (path, token)
    pipeline: str = "inpaint"  # or "diffedit": `prompt` is the target, `source_prompt` what the image shows

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any], base_dir: Union[str, os.PathLike] = ".",
                  source: str = "sweep spec", out: Optional[str] = None) -> "SweepSpec":
        """Validate and expand `spec`; `out` (e.g. the CLI's --out) replaces spec["out"]."""
        def fail(msg):
            raise SweepSpecError(f"{source}: {msg}")

        if not isinstance(spec, Mapping):
            fail(f"expected a mapping of keys to values at the top level, got {type(spec).__name__}.")
        unknown = sorted(set(spec) - set(_SETTINGS) - set(AXES))
        if unknown:
            fail(f"unknown key(s) {unknown}; allowed: settings {list(_SETTINGS)} and options {list(AXES)}.")
        base = Path(base_dir)
        loaders = _loaders(spec, base, fail)
        model = spec.get("model", loaders["single_file"])
        if not isinstance(model, str) or not model or ("model" in spec) == (loaders["single_file"] is not None):
            fail(f"give 'model' (a diffusers model folder or hub id) or 'single_file' (a .safetensors/.ckpt), one of "
                 f"them; got model={spec.get('model')!r}, single_file={spec.get('single_file')!r}.")
        if (base / model).exists():
            model = str(base / model)
        dtype = spec.get("dtype", "float32")
        if dtype not in DTYPES:
            fail(f"'dtype' = {dtype!r}; use one of {list(DTYPES)}.")
        per_device = spec.get("per_device_batch", 1)
        if not _is_int(per_device) or per_device < 1:
            fail(f"'per_device_batch' = {per_device!r} must be an int >= 1.")
        pipeline = spec.get("pipeline", "inpaint")
        if pipeline not in PIPELINES:
            fail(f"'pipeline' = {pipeline!r}; use one of {list(PIPELINES)}.")
        if pipeline == "diffedit" and (loaders["single_file"] or loaders["loras"] or loaders["embeddings"]):
            fail("'pipeline': 'diffedit' takes a diffusers 'model' folder; drop 'single_file', 'lora' and "
                 "'textual_inversion'.")
        out_dir = out if out is not None else spec.get("out")
        if not isinstance(out_dir, str) or not out_dir:
            fail(f"'out' must be the output folder (a path), got {out_dir!r}; set it or pass --out.")

        sizes: Dict[str, Tuple[int, int]] = {}  # image/mask path -> (width, height), each file read once

        def check(key, value, where):
            test, allowed = _CHECKS[key]
            if not test(value):
                fail(f"{where} = {value!r}: {key} must be {allowed}.")
            if key in ("image", "mask") and value not in sizes:
                if not (base / value).is_file():
                    fail(f"{where} = {value!r}: no such file under {base.resolve()}; paths are relative to the spec.")
                try:
                    with Image.open(base / value) as im:
                        im.load()
                        sizes[value] = im.size
                except (OSError, ValueError) as e:  # not an image, truncated, unreadable
                    fail(f"{where} = {value!r}: not a readable image ({e}); pass a PNG/JPEG file.")
            if key == "scheduler" and value is not None:
                from flax_inpaint.pipelines.loading import scheduler_class

                try:
                    scheduler_class(value)
                except ValueError as e:
                    fail(f"{where}: {e}")

        defaults = {k: v for k, v in spec.items() if k in AXES}
        for k, v in defaults.items():
            if isinstance(v, list):
                fail(f"{k!r} is a list at the top level; put options to vary under 'grid' ({{\"grid\": "
                     f"{{\"{k}\": [...]}}}}) or 'list'.")
            check(k, v, k)
        grid = spec.get("grid", {})
        if not isinstance(grid, Mapping):
            fail(f"'grid' must map options to lists of values, got {type(grid).__name__}.")
        for k, values in grid.items():
            if k not in AXES:
                fail(f"grid.{k} is not an option; options: {list(AXES)}.")
            if not isinstance(values, list) or not values:
                fail(f"grid.{k} must be a non-empty list of values, got {values!r}.")
            for i, v in enumerate(values):
                check(k, v, f"grid.{k}[{i}]")
        entries = spec.get("list", [{}])
        if not isinstance(entries, list) or not entries:
            fail(f"'list' must be a non-empty list of option mappings, got {entries!r}.")
        for i, entry in enumerate(entries):
            if not isinstance(entry, Mapping):
                fail(f"list[{i}] must map options to values, got {entry!r}.")
            for k, v in entry.items():
                if k not in AXES:
                    fail(f"list[{i}].{k} is not an option; options: {list(AXES)}.")
                if k in grid:
                    fail(f"list[{i}].{k} is also a grid axis; give each option in one place only.")
                check(k, v, f"list[{i}].{k}")

        configs, seen = [], set()
        for i, entry in enumerate(entries):
            for combo in itertools.product(*grid.values()):
                values = {**defaults, **entry, **dict(zip(grid, combo))}
                missing = [k for k in _REQUIRED[pipeline] if k not in values]
                if missing:
                    fail(f"list[{i}] has no {missing}; give them at the top level, in the grid or in the entry.")
                unused = [k for k, p in _ONLY_IN.items() if p != pipeline and values.get(k) is not None]
                if unused:
                    fail(f"list[{i}] sets {unused}, which the {pipeline!r} pipeline does not take; drop them"
                         + (" (DiffEdit finds the mask and runs DDIM)." if pipeline == "diffedit" else
                            " or set \"pipeline\": \"diffedit\"."))
                if isinstance(values.get("lora_weight"), list):
                    values["lora_weight"] = tuple(values["lora_weight"])
                weight = values.get("lora_weight")
                count = len(weight) if isinstance(weight, tuple) else 1
                if weight is not None and (not loaders["loras"] or count not in (1, len(loaders["loras"]))):
                    fail(f"lora_weight={weight!r} needs the spec's 'lora' list, one weight for all or one per LoRA "
                         f"({len(loaders['loras'])}).")
                config = Config(**values)
                if config.mask is not None and sizes[config.image] != sizes[config.mask]:
                    (iw, ih), (mw, mh) = sizes[config.image], sizes[config.mask]
                    fail(f"image {config.image!r} is {iw}x{ih} but its mask {config.mask!r} is {mw}x{mh}; pair "
                         "each image with a mask of its size (list entries pair them; a grid crosses them).")
                if config not in seen:
                    seen.add(config)
                    configs.append(config)
        return cls(model=model, out=base / out_dir, configs=tuple(configs), dtype=dtype,
                   per_device_batch=per_device, base_dir=base, pipeline=pipeline, **loaders)

    @classmethod
    def from_file(cls, path: Union[str, os.PathLike], out: Optional[str] = None) -> "SweepSpec":
        """Read a .json spec (or .yaml / .yml with PyYAML installed)."""
        path = Path(path)
        if not path.is_file():
            what = "is a folder" if path.is_dir() else "does not exist"
            raise SweepSpecError(f"sweep spec {str(path)!r} {what}; pass the path of a .json or .yaml file.")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise SweepSpecError(f"sweep spec {str(path)!r} is not readable UTF-8 text ({e}).") from None
        if path.suffix.lower() in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise SweepSpecError(f"reading {path} needs PyYAML: `pip install pyyaml`, or write the spec as "
                                     ".json.") from None
            try:
                spec = yaml.safe_load(text)
            except yaml.YAMLError as e:
                raise SweepSpecError(f"{path} is not valid YAML: {e}") from None
        elif path.suffix.lower() == ".json":
            try:
                spec = json.loads(text)
            except json.JSONDecodeError as e:
                raise SweepSpecError(f"{path} is not valid JSON: {e}") from None
        else:
            raise SweepSpecError(f"sweep spec {path.name!r}: use a .json file (or .yaml / .yml with PyYAML).")
        return cls.from_dict(spec, base_dir=path.parent, source=str(path), out=out)

    def ids(self) -> List[str]:
        from flax_inpaint.loaders import options

        extra = options.describe(self.loras, self.embeddings)  # ids of specs without loaders stay as they were
        return [c.result_id(f"{self.model}|{extra}" if extra else self.model, self.dtype) for c in self.configs]

    def lora_weights(self, config: Config) -> Optional[List[float]]:
        """The LoRA weights of one configuration (None: the spec's)."""
        w = config.lora_weight
        if w is None:
            return None
        w = w if isinstance(w, tuple) else (w,)
        return list(w) * len(self.loras) if len(w) == 1 else list(w)


def _loaders(spec: Mapping[str, Any], base: Path, fail) -> Dict[str, Any]:
    """single_file / config / lora / textual_inversion of a spec, paths resolved against `base`."""
    from flax_inpaint.loaders import options

    def path(key, value):
        if not isinstance(value, str) or not (base / value).exists():
            fail(f"{key} = {value!r}: no such file or folder under {base.resolve()}; paths are relative to the spec.")
        return str(base / value)

    out = {"single_file": None, "config": None, "loras": (), "embeddings": ()}
    for key in ("single_file", "config"):
        if spec.get(key) is not None:
            out[key] = path(key, spec[key])
    for key, parse, field in (("lora", options.parse_lora, "loras"),
                              ("textual_inversion", options.parse_embedding, "embeddings")):
        entries = spec.get(key, [])
        if not isinstance(entries, list):
            fail(f"'{key}' must be a list of \"PATH[:{'WEIGHT' if key == 'lora' else 'TOKEN'}]\" strings.")
        parsed = []
        for i, entry in enumerate(entries):
            if not isinstance(entry, str):
                fail(f"{key}[{i}] = {entry!r} is not a string.")
            try:
                p, extra = parse(entry)
            except ValueError as e:
                fail(f"{key}[{i}]: {e}")
            parsed.append((path(f"{key}[{i}]", p), extra))
        out[field] = tuple(parsed)
    return out


class ResultStore:
    """The output folder: `images/<id>.png` plus `manifest.jsonl`, one JSON line per result."""

    def __init__(self, out: Union[str, os.PathLike]):
        self.out = Path(out)
        self.manifest = self.out / MANIFEST
        self.images = self.out / IMAGES

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the folder for one run, or raise SweepLockError naming the process that holds it.

        An advisory flock on `.sweep.lock`: taken atomically, released by the kernel when the holder
        exits or is killed (so a dead holder never blocks the next run). The file itself records the
        holder's pid, host and start time for the refusal message; it is never deleted, since a
        recreated file would be a second lock.
        """
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / LOCK
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise SweepLockError(
                    f"{self.out} is in use by another sweep ({_holder(os.pread(fd, 4096, 0))}; lock file {path}); "
                    "wait for it to finish or stop it, or write to another folder.") from None
            except OSError as e:  # e.g. ENOLCK: a network filesystem without lock support
                raise SweepLockError(f"cannot lock {path} ({e.strerror}); its filesystem does not support file "
                                     "locks: write to a folder on another filesystem.") from None
            holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(holder).encode() + b"\n", 0)
            try:
                yield
            finally:
                os.ftruncate(fd, 0)  # a free lock names nobody
        finally:
            os.close(fd)  # releases the flock

    def recover(self) -> Dict[str, dict]:
        """Make the folder consistent after a kill and return {id: manifest record} of finished results.

        Kept: parseable lines whose PNG exists (first line per id). Dropped: torn or orphaned lines,
        our PNGs without a line and temporary files of interrupted writes; files of other names are
        left alone. The manifest is rewritten only when something was dropped.
        """
        self.images.mkdir(parents=True, exist_ok=True)
        raw = self.manifest.read_bytes() if self.manifest.exists() else b""
        records: Dict[str, dict] = {}
        lines = raw.split(b"\n")
        for line in lines[:-1]:  # the text after the last newline is a torn write (or empty)
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and "id" in record and (self.out / str(record.get("file"))).is_file():
                records.setdefault(record["id"], record)
        kept = b"".join(json.dumps(r, sort_keys=True).encode() + b"\n" for r in records.values())
        if kept != raw:
            write_bytes_atomic(self.manifest, kept)
        wanted = {Path(r["file"]).name for r in records.values()}
        for path in self.images.iterdir():
            if path.name not in wanted and _OWN_FILE.fullmatch(path.name):
                path.unlink()
        for name in (MANIFEST, CONTACT_SHEET):  # interrupted atomic writes of the folder's own files
            for path in self.out.glob(f".{name}.*.tmp"):
                path.unlink()
        return records

    def write(self, record: dict, png: bytes) -> None:
        """The PNG atomically first, then its manifest line (flushed and fsynced)."""
        write_bytes_atomic(self.out / record["file"], png)
        with open(self.manifest, "ab") as f:
            f.write(json.dumps(record, sort_keys=True).encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())


def _holder(text: bytes) -> str:
    """Who holds a lock, from the lock file's JSON line."""
    try:
        holder = json.loads(text)
        return f"pid {holder['pid']} on host {holder['host']}, since {holder['since']}"
    except (ValueError, TypeError, KeyError):
        return "a process that has not recorded its pid yet"


@dataclasses.dataclass
class SweepSummary:
    """What `run_sweep` did. `compiles` counts compilations of the sampling program per group."""

    out: Path
    total: int
    already_done: int
    computed: int
    compiles: Dict[str, int]
    contact_sheet: Optional[Path]


@dataclasses.dataclass(frozen=True)
class _Group:
    """What the compiled program depends on; one compilation per group."""

    height: int
    width: int
    steps: int
    scheduler: Optional[str]
    cfg: bool

    @property
    def label(self) -> str:
        return (f"{self.height}x{self.width}-{self.steps}steps-{self.scheduler or 'model-scheduler'}"
                f"-{'cfg' if self.cfg else 'nocfg'}")


def _local_rows(mesh: Mesh, n: int) -> slice:
    """The rows of a global batch of `n` that this process's devices hold."""
    sharding = NamedSharding(mesh, P(mesh.axis_names[0]))
    spans = [idx[0].indices(n)[:2] for idx in sharding.addressable_devices_indices_map((n,)).values()]
    lo, hi = min(s for s, _ in spans), max(e for _, e in spans)
    if hi - lo != n // jax.process_count():
        raise ValueError(f"This process's devices do not hold one contiguous block of the mesh's "
                         f"{mesh.axis_names[0]!r} axis; build the mesh with runtime.data_mesh().")
    return slice(lo, hi)


class _CompileCounter:
    """Counts compilations of the sampling program (jax.monitoring) while active."""

    def __init__(self):
        self.count, self.seconds = 0, 0.0

    def __call__(self, event, duration, fun_name: str = "", **_):
        if event == COMPILE_EVENT and "generate" in fun_name:
            self.count += 1
            self.seconds += duration

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self)


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.round(image * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _open(path: Path, mode: str) -> Image.Image:
    with Image.open(path) as im:
        return im.convert(mode)


def run_sweep(spec: SweepSpec, pipeline: Optional[Tuple[Any, Any]] = None, mesh: Optional[Mesh] = None,
              progress: Optional[bool] = None) -> SweepSummary:
    """Compute every result of `spec` that `spec.out` lacks; see the module docstring.

    `pipeline`: an already loaded `(inpainting pipeline, params)` of `spec.model`, SD or SDXL (else
    it is loaded, if anything is left to compute); `mesh`: a 1-D data mesh (default: all devices);
    `progress`: a progress bar on process 0 (None: only on a terminal).
    """
    writer = jax.process_index() == 0
    store = ResultStore(spec.out)
    ids = spec.ids()
    with contextlib.ExitStack() as held:
        done, refused = {}, None
        if writer:  # process 0 alone locks, reads and writes the folder
            try:
                held.enter_context(store.lock())
            except SweepLockError as e:
                refused = e
            else:
                done = store.recover()
        plan = np.array([refused is None] + [i in done for i in ids])
        if jax.process_count() > 1:  # everyone follows process 0's plan
            plan = np.asarray(multihost_utils.broadcast_one_to_all(plan))
        if not plan[0]:
            raise refused or SweepLockError(f"process 0 could not lock {spec.out}; see its error.")
        todo = [(i, c) for i, c, d in zip(ids, spec.configs, plan[1:]) if not d]
        compute = _compute_diffedit if spec.pipeline == "diffedit" else _compute
        compiles = compute(spec, todo, pipeline, mesh, progress, store if writer else None, done) if todo else {}

        sheet = None
        if writer:
            sheet = spec.out / CONTACT_SHEET
            write_bytes_atomic(sheet, _contact_sheet(spec, ids, done))
    return SweepSummary(out=spec.out, total=len(ids), already_done=len(ids) - len(todo), computed=len(todo),
                        compiles=compiles, contact_sheet=sheet)


def _output_size(spec: SweepSpec, c: Config, f: int) -> Tuple[int, int]:
    """(height, width) of a configuration's result: its 'size', or its image's size floored to the VAE factor `f`."""
    if c.size:
        if c.size % f:
            raise SweepSpecError(f"sweep spec 'size' = {c.size} must be a multiple of {f} (the model's VAE scale "
                                 f"factor); use e.g. {max(f, c.size - c.size % f)}.")
        return c.size, c.size
    with Image.open(spec.base_dir / c.image) as im:
        w, h = im.size
    if min(w, h) < f:
        raise SweepSpecError(f"image {c.image!r} is {w}x{h}; the model needs at least {f}x{f} pixels "
                             "(its VAE factor): pass a larger image or set 'size'.")
    return h - h % f, w - w % f


def _compute(spec: SweepSpec, todo: List[Tuple[str, Config]], pipeline, mesh: Optional[Mesh],
             progress: Optional[bool], store: Optional[ResultStore], done: Dict[str, dict]) -> Dict[str, int]:
    """Run `todo` group by group; process 0 (`store` given) writes each result and adds it to `done`.
    Returns the sampling program's compilations per group."""
    from tqdm import tqdm

    from flax_inpaint.loaders import options
    from flax_inpaint.pipelines.callbacks import wants_bar
    from flax_inpaint.pipelines.auto import FlaxAutoPipelineForInpainting

    if pipeline is None:
        import jax.numpy as jnp

        try:
            pipeline = options.load(FlaxAutoPipelineForInpainting, None if spec.single_file else spec.model,
                                    spec.single_file, spec.config, dtype=getattr(jnp, spec.dtype))
        except (ValueError, OSError) as e:  # CheckpointError, a bad config, or a component the loader cannot read
            if spec.single_file:
                raise SweepSpecError(f"sweep spec 'single_file' {spec.single_file!r} could not be loaded: {e}") from e
            raise SweepSpecError(model_error("sweep spec 'model'", spec.model, e)) from e
    base_pipe, base_params = pipeline
    if spec.loras or spec.embeddings:  # on a copy: a given pipeline keeps its tokenizer
        base_pipe = type(base_pipe).from_pipe(base_pipe)
        try:
            base_params = options.apply(base_pipe, base_params, spec.loras, spec.embeddings)
        except (ValueError, OSError) as e:
            raise SweepSpecError(f"sweep spec 'lora' / 'textual_inversion' could not be loaded: {e}") from e
    mesh = mesh or data_mesh()
    global_batch = spec.per_device_batch * mesh.devices.size
    rows = _local_rows(mesh, global_batch)
    f = base_pipe.vae_scale_factor

    def group_of(c: Config) -> _Group:
        return _Group(*_output_size(spec, c, f), c.steps, c.scheduler, c.guidance > 1)

    groups: Dict[_Group, List[Tuple[str, Config]]] = defaultdict(list)
    for item in todo:
        groups[group_of(item[1])].append(item)
    pipes = {}
    for g in groups:  # check every group before computing anything
        if g.scheduler not in pipes:
            pipe, params = with_scheduler(base_pipe, base_params, g.scheduler)
            pipes[g.scheduler] = pipe, jax.device_put(params, NamedSharding(mesh, P()))  # once, not per batch
        for _, c in groups[g]:
            try:
                strength_fields(pipes[g.scheduler][0].scheduler, c.steps, c.strength)
            except ValueError as e:
                raise SweepSpecError(f"configuration {dataclasses.asdict(c)}: {e}") from None

    inputs: Dict[Tuple[str, str, int, int], tuple] = {}

    def prepared(pipe, c: Config, g: _Group):
        """(masked_image, mask, image) of one configuration, each [1, C, H, W], cached per file pair."""
        key = (c.image, c.mask, g.height, g.width)
        if key not in inputs:
            image, mask = _open(spec.base_dir / c.image, "RGB"), _open(spec.base_dir / c.mask, "L")
            inputs[key] = pipe.prepare_inputs("", image, mask, g.height, g.width, return_image=True)[1:]
        return inputs[key]

    compiles: Dict[str, int] = {}
    quiet = True if store is None else None if progress is None else not progress  # None: only on a terminal
    step_bar = quiet is not True and wants_bar(progress)  # a per-step bar for each call, under the sweep's
    with tqdm(total=len(todo), unit="img", desc="sweep", disable=quiet) as bar:
        for g, items in groups.items():
            pipe, params = pipes[g.scheduler]
            pipe.set_progress_bar_config(desc=g.label, unit="step", leave=False)
            compiles[g.label] = 0
            by_call: Dict[tuple, List[Tuple[str, Config]]] = defaultdict(list)
            for item in items:  # strength and the LoRA weights are one value per call (both traced)
                weights = spec.lora_weights(item[1])
                by_call[item[1].strength, None if weights is None else tuple(weights)].append(item)
            for (strength, weights), sub in by_call.items():
                call_params = params if weights is None else pipe.set_adapters(
                    params, options.lora_names(spec.loras), list(weights))
                for start in range(0, len(sub), global_batch):
                    chunk = sub[start:start + global_batch]
                    padded = chunk + [chunk[-1]] * (global_batch - len(chunk))
                    local = [c for _, c in padded[rows]]
                    masked, masks, images = (np.concatenate(a) for a in zip(*(prepared(pipe, c, g) for c in local)))
                    neg = [c.negative_prompt or "" for c in local]
                    # no negative prompt at all: None, so SDXL's force_zeros_for_empty_prompt applies as in diffusers
                    neg_ids = pipe.tokenize(neg) if any(neg) else None
                    tic = time.perf_counter()
                    with _CompileCounter() as counter:
                        out = pipe(pipe.tokenize([c.prompt for c in local]), masks, masked, call_params,
                                   seed_keys([c.seed for c in local]), num_inference_steps=g.steps,
                                   height=g.height, width=g.width, image=images, strength=strength,
                                   guidance_scale=np.array([c.guidance for c in local], np.float32),
                                   neg_prompt_ids=neg_ids, mesh=mesh, progress=step_bar)
                    seconds = time.perf_counter() - tic
                    compiles[g.label] += counter.count
                    if store is not None:
                        timings = {"batch_s": round(seconds, 4), "per_image_s": round(seconds / len(chunk), 4),
                                   "compile_s": round(counter.seconds, 4)}
                        nsfw = out.nsfw_content_detected
                        batch = {"size": global_batch, "real": len(chunk), "devices": int(mesh.devices.size),
                                 "processes": jax.process_count()}
                        for row, (rid, c) in enumerate(chunk):
                            record = _record(spec, rid, c, g, None if nsfw is None else bool(nsfw[row]), timings,
                                             batch)
                            store.write(record, _png(out.images[row]))
                            done[rid] = record
                    bar.update(len(chunk))
    return compiles


def _record(spec: SweepSpec, rid: str, c: Config, g: _Group, nsfw: Optional[bool], timings: dict, batch: dict,
            **extra) -> dict:
    """The manifest line of one result."""
    return {"id": rid, "file": f"{IMAGES}/{rid}.png", "config": dataclasses.asdict(c), "seed": c.seed,
            "model": spec.model, "dtype": spec.dtype, "height": g.height, "width": g.width, "group": g.label,
            "nsfw": nsfw, "timings": timings, "batch": batch, **extra}


def _compute_diffedit(spec: SweepSpec, todo: List[Tuple[str, Config]], pipeline, mesh: Optional[Mesh],
                      progress: Optional[bool], store: Optional[ResultStore], done: Dict[str, dict]) -> Dict[str, int]:
    """`_compute` for `"pipeline": "diffedit"`: the three DiffEdit steps (`edit`), one configuration per call
    on one device, so `mesh` and `per_device_batch` are unused. The groups add the strength, which sets the
    number of inverted latents; manifest lines add the share of the image the mask covered ("mask_fraction")."""
    from tqdm import tqdm

    from flax_inpaint.pipelines.diffedit import FlaxStableDiffusionDiffEditPipeline

    if jax.process_count() > 1:
        raise SweepSpecError("'pipeline': 'diffedit' runs in one process; run the sweep without --distributed.")
    for _, c in todo:  # before loading the model
        try:
            strength_steps("strength", c.strength, c.steps)
        except ValueError as e:
            raise SweepSpecError(f"configuration {dataclasses.asdict(c)}: {e}") from None
    if pipeline is None:
        import jax.numpy as jnp

        try:
            pipeline = FlaxStableDiffusionDiffEditPipeline.from_pretrained(spec.model, dtype=getattr(jnp, spec.dtype))
        except (ValueError, OSError) as e:  # as in _compute, and a 9-channel (inpainting) UNet
            raise SweepSpecError(model_error("sweep spec 'model'", spec.model, e)) from e
    pipe, params = pipeline
    f = pipe.vae_scale_factor
    groups: Dict[Tuple[_Group, float], List[Tuple[str, Config]]] = defaultdict(list)
    for rid, c in todo:
        groups[_Group(*_output_size(spec, c, f), c.steps, None, c.guidance > 1), c.strength].append((rid, c))
    compiles: Dict[str, int] = {}
    quiet = True if store is None else None if progress is None else not progress
    with tqdm(total=len(todo), unit="img", desc="sweep", disable=quiet) as bar:
        for (g, strength), items in groups.items():
            label = f"{g.label}-strength{strength}"
            compiles.setdefault(label, 0)
            for rid, c in items:
                image = _open(spec.base_dir / c.image, "RGB").resize((g.width, g.height), Image.BICUBIC)
                neg = None if c.negative_prompt is None else [c.negative_prompt]
                tic = time.perf_counter()
                with _CompileCounter() as counter:
                    mask, images = pipe.edit(image, params, jax.random.key(c.seed), source_prompt=[c.source_prompt],
                                             target_prompt=[c.prompt], num_inference_steps=c.steps,
                                             guidance_scale=c.guidance, invert_guidance_scale=c.guidance,
                                             inpaint_strength=strength, negative_prompt=neg)
                seconds = time.perf_counter() - tic
                compiles[label] += counter.count
                if store is not None:
                    timings = {"batch_s": round(seconds, 4), "per_image_s": round(seconds, 4),
                               "compile_s": round(counter.seconds, 4)}
                    record = _record(spec, rid, c, g, None, timings, {"size": 1, "real": 1, "devices": 1,
                                                                      "processes": 1},
                                     mask_fraction=float(mask.mean()))
                    store.write(record, _png(images[0]))
                    done[rid] = record
                bar.update(1)
    return compiles


def _contact_sheet(spec: SweepSpec, ids: List[str], records: Mapping[str, dict]) -> bytes:
    """All results of the spec in its order, each captioned with the options that vary in the sweep."""
    from flax_inpaint.image_processor import make_image_grid

    varying = [k for k in AXES if len({getattr(c, k) for c in spec.configs}) > 1]
    tiles = []
    for rid, c in zip(ids, spec.configs):
        with Image.open(spec.out / records[rid]["file"]) as im:
            tiles.append((im.convert("RGB"), [f"{k}={getattr(c, k)}" for k in varying]))
    w = max(128, max(t.width for t, _ in tiles))
    h = max(round(t.height * w / t.width) for t, _ in tiles)
    line = 12
    cells = []
    for tile, caption in tiles:
        cell = Image.new("RGB", (w, h + line * len(caption) + 4), "white")
        cell.paste(tile.resize((w, round(tile.height * w / tile.width)), Image.NEAREST))
        draw = ImageDraw.Draw(cell)
        for j, text in enumerate(caption):
            draw.text((2, h + 2 + j * line), _fit(draw, text, w - 4), fill="black")
        cells.append(cell)
    cols = math.ceil(math.sqrt(len(cells)))
    rows = math.ceil(len(cells) / cols)
    cells += [Image.new("RGB", cells[0].size, "white")] * (rows * cols - len(cells))
    buf = io.BytesIO()
    make_image_grid(cells, rows=rows, cols=cols).save(buf, format="PNG")
    return buf.getvalue()


def _fit(draw: ImageDraw.ImageDraw, text: str, width: int) -> str:
    """`text`, cut with an ellipsis to fit `width` pixels."""
    if draw.textlength(text) <= width:
        return text
    while text and draw.textlength(text + "...") > width:
        text = text[:-1]
    return text + "..."


def iter_manifest(out: Union[str, os.PathLike]) -> Iterator[dict]:
    """The records of a sweep folder's manifest, in the order they were written."""
    path = Path(out) / MANIFEST
    if path.exists():
        for line in path.read_text().splitlines():
            yield json.loads(line)
