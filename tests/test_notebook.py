"""notebooks/flax_inpaint_colab_tpu.ipynb runs top to bottom on the CPU (conftest's 8 fake devices,
inherited by the kernel) with its default model, the bundled tiny shapes model, and 2 steps: install
guarded off Colab, loading, the pmap and mesh paths with per-step bars, a sweep and its resume, image grids
shown inline.
On a (simulated) Colab the install cell installs flax-inpaint from the source the user sets."""
import json
import subprocess
import sys
import types
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "flax_inpaint_colab_tpu.ipynb"


def test_notebook_executes(tmp_path, monkeypatch):
    monkeypatch.delenv("FLAX_INPAINT_NOTEBOOK_MODEL", raising=False)
    monkeypatch.setenv("FLAX_INPAINT_NOTEBOOK_STEPS", "2")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code")  # committed without outputs
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    pictures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pictures) == 4  # image | mask, pmap grid, mesh grid, contact sheet
    text = "".join(o.get("text", "") for o in outputs)
    assert "8 cpu device(s)" in text and "tiny-shapes-inpaint" in text and "8 found, 0 computed" in text
    assert "denoising: 100%" in text and "2/2 [" in text  # the per-step bars of the pmap and mesh calls
    records = [json.loads(line) for line in (tmp_path / "sweep-demo/results/manifest.jsonl").read_text().splitlines()]
    assert len(records) == 8 and len(list((tmp_path / "sweep-demo/results/images").iterdir())) == 8


def test_colab_install_cell_installs_from_the_source_the_user_sets(monkeypatch):
    """flax-inpaint is not on PyPI: on Colab the cell refuses to run until FLAX_INPAINT_SOURCE is set,
    then pip-installs exactly that (a git URL here) next to jax[tpu]."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    (cell,) = [c.source for c in nb.cells if c.cell_type == "code" and "IN_COLAB" in c.source and "pip" in c.source]
    calls = []
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kwargs: calls.append(cmd))
    monkeypatch.delenv("FLAX_INPAINT_SOURCE", raising=False)
    with pytest.raises(ValueError, match="Set FLAX_INPAINT_SOURCE in this cell to a git URL, a wheel or a checkout"):
        exec(cell, {})
    assert calls == []
    source = "git+https://example.org/me/flax-inpaint.git@v0.1.0"
    monkeypatch.setenv("FLAX_INPAINT_SOURCE", source)
    exec(cell, {})
    assert calls == [[sys.executable, "-m", "pip", "install", "-q", "jax[tpu]", source]]
