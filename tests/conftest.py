"""Test-wide settings: 8 fake CPU devices (pmap/mesh tests), an isolated params cache, fp32 math."""
import os

# Tiny models make XLA's CPU compile time dominate the suite; level 0 roughly halves it.
os.environ.setdefault(
    "XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FLAX_INPAINT_CACHE", str(tmp_path_factory.mktemp("flax_cache")))


def pytest_configure(config):
    try:
        import torch

        torch.set_num_threads(2)
    except ImportError:
        pass
