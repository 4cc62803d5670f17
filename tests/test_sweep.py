"""Research sweeps (flax_inpaint.sweep): spec expansion and errors, results against diffusers, resume
after a simulated kill, one compilation per shape group, and a 2-process run equal to a 1-process run.

Model: tiny_sd's random 9-channel pipeline (PNDM), 2 steps, on conftest's 8 fake CPU devices. The
sweep writes 8-bit PNGs, so image comparisons are in 8-bit levels:
  * against diffusers (same prompt, guidance, size and initial noise): within 2 levels (the pipelines'
    1e-3 parity plus rounding to 8 bits);
  * between runs of the sweep (resumed vs uninterrupted, 2 processes vs 1): within 1 level.
"""
import json
import os
import socket
import subprocess
import sys
from importlib import resources
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest
import torch
from jax.sharding import Mesh
from PIL import Image

import tiny_sd
from flax_inpaint import FlaxStableDiffusionInpaintPipeline
from flax_inpaint.sweep import (
    MANIFEST,
    ResultStore,
    SweepSpec,
    SweepSpecError,
    iter_manifest,
    run_sweep,
)

STEPS = 2
GRID = {"prompt": ["a red cat", "a cat"], "seed": [0, 1, 2], "guidance": [3.0, 7.5]}


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    folder, torch_pipe = tiny_sd.make_pipeline(root, in_channels=9)
    image, mask = tiny_sd.sample_image_and_mask()
    image.save(root / "image.png")
    mask.save(root / "mask.png")
    pipe, params = FlaxStableDiffusionInpaintPipeline.from_pretrained(folder)
    return SimpleNamespace(root=root, folder=folder, torch=torch_pipe, pipe=pipe, params=params,
                           image=image, mask=mask)


def make_spec(sd, out, **extra) -> SweepSpec:
    spec = {"model": sd.folder.name, "out": str(out), "image": "image.png", "mask": "mask.png", "steps": STEPS,
            "grid": GRID, **extra}
    return SweepSpec.from_dict(spec, base_dir=sd.root)


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), np.int16)


def check_folder(spec: SweepSpec):
    """Every result exactly once: manifest lines == PNG files == the spec's ids; records match configs."""
    records = list(iter_manifest(spec.out))
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)), "duplicate manifest lines"
    assert sorted(ids) == sorted(spec.ids())
    assert sorted(p.name for p in (spec.out / "images").iterdir()) == sorted(f"{i}.png" for i in ids)
    by_id = dict(zip(spec.ids(), spec.configs))
    for r in records:
        c = by_id[r["id"]]
        assert r["config"]["prompt"] == c.prompt and r["seed"] == c.seed == r["config"]["seed"]
        assert r["config"]["guidance"] == c.guidance and r["config"]["strength"] == c.strength
        assert r["nsfw"] is None  # tiny_sd has no safety checker
        assert set(r["timings"]) == {"batch_s", "per_image_s", "compile_s"}
    return {r["id"]: r for r in records}


def test_spec_expands_list_times_grid(sd, tmp_path):
    spec = make_spec(sd, tmp_path, list=[{}, {"size": 16, "strength": 0.5}])
    assert len(spec.configs) == 2 * 12
    first, last = spec.configs[0], spec.configs[-1]
    assert (first.prompt, first.seed, first.guidance, first.size) == ("a red cat", 0, 3.0, None)
    assert (last.prompt, last.seed, last.guidance, last.size, last.strength) == ("a cat", 2, 7.5, 16, 0.5)
    assert spec.model == str(sd.folder)  # relative to the spec's folder
    again = make_spec(sd, tmp_path, grid={**GRID, "seed": [0, 1, 2, 1]})  # repeated values run once
    assert again.ids() == make_spec(sd, tmp_path).ids() and len(set(again.ids())) == 12


@pytest.mark.parametrize("change,message", [
    ({"grid": {"seed": [0, -1]}}, r"grid.seed\[1\] = -1: seed must be an int in \[0, 2\*\*32\)"),
    ({"grid": {"steps": [2, 0]}}, r"grid.steps\[1\] = 0: steps must be an int >= 1"),
    ({"guidance": [1, 2]}, r"'guidance' is a list at the top level; put options to vary under 'grid'"),
    ({"sampler": "ddim"}, r"unknown key\(s\) \['sampler'\]"),
    ({"list": [{"image": "missing.png"}]}, r"list\[0\].image = 'missing.png': no such file"),
    ({"list": [{"seed": 3}]}, r"list\[0\].seed is also a grid axis"),
    ({"dtype": "float16"}, r"'dtype' = 'float16'; use one of \['float32', 'bfloat16'\]"),
    ({"per_device_batch": 0}, r"'per_device_batch' = 0 must be an int >= 1"),
    ({"grid": {"size": [0]}}, r"grid.size\[0\] = 0: size must be a positive int"),  # see test_size_follows_the_vae
    ({"grid": {"scheduler": [None, "Fancy"]}}, r"grid.scheduler\[1\]: Scheduler 'Fancy' is not supported; supported: "),
])
def test_spec_errors_name_the_key(sd, tmp_path, change, message):
    with pytest.raises(SweepSpecError, match=message):
        make_spec(sd, tmp_path, **change)


def test_size_follows_the_vae(tmp_path):
    """The bundled model's VAE downsamples 4x (not SD's 8x): size 20 runs, 18 fails before computing."""
    assets = Path(str(resources.files("flax_inpaint.assets")))
    pipeline = FlaxStableDiffusionInpaintPipeline.from_pretrained(assets / "tiny-shapes-inpaint", safety_checker=None)
    spec = {"model": str(assets / "tiny-shapes-inpaint"), "image": str(assets / "sample_image.png"),
            "mask": str(assets / "sample_mask.png"), "prompt": "a circle", "steps": 1}
    with pytest.raises(SweepSpecError, match=r"^sweep spec 'size' = 18 must be a multiple of 4 \(the model's VAE "
                                             r"scale factor\); use e.g. 16.$"):
        run_sweep(SweepSpec.from_dict({**spec, "out": str(tmp_path / "18"), "size": 18}), pipeline=pipeline)
    assert not list((tmp_path / "18" / "images").iterdir())
    run_sweep(SweepSpec.from_dict({**spec, "out": str(tmp_path / "20"), "size": 20}), pipeline=pipeline)
    (record,) = iter_manifest(tmp_path / "20")
    assert Image.open(tmp_path / "20" / record["file"]).size == (20, 20)


def test_spec_files_json_and_yaml(sd, tmp_path):
    spec = {"model": str(sd.folder), "out": "results", "image": str(sd.root / "image.png"),
            "mask": str(sd.root / "mask.png"), "grid": {"seed": [0, 1]}, "prompt": "a cat"}
    (tmp_path / "s.json").write_text(json.dumps(spec))
    (tmp_path / "s.yaml").write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in spec.items()))  # JSON is YAML
    a, b = SweepSpec.from_file(tmp_path / "s.json"), SweepSpec.from_file(tmp_path / "s.yaml")
    assert a == b and a.out == tmp_path / "results" and len(a.configs) == 2
    (tmp_path / "s.toml").write_text("")
    with pytest.raises(SweepSpecError, match=r"use a .json file \(or .yaml / .yml with PyYAML\)"):
        SweepSpec.from_file(tmp_path / "s.toml")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(SweepSpecError, match="is not valid JSON"):
        SweepSpec.from_file(tmp_path / "bad.json")


def test_unreachable_strength_fails_before_computing(sd, tmp_path):
    spec = make_spec(sd, tmp_path / "out", strength=0.2)  # int(2 * 0.2) = 0 denoising steps
    with pytest.raises(SweepSpecError, match=r"'strength': 0.2.*runs no denoising step"):
        run_sweep(spec, pipeline=(sd.pipe, sd.params))
    assert not list((tmp_path / "out" / "images").iterdir())


def initial_noise(seed: int, size: int) -> torch.Tensor:
    """The initial latents (NCHW) that sampling.generate draws from jax.random.key(seed): the first of
    its four split keys; the tiny VAE factor is 4."""
    key = jax.random.split(jax.random.key(seed), 4)[0]
    noise = jax.random.normal(key, (1, size // 4, size // 4, 4))
    return torch.from_numpy(np.asarray(noise).transpose(0, 3, 1, 2).copy())


def test_kill_and_resume_one_compile_per_group_and_diffusers_parity(sd, tmp_path, monkeypatch):
    """A run killed between writing a PNG and its manifest line (the line torn) resumes with nothing lost
    or duplicated; each shape group compiles once over both runs; results equal an uninterrupted run in
    another batch order, and diffusers for the same prompt, guidance, size and initial noise."""
    spec = make_spec(sd, tmp_path / "out", list=[{"strength": 1.0}, {"strength": 0.5}, {"size": 16}])
    assert len(spec.configs) == 36  # groups: 32x32 (24: two strengths), 16x16 (12); batches of 8

    real_write, written = ResultStore.write, []

    def dying_write(self, record, png):
        if len(written) == 26:  # inside the 16x16 group: both groups have compiled
            (self.out / record["file"]).write_bytes(png)  # the PNG landed ...
            with open(self.manifest, "ab") as f:
                f.write(json.dumps(record).encode()[:50])  # ... its line is torn by the kill
            raise KeyboardInterrupt
        real_write(self, record, png)
        written.append(record["id"])

    jax.clear_caches()
    with tiny_sd.count_compiles(only="generate_groups") as compiles:
        monkeypatch.setattr(ResultStore, "write", dying_write)
        with pytest.raises(KeyboardInterrupt):
            run_sweep(spec, pipeline=(sd.pipe, sd.params))
        assert len(list(iter_manifest_lines(spec.out))) == 27 and len(list((spec.out / "images").iterdir())) == 27
        monkeypatch.setattr(ResultStore, "write", real_write)
        summary = run_sweep(spec, pipeline=(sd.pipe, sd.params))
    assert len(compiles) == 2  # one per shape group, over the killed and the resumed run
    assert summary.compiles == {"16x16-2steps-model-scheduler-cfg": 0}  # resumed: only that group was left
    assert (summary.total, summary.already_done, summary.computed) == (36, 26, 10)
    records = check_folder(spec)
    assert [r["id"] for r in iter_manifest(spec.out)][:26] == written  # earlier lines kept as they were
    assert summary.contact_sheet.is_file() and Image.open(summary.contact_sheet).size[0] >= 6 * 128

    again = run_sweep(spec, pipeline=(sd.pipe, sd.params))  # finished: nothing to do
    assert (again.already_done, again.computed) == (36, 0) and check_folder(spec) == records

    # Uninterrupted, in another order (so other batch companions); no new compilation needed.
    other = make_spec(sd, tmp_path / "other", list=[{"size": 16}, {"strength": 0.5}, {"strength": 1.0}],
                      grid={"guidance": GRID["guidance"], "seed": GRID["seed"], "prompt": GRID["prompt"]})
    assert sorted(other.ids()) == sorted(spec.ids()) and other.ids() != spec.ids()
    run_sweep(other, pipeline=(sd.pipe, sd.params))
    for r in records.values():
        diff = np.abs(pixels(spec.out / r["file"]) - pixels(other.out / r["file"])).max()
        assert diff <= 1, (r["config"], diff)

    # diffusers: same prompt, guidance, size and the initial noise of key(seed).
    by_id = dict(zip(spec.ids(), spec.configs))
    for rid, c in by_id.items():
        if (c.prompt, c.seed, c.guidance, c.size) not in {("a cat", 2, 7.5, None), ("a red cat", 1, 3.0, 16)} \
                or c.strength != 1.0:
            continue
        size = c.size or 32
        with torch.no_grad():
            ref = sd.torch(c.prompt, image=sd.image, mask_image=sd.mask, latents=initial_noise(c.seed, size),
                           num_inference_steps=STEPS, guidance_scale=c.guidance, height=size, width=size,
                           output_type="np").images[0]
        ours = pixels(spec.out / records[rid]["file"]) / 255.0
        assert ref.std() > 0.02
        np.testing.assert_allclose(ours, ref, atol=2 / 255, rtol=0)


def test_scheduler_steps_and_image_axes_compile_once_per_group(sd, tmp_path, capsys):
    """Steps x scheduler x two image/mask pairs: one compilation per (steps, scheduler) group, whose second
    batch (on a 1-device mesh, one image/mask pair per batch) reuses the program; every result once, and
    each axis changes the image. With progress=True each call also shows a per-step bar named by its group."""
    image, mask = tiny_sd.sample_image_and_mask(seed=1)
    image.save(sd.root / "image2.png")
    mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(sd.root / "mask2.png")
    spec = make_spec(sd, tmp_path / "out", prompt="a cat", guidance=1.0,
                     grid={"steps": [2, 3], "scheduler": [None, "DDIMScheduler"]},
                     list=[{"image": "image.png", "mask": "mask.png"}, {"image": "image2.png", "mask": "mask2.png"}])
    assert len(spec.configs) == 8
    jax.clear_caches()
    summary = run_sweep(spec, pipeline=(sd.pipe, sd.params), mesh=Mesh(np.array(jax.devices()[:1]), ("data",)),
                        progress=True)
    labels = [f"32x32-{n}steps-{s}-nocfg" for n in (2, 3) for s in ("model-scheduler", "DDIMScheduler")]
    assert summary.compiles == dict.fromkeys(labels, 1)
    err = capsys.readouterr().err
    assert all(f"{label}: " in err for label in labels) and "step/s]" in err and "img/s]" in err
    assert (summary.total, summary.computed) == (8, 8) and summary.contact_sheet.is_file()
    records = check_folder(spec)
    for rid, c in zip(spec.ids(), spec.configs):
        r = records[rid]
        assert (r["config"]["image"], r["config"]["mask"], r["config"]["steps"]) == (c.image, c.mask, c.steps)
        assert r["group"] == f"32x32-{c.steps}steps-{c.scheduler or 'model-scheduler'}-nocfg"
        assert r["batch"] == {"size": 1, "real": 1, "devices": 1, "processes": 1}
    assert len({pixels(spec.out / r["file"]).tobytes() for r in records.values()}) == 8


def iter_manifest_lines(out: Path):
    return (line for line in (out / MANIFEST).read_bytes().split(b"\n") if line)


def test_recover_drops_orphans_and_torn_lines(tmp_path):
    """Folder states a kill can leave: orphan PNG, line without PNG, torn last line, temp files. Files
    that are not ours (other names) stay: --out may point at a folder holding the user's own images."""
    store = ResultStore(tmp_path)
    store.images.mkdir(parents=True)
    a, b, c, d = (f"{k:x}" * 16 for k in (10, 11, 12, 13))  # result ids are 16 hex digits
    ok = {"id": a, "file": f"images/{a}.png"}
    store.write(ok, b"png-a")
    (store.images / f"{b}.png").write_bytes(b"orphan")  # PNG whose line never came
    (store.images / f".{c}.png.x1y2z3.tmp").write_bytes(b"half")  # interrupted atomic write
    (tmp_path / f".{MANIFEST}.x1y2z3.tmp").write_bytes(b"half")  # interrupted manifest rewrite
    (store.images / "photo.png").write_bytes(b"the user's")
    (store.images / f"{b}.png.bak").write_bytes(b"the user's")
    with open(store.manifest, "ab") as f:
        f.write(json.dumps({"id": d, "file": f"images/{d}.png"}).encode() + b"\n")  # line whose PNG is gone
        f.write(json.dumps(ok).encode() + b"\n")  # duplicate
        f.write(b'{"id": "e", "fi')  # torn
    assert store.recover() == {a: ok}
    assert sorted(p.name for p in store.images.iterdir()) == sorted([f"{a}.png", "photo.png", f"{b}.png.bak"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", MANIFEST]
    assert store.manifest.read_text() == json.dumps(ok, sort_keys=True) + "\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_process(sd, tmp_path):
    """2 processes x 4 CPU devices (jax.distributed on localhost, the CLI) write the results of 1 process
    x 8 devices: same ids and configs, pixels within 1 level, each result once."""
    spec_dict = {"model": str(sd.folder), "image": str(sd.root / "image.png"), "mask": str(sd.root / "mask.png"),
                 "steps": STEPS, "negative_prompt": "blurry",
                 "grid": {"prompt": ["a red cat", "a cat"], "seed": [5, 6, 7], "guidance": [3.0, 7.5]}}
    (tmp_path / "spec.json").write_text(json.dumps(spec_dict))
    one = SweepSpec.from_file(tmp_path / "spec.json", out=str(tmp_path / "one"))
    run_sweep(one, pipeline=(sd.pipe, sd.params))

    port = _free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    cmd = [sys.executable, "-m", "flax_inpaint.cli", "sweep", str(tmp_path / "spec.json"), "--out",
           str(tmp_path / "two"), "--no-progress", "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2"]
    procs = [subprocess.Popen(cmd + ["--process-id", str(i)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [p.communicate(timeout=500)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n\n".join(log[-3000:] for log in logs)

    two = SweepSpec.from_file(tmp_path / "spec.json", out=str(tmp_path / "two"))
    ones, twos = check_folder(one), check_folder(two)
    assert ones.keys() == twos.keys() and len(ones) == 12
    for rid, r in twos.items():
        assert r["batch"]["processes"] == 2 and r["batch"]["devices"] == 8
        assert r["config"] == ones[rid]["config"]
        diff = np.abs(pixels(two.out / r["file"]) - pixels(one.out / r["file"])).max()
        assert diff <= 1, (r["config"], diff)
