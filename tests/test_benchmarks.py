"""Smoke test of benchmarks/bench_inpaint.py: the tiny preset on the CPU, ours and diffusers eager.

It checks that the script runs, that stdout is nothing but JSON lines and that each record carries
its fields with sane types. No timing is asserted: the numbers depend on the machine.
"""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_inpaint.py"
COMMON = {"kind", "system", "preset", "height", "width", "steps", "scheduler", "guidance_scale", "dtype", "date",
          "device", "versions", "batch"}
SPEED = {"img_per_s", "s_per_img", "steady_s", "steady_runs_s", "first_call_s", "compile_s", "peak_mem_bytes",
         "finite"}
OURS = {"tflop_per_image", "achieved_tflops", "peak_tflops", "floor_s_per_img", "fraction_of_floor",
        "persistent_cache_hits", "recompiled_in_steady_state", "attention"}


def test_tiny_preset_prints_json_lines_with_all_fields():
    cmd = [sys.executable, str(SCRIPT), "--preset", "tiny", "--batch", "1", "--steps", "2", "--repeat", "1",
           "--torch", "eager"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]  # stdout: JSON only
    by_system = {(r["kind"], r.get("baseline", r["system"])): r for r in records}
    assert set(by_system) == {("throughput", "flax-inpaint"), ("throughput", "diffusers-eager"),
                              ("ratio", "diffusers-eager")}, sorted(by_system)

    ours = by_system["throughput", "flax-inpaint"]
    theirs = by_system["throughput", "diffusers-eager"]
    for rec, keys in ((ours, COMMON | SPEED | OURS), (theirs, COMMON | SPEED)):
        assert keys <= set(rec), keys - set(rec)
        assert rec["preset"] == "tiny" and rec["batch"] == 1 and rec["steps"] == 2 and rec["height"] == 32
        assert rec["finite"] is True
        assert rec["img_per_s"] > 0 and rec["first_call_s"] > 0 and len(rec["steady_runs_s"]) == 1
        assert rec["peak_mem_bytes"] is None  # CPUs report no allocator statistics
    assert set(ours["versions"]) >= {"jax", "flax", "flax_inpaint"}
    assert set(theirs["versions"]) >= {"torch", "diffusers", "transformers"}
    assert ours["dtype"] == "bfloat16" and theirs["dtype"] == "float32"  # diffusers' CPU default
    assert ours["compile_s"] > 0 and theirs["compile_s"] is None  # eager PyTorch compiles nothing
    assert ours["tflop_per_image"] > 0 and ours["recompiled_in_steady_state"] is False
    assert ours["peak_tflops"] is None and ours["fraction_of_floor"] is None  # no peak known for a CPU

    ratio = by_system["ratio", "diffusers-eager"]
    assert ratio["img_per_s"] > 0 and ratio["batch"] == 1 and ratio["peak_mem_bytes"] is None


def run_script(*args: str) -> list:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--preset", "tiny", "--batch", "1", *args],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def test_flops_lowered_for_tpu_count_the_flash_kernels(monkeypatch, capsys):
    """Lowered for TPU on the CPU: at 64x64 pixels with the kernel taking 256-token sequences, each UNet
    pass runs 3 kernels (down block 1 layer, up block 2), whose own cost estimates add to XLA's count.
    In-process (nothing compiles): the two runs share one interpreter."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import bench_inpaint as bench

    def run(*args):
        assert bench.main(["--preset", "tiny", "--batch", "1", "--steps", "2", "--size", "64", "--flops-only",
                           "--flash-min-length", "256", *args]) == 0
        return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]

    cpu, = run()
    tpu, = run("--platform", "tpu")
    assert (cpu["lowered_for"], cpu["attention"]) == ("cpu", "xla") and "kernel_calls_per_unet_pass" not in cpu
    assert (tpu["lowered_for"], tpu["attention"]) == ("tpu", "pallas")
    assert tpu["kernel_calls_per_unet_pass"] == 3 and tpu["kernel_tflop_per_image"] > 0
    # the kernels pad the head dim (4 here) to 128 lanes, so they count more work than XLA's attention
    assert tpu["tflop_per_image"] > cpu["tflop_per_image"] > 0


def test_compile_only_reports_phases_and_memory():
    rec, = run_script("--steps", "2", "--compile-only")
    assert rec["kind"] == "compile" and rec["lowered_for"] == "cpu"
    for phase in ("setup", "trace", "lower", "compile"):
        assert rec[f"{phase}_s"] > 0 and rec[f"{phase}_cpu_s"] > 0
    assert rec["stablehlo_chars"] > 0 and rec["persistent_cache_hits"] == 0
    assert rec["argument_bytes"] > 0 and rec["temp_bytes"] > 0  # the CPU compiler reports its buffers
    assert rec["total_bytes"] == rec["argument_bytes"] + rec["output_bytes"] + rec["temp_bytes"] - rec["alias_bytes"]


def test_sdxl_preset_is_flops_only_and_sums_its_models(monkeypatch):
    """The sdxl preset has no Flax pipeline to drive yet: only --flops-only, from its models' passes
    (checked here on the same code path with SDXL-shaped tiny configs, in-process)."""
    import pytest

    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import bench_inpaint as bench

    with pytest.raises(SystemExit):
        bench.parse_args(["--preset", "sdxl"])
    args = bench.parse_args(["--preset", "sdxl", "--flops-only", "--batch", "1"])
    assert (args.steps, args.scheduler, args.size, args.guidance) == (30, "euler", 1024, 7.5)

    tiny = bench.PRESETS["tiny"]
    unet = {**bench.PRESETS["sdxl"].unet, "block_out_channels": [16, 32, 32], "attention_head_dim": [2, 4, 4],
            "norm_num_groups": 8, "cross_attention_dim": 64, "transformer_layers_per_block": [1, 1, 2],
            "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 32 + 6 * 8}
    preset = dataclasses.replace(
        bench.PRESETS["sdxl"], unet=unet, vae={**tiny.vae, "force_upcast": True},
        text_encoder={**tiny.text_encoder, "max_position_embeddings": 77},
        text_encoder_2={**tiny.text_encoder, "max_position_embeddings": 77, "hidden_act": "gelu"},
    )
    args = bench.parse_args(["--preset", "sdxl", "--flops-only", "--steps", "3", "--size", "32"])
    rec = bench.sdxl_flops(args, preset, batch=1)
    assert rec["unet_passes_per_image"] == 6  # Euler: one pass per step, both CFG halves
    parts = rec["tflop_per_image_by_model"]
    assert set(parts) == {"text_encoders", "vae_encode", "vae_decode"} and all(v > 0 for v in parts.values())
    assert rec["tflop_per_image"] > 6 * rec["unet_tflop_per_pass"] > 0


def test_sdxl_vae_nan_check(monkeypatch):
    """--preset sdxl --nan-check --no-throughput: SDXL's VAE round trip in bf16, upcast (force_upcast) and not."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import bench_inpaint as bench

    args = bench.parse_args(["--preset", "sdxl", "--nan-check", "--no-throughput", "--batch", "1", "--size", "32"])
    preset = dataclasses.replace(bench.PRESETS["sdxl"], vae={**bench.PRESETS["tiny"].vae, "force_upcast": True})
    records = list(bench.sdxl_vae_nan_check(args, preset, {}))
    assert [(r["activations"], r["force_upcast"]) for r in records] == [("float32", True), ("bfloat16", False)]
    assert all(r["finite"] and r["kind"] == "nan_check" and r["max"] > r["min"] for r in records)
