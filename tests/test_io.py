"""flax_inpaint.io on its own: atomic writes, and the layering it exists for (file and hub I/O, config
reading and the schedulers need no model code)."""
import ast
from pathlib import Path

import pytest

import flax_inpaint
from flax_inpaint.io import write_bytes_atomic

PACKAGE = Path(flax_inpaint.__file__).parent


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "sub" / "out.json"
    write_bytes_atomic(target, b"old")
    with pytest.raises(TypeError):
        write_bytes_atomic(target, None)  # fails after the temporary file is opened
    assert target.read_bytes() == b"old"
    assert [p.name for p in target.parent.iterdir()] == ["out.json"]


def _flax_inpaint_imports(path: Path) -> set:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {n for n in names if n.startswith("flax_inpaint.")}


@pytest.mark.parametrize("part", ["io", "schedulers", "diffusers_compat.py", "runtime.py"])
def test_io_and_schedulers_import_no_models_or_pipelines(part):
    files = sorted((PACKAGE / part).glob("*.py")) if (PACKAGE / part).is_dir() else [PACKAGE / part]
    found = {f"{f.relative_to(PACKAGE)}: {name}" for f in files for name in _flax_inpaint_imports(f)
             if name.startswith(("flax_inpaint.models", "flax_inpaint.pipelines"))}
    assert not found
