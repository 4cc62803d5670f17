"""How to change LoRA weights without recompiling: merge in the program, or fuse on the host per change.

Both keep the compiled sampling program: the traced merge (what flax-inpaint does) passes the low-rank
factors and the adapter weights into the program, which adds weight * scale * down @ up to each targeted
kernel once per call; the host fuse (the alternative) writes the update into a host copy of the kernels
for every new weight and sends the params to the device again. `fuse_lora` (the update written once on
the device, factors set aside) is the third row: what to use when the weights stay fixed.

Each mode runs the same sequence of weights; a "change" is set-weight-then-generate, timed until the
images are on the host. Output: one JSON line per mode on stdout.

    python benchmarks/bench_lora.py --preset tiny --steps 4 --rank 8
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_inpaint as bi  # noqa: E402

from flax_inpaint.loaders import lora  # noqa: E402
from flax_inpaint.runtime import Runtime  # noqa: E402


def targeted(params) -> Dict[str, Dict[str, tuple]]:
    """component -> module -> kernel shape: every attention, feed-forward and projection layer of the UNet
    and every linear of the text encoder (the layers trainers target)."""
    return {component: {module: shape for module, (_, shape) in lora.targets(params[component]).items()
                        if component != "unet" or "transformer_blocks" in module or ".proj_" in module}
            for component in ("unet", "text_encoder")}


def random_lora(params, rank: int, seed: int = 0) -> Dict[str, np.ndarray]:
    """A PEFT-named random LoRA of `rank` over the `targeted` layers."""
    rng = np.random.default_rng(seed)
    out = {}
    for component, modules in targeted(params).items():
        for module, shape in modules.items():
            fan_in, fan_out = int(np.prod(shape[:-1])), shape[-1]
            down = rng.standard_normal((rank, fan_in), np.float32) / np.sqrt(fan_in)
            if len(shape) == 4:  # a conv kernel [kh, kw, in, out]: torch's [r, in, kh, kw]
                down = down.reshape(rank, *shape[:2], shape[2]).transpose(0, 3, 1, 2)
            out[f"{component}.{module}.lora_A.weight"] = down
            out[f"{component}.{module}.lora_B.weight"] = rng.standard_normal((fan_out, rank), np.float32) * 0.01
    return out


def host_fuse(base_host, factors, weight: float):
    """The alternative: the update written into a host copy of the kernels, then the params sent to the device."""
    params = dict(base_host)
    for component, modules in factors.items():
        flat = dict(jax.tree_util.tree_flatten_with_path(params[component])[0])
        tree = jax.tree_util.tree_structure(params[component])
        fused = {}
        for path, kernel in flat.items():
            module = "/".join(p.key for p in path[:-1])
            f = modules.get(module) if path[-1].key == "kernel" else None
            fused[path] = kernel if f is None else kernel + weight * f["scale"] * np.einsum(
                "...r,ro->...o", f["down"], f["up"])
        params[component] = jax.tree_util.tree_unflatten(tree, [fused[p] for p in flat])
    return jax.device_put(params)


def analysis(preset, rank: int, steps: int) -> Dict[str, Any]:
    """Sizes without running: what the traced merge computes per call and what a host fuse sends to the
    device per change, next to the sampling program's compute (XLA's cost analysis, abstract params)."""
    ours = bi.Ours(preset, "pndm", Runtime(), abstract=True)
    kernels = [int(np.prod(s)) for modules in targeted(ours.params).values() for s in modules.values()]
    factors = sum(rank * (int(np.prod(s[:-1])) + s[-1]) for m in targeted(ours.params).values() for s in m.values())
    program = ours.flops(ours.inputs(1, preset.size), steps, 7.5, preset.size)["tflop_per_image"]
    merge = sum(2 * rank * k + 2 * k for k in kernels)  # the rank-r product, then scale and add
    return {"mode": "analysis", "targeted_kernels": len(kernels), "targeted_kernel_params": sum(kernels),
            "lora_params": factors, "merge_gflop_per_call": merge / 1e9, "program_tflop_per_image": program,
            "merge_fraction_of_program": merge / (program * 1e12),
            "host_fuse_bytes_to_device_per_change_fp32": 4 * sum(kernels)}


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(bi.PRESETS), default="tiny")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--weights", type=float, nargs="+", default=[0.2, 0.4, 0.6, 0.8, 1.0, 1.2])
    p.add_argument("--repeat", type=int, default=3, help="passes over the weights (medians over all)")
    p.add_argument("--analysis", action="store_true", help="only the sizes (abstract params), e.g. for sd15")
    args = p.parse_args(argv)
    preset = bi.PRESETS[args.preset]
    if args.analysis:
        print(json.dumps({"preset": args.preset, "rank": args.rank, "steps": args.steps,
                          **analysis(preset, args.rank, args.steps)}), flush=True)
        return 0
    ours = bi.Ours(preset, "pndm", Runtime())
    inputs = ours.inputs(args.batch, preset.size)
    base = ours.params
    with_lora = lora.load_lora(base, random_lora(base, args.rank), adapter_name="style")
    factors = jax.device_get(with_lora["lora"]["adapters"]["style"])
    base_host = jax.device_get(base)
    n_factors = sum(x.size for x in jax.tree_util.tree_leaves(factors))
    common = {"preset": args.preset, "steps": args.steps, "batch": args.batch, "rank": args.rank,
              "lora_params": n_factors, "device": jax.devices()[0].device_kind, "cpu": bi.cpu_name()}

    def run(params):
        ours.params = params
        return np.asarray(ours.run(inputs, args.steps, 7.5))

    modes = {
        "no-lora": lambda w: base,
        "traced-merge": lambda w: lora.set_adapters(with_lora, "style", w),
        "host-fuse": lambda w: host_fuse(base_host, factors, w),
        "fuse_lora": lambda w: lora.fuse_lora(lora.set_adapters(with_lora, "style", w)),
    }
    for mode, params_for in modes.items():
        clock = bi.CompileClock()
        first = timed(lambda: run(params_for(args.weights[0])))
        compile_first = clock.seconds
        changes = [timed(lambda w=w: run(params_for(w))) for w in args.weights[1:] * args.repeat]
        prepare = [timed(lambda w=w: jax.block_until_ready(params_for(w))) for w in args.weights[1:] * args.repeat]
        fixed = params_for(args.weights[-1])
        steady = [timed(lambda: run(fixed)) for _ in range(len(changes))]
        record = {**common, "mode": mode, "first_call_s": first, "compile_s_first_call": compile_first,
                  "compile_s_after_first": clock.seconds - compile_first,
                  "per_change_s": statistics.median(changes), "prepare_params_s": statistics.median(prepare),
                  "steady_s": statistics.median(steady)}
        print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
