"""Test-wide settings: 8 fake CPU devices (pmap/mesh tests), an isolated params cache, fp32 math.

XLA compiles at its default optimization level, as users run it: that is where it fuses multiply-adds,
which the parity tests must see.
"""
import os
import platform
import re

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FLAX_INPAINT_CACHE", str(tmp_path_factory.mktemp("flax_cache")))


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """After each test file, drop JAX's caches of compiled programs: a worker runs hundreds of files, and
    keeping every file's executables (and their LLVM state) alive only grows its memory."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()


def pytest_configure(config):
    try:
        import torch

        torch.set_num_threads(2)
    except ImportError:
        pass


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return platform.processor() or platform.machine()
    model = re.search(r"^model name\s*:\s*(.+)$", info, re.M)
    flags = set(re.search(r"^flags\s*:\s*(.+)$", info, re.M).group(1).split()) if "flags" in info else set()
    isa = [f for f in ("avx512f", "avx2", "fma") if f in flags]
    return f"{model.group(1) if model else platform.machine()} ({os.cpu_count()} cpus; {' '.join(isa) or 'no avx2'})"


def _xla_target() -> str:
    """The CPU name and vector ISA XLA compiles for (after --xla_cpu_max_isa), read from a compiled
    executable's serialized target options (no public API exposes them)."""
    import jax
    from jax._src import xla_bridge

    compiled = jax.jit(lambda x: x + 1).lower(1.0).compile()
    blob = xla_bridge.get_backend().serialize_executable(compiled.runtime_executable())
    found = re.search(rb"x86_64[\w-]*\x12(.)", blob, re.S)
    if not found:
        return "unknown"
    cpu = blob[found.end(): found.end() + found.group(1)[0]].decode(errors="replace")
    isa = [f for f in ("avx512f", "avx2", "fma") if b"+" + f.encode() + b"," in blob]
    return f"{cpu} ({' '.join(isa) or 'no avx2'})"


def pytest_report_header(config):
    """Where the suite ran: parity tolerances are machine-independent, but a failure report should say."""
    lines = [f"cpu: {_cpu_model()}"]
    try:
        import torch

        lines.append(f"torch {torch.__version__}: cpu capability {torch.backends.cpu.get_cpu_capability()}"
                     f" (ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY', 'unset')})")
    except ImportError:
        pass
    try:
        import numpy as np
        from numpy._core._multiarray_umath import __cpu_features__

        simd = [k for k in ("AVX512_SKX", "AVX512F", "AVX2", "FMA3") if __cpu_features__.get(k)]
        lines.append(f"numpy {np.__version__}: SIMD {' '.join(simd) or 'baseline'}")
    except ImportError:
        pass
    try:
        import jax

        lines.append(f"jax {jax.__version__}: XLA cpu target {_xla_target()}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')}")
    except Exception as e:  # the header must never stop the run
        lines.append(f"jax: XLA cpu target unknown ({type(e).__name__}: {e})")
    return lines
