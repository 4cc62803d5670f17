"""notebooks/flax_inpaint_colab_tpu.ipynb runs top to bottom on the CPU (conftest's 8 fake devices,
inherited by the kernel) with its default model, the bundled tiny shapes model, and 2 steps: install
guarded off Colab, loading, the pmap and mesh paths, a sweep and its resume, image grids shown inline."""
import json
from pathlib import Path

import nbformat
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
    records = [json.loads(line) for line in (tmp_path / "sweep-demo/results/manifest.jsonl").read_text().splitlines()]
    assert len(records) == 8 and len(list((tmp_path / "sweep-demo/results/images").iterdir())) == 8
