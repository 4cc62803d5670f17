#!/usr/bin/env python
"""Summarise bench_inpaint.py / bench_inpaint_torch.py JSON lines from separate runs as one table.

    python benchmarks/compare.py A.jsonl B.jsonl ...

Prints one row per (system, batch) throughput record, ours-over-diffusers ratios per batch (the first
flax-inpaint record of a batch is ours: a later one from a persistent-cache run is listed, not
compared), then the PSNR, NaN-check and profile records. Missing or empty files are skipped, so a
partly finished GPU visit still summarises what it measured.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Dict, List


def load(paths: List[str]) -> List[Dict[str, Any]]:
    records = []
    for path in map(Path, paths):
        if path.is_file():
            for line in path.read_text().splitlines():
                if line.startswith("{"):
                    records.append({**json.loads(line), "file": path.name})
    return records


def gb(n) -> str:
    return "-" if n is None else f"{n / 2**30:.1f}"


def table(records: List[Dict[str, Any]]) -> List[str]:
    out = ["system            file             batch   img/s   s/img  first_s compile_s peak_GiB finite",
           "----------------- ---------------- ----- ------- ------- -------- --------- -------- ------"]
    for r in records:
        if r["kind"] != "throughput":
            continue
        compile_s = r.get("compile_s")
        out.append(f"{r['system']:<17} {r['file']:<16} {r['batch']:>5} {r['img_per_s']:>7.3f} {r['s_per_img']:>7.3f} "
                   f"{r['first_call_s']:>8.1f} {'-' if compile_s is None else f'{compile_s:.1f}':>9} "
                   f"{gb(r.get('peak_mem_bytes')):>8} {str(r['finite']):>6}")
    return out


def ratios(records: List[Dict[str, Any]]) -> List[str]:
    ours: Dict[int, Dict[str, Any]] = {}
    for r in records:
        if r["kind"] == "throughput" and r["system"] == "flax-inpaint":
            ours.setdefault(r["batch"], r)
    out = []
    for t in records:
        if t["kind"] != "throughput" or t["system"] == "flax-inpaint" or t["batch"] not in ours:
            continue
        o = ours[t["batch"]]
        mem = (f"{o['peak_mem_bytes'] / t['peak_mem_bytes']:.2f}"
               if o.get("peak_mem_bytes") and t.get("peak_mem_bytes") else "-")
        out.append(f"ours / {t['system']:<16} batch {t['batch']:>3}: img/s x{o['img_per_s'] / t['img_per_s']:.2f}, "
                   f"s/img x{o['s_per_img'] / t['s_per_img']:.2f}, peak memory x{mem}")
    return out


def extras(records: List[Dict[str, Any]]) -> List[str]:
    out = []
    for r in records:
        if r["kind"] == "psnr":
            out.append(f"psnr {r['dtype']} vs fp32, batch {r['batch']}: {r['psnr_db_mean']:.2f} dB, "
                       f"max |diff| {r['max_abs_diff']:.4f}, finite {r['finite']}")
        elif r["kind"] == "nan_check":
            out.append(f"nan_check {r['scheduler']:<8} finite {r['finite']} range [{r['min']:.3f}, {r['max']:.3f}]")
        elif r["kind"] == "profile":
            out.append(f"profile batch {r['batch']}: wall {r['wall_s']:.3f} s, device busy {r['device_busy_s']:.3f} s, "
                       f"{r['kernel_launches']} launches, {r['distinct_kernels']} kernels")
            out += [f"  {k['s']:8.4f} s {k['count']:>6}x {k['name'][:90]}" for k in r["top_kernels"][:15]]
        elif r["kind"] == "error":
            out.append(f"error {r['system']}: {r.get('message')}")
    return out


def main(argv: List[str]) -> int:
    records = load(argv)
    print("\n".join(table(records) + [""] + ratios(records) + [""] + extras(records)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
