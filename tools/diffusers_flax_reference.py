"""Extract diffusers 0.39.0's Flax public API and its documented Flax examples from the wheel.

diffusers 0.39 is the last release with Flax code and cannot be installed beside the PyTorch
reference (0.42), so this reads its sources from the wheel with `ast`, never importing them:

    python tools/diffusers_flax_reference.py [--wheel diffusers-0.39.0-py3-none-any.whl]

Without --wheel it runs `pip download --no-deps diffusers==0.39.0` into a temporary folder. It writes

  tests/data/diffusers_flax_api.json   every public Flax class with its methods, keywords (defaults as
                                       source text), fields and class attributes, one entry per name;
  tests/data/diffusers_flax_examples/  the `EXAMPLE_DOC_STRING` of each Flax pipeline module as a
                                       Python file (doctest prompts stripped, code otherwise verbatim).

What counts as public: the Flax names diffusers' `__init__` files export, the output dataclasses of
their modules and the classes their fields name, every public class and function of the Flax
scheduler modules, and the `diffusers.utils` functions the examples import. A class's entries include
what it inherits from diffusers' own bases (ConfigMixin, PushToHubMixin, BaseOutput); a method's
`**kwargs` that the body reads with `kwargs.pop("name", default)` are listed as keywords too. Left
out: linen's `setup` hook and methods that only raise (BaseOutput's pop/update/setdefault forbid them).
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

VERSION = "0.39.0"
ROOT = Path(__file__).resolve().parents[1]
API_JSON = ROOT / "tests" / "data" / "diffusers_flax_api.json"
EXAMPLES_DIR = ROOT / "tests" / "data" / "diffusers_flax_examples"

# Packages whose `__init__` lists the Flax exports (`_import_structure[...]` entries of *flax* modules).
EXPORTING_INITS = (
    "diffusers", "diffusers.models", "diffusers.schedulers", "diffusers.pipelines",
    "diffusers.pipelines.stable_diffusion", "diffusers.pipelines.controlnet",
)
# diffusers' non-Flax base classes whose members the Flax classes inherit.
BASE_MODULES = ("diffusers.configuration_utils", "diffusers.utils.hub_utils", "diffusers.utils.outputs")
# Dunder methods that are part of the API (constructors, calls, containers).
DUNDERS = ("__init__", "__call__", "__len__", "__getitem__")


def module_path(module: str) -> str:
    return module.replace(".", "/") + ".py"


class Wheel:
    def __init__(self, path: Path):
        self.zip = zipfile.ZipFile(path)
        self.names = set(self.zip.namelist())
        self.trees: dict[str, ast.Module] = {}

    def tree(self, module: str) -> ast.Module:
        if module not in self.trees:
            name = module_path(module)
            if name not in self.names:
                name = module.replace(".", "/") + "/__init__.py"
            self.trees[module] = ast.parse(self.zip.read(name).decode())
        return self.trees[module]

    def flax_modules(self) -> list[str]:
        """Every diffusers module with "flax" in its file name (the dummy-object stubs aside)."""
        return sorted(n[:-3].replace("/", ".") for n in self.names if n.startswith("diffusers/") and n.endswith(".py")
                      and "flax" in n.rsplit("/", 1)[1] and "/dummy_" not in n)


def resolve_relative(package: str, level: int, module: str | None) -> str:
    parts = package.split(".")
    base = parts[: len(parts) - level + 1]
    return ".".join(base + ([module] if module else []))


def flax_exports(wheel: Wheel) -> dict[str, dict]:
    """name -> {"module": defining module, "exported_from": [packages]} for every Flax export."""
    found: dict[str, dict] = {}
    for package in EXPORTING_INITS:
        for node in ast.walk(wheel.tree(package)):
            # _import_structure["sub.module_flax"] = [names]  /  _import_structure["x"].extend([names])
            key, names = None, None
            if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Subscript):
                key, names = node.targets[0].slice, node.value
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "extend"
                  and isinstance(node.func.value, ast.Subscript)):
                key, names = node.func.value.slice, node.args[0]
            if not (isinstance(key, ast.Constant) and isinstance(key.value, str) and isinstance(names, ast.List)):
                continue
            for elt in names.elts:
                if not (isinstance(elt, ast.Constant) and isinstance(elt.value, str) and "Flax" in elt.value):
                    continue
                sub = key.value
                module = f"{package}.{sub}"
                if not (module_path(module) in wheel.names or f"{module.replace('.', '/')}/__init__.py" in wheel.names):
                    continue
                entry = found.setdefault(elt.value, {"module": None, "exported_from": []})
                entry["exported_from"].append(package)
                if "flax" in sub or entry["module"] is None:
                    entry["module"] = module
    for entry in found.values():  # a subpackage (e.g. "controlnet") re-exports from its defining module
        while f"{entry['module'].replace('.', '/')}/__init__.py" in wheel.names:
            entry["module"] = defining_module(wheel, entry["module"], next(n for n, e in found.items() if e is entry))
        entry["exported_from"] = sorted(set(entry["exported_from"]))
    return found


def defining_module(wheel: Wheel, package: str, name: str) -> str:
    for node in ast.walk(wheel.tree(package)):
        if isinstance(node, ast.ImportFrom) and any(a.name == name for a in node.names):
            return resolve_relative(package, node.level, node.module)
    raise LookupError(f"{name} not found in {package}")


def classes_and_functions(tree: ast.Module) -> dict[str, ast.AST]:
    out = {}
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
            out[node.name] = node
        elif isinstance(node, ast.If):  # `if is_flax_available(): class ...`
            out.update(classes_and_functions(ast.Module(body=node.body, type_ignores=[])))
    return out


def decorator_names(node) -> list[str]:
    return [ast.unparse(d).split("(")[0] for d in node.decorator_list]


def params_of(fn: ast.FunctionDef) -> list[dict]:
    a = fn.args
    out = []
    positional = a.posonlyargs + a.args
    defaults = [None] * (len(positional) - len(a.defaults)) + list(a.defaults)
    for i, (arg, default) in enumerate(zip(positional, defaults)):
        kind = "POSITIONAL_ONLY" if i < len(a.posonlyargs) else "POSITIONAL_OR_KEYWORD"
        out.append(param(arg.arg, kind, default))
    if a.vararg:
        out.append({"name": a.vararg.arg, "kind": "VAR_POSITIONAL"})
    for arg, default in zip(a.kwonlyargs, a.kw_defaults):
        out.append(param(arg.arg, "KEYWORD_ONLY", default))
    if a.kwarg:
        out.append({"name": a.kwarg.arg, "kind": "VAR_KEYWORD"})
        for node in ast.walk(fn):  # kwargs.pop("name", default): documented keywords read from **kwargs
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "pop"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == a.kwarg.arg
                    and node.args and isinstance(node.args[0], ast.Constant)):
                name = node.args[0].value
                if all(p["name"] != name for p in out):
                    p = param(name, "KEYWORD_ONLY", node.args[1] if len(node.args) > 1 else ast.Constant(None))
                    p["via"] = "**" + a.kwarg.arg
                    out.append(p)
    return [p for p in out if p["name"] not in ("self", "cls")]


def param(name: str, kind: str, default) -> dict:
    p = {"name": name, "kind": kind}
    if default is not None:
        p["default"] = ast.unparse(default)
    return p


def class_entries(name: str, node: ast.ClassDef, module: str, resolve) -> dict[str, dict]:
    """Entries of one class: the class itself, its members, and (via `resolve`) its diffusers bases'."""
    bases = [ast.unparse(b) for b in node.bases]
    decorators = decorator_names(node)
    entries = {name: {"kind": "class", "module": module, "bases": bases,
                      **({"decorators": decorators} if decorators else {})}}
    members = own_members(node, name)
    for base in bases:
        found = resolve(base)
        if found is None:
            continue
        base_node, base_module = found
        for key, entry in class_entries(base, base_node, base_module, resolve).items():
            if "." in key and key.split(".", 1)[1] not in members:
                members[key.split(".", 1)[1]] = {**entry, "defined_in": entry.get("defined_in", base)}
    if any(b == "Enum" for b in bases):
        members = {k: v for k, v in members.items() if v["kind"] == "enum_member"}
    for member, entry in members.items():
        entries[f"{name}.{member}"] = entry
    return entries


def own_members(node: ast.ClassDef, owner: str) -> dict[str, dict]:
    members = {}
    is_enum = any(ast.unparse(b) == "Enum" for b in node.bases)
    for item in node.body:
        if isinstance(item, ast.FunctionDef) and (not item.name.startswith("_") or item.name in DUNDERS) \
                and item.name != "setup" and not only_raises(item):
            decorators = decorator_names(item)
            kind = ("property" if "property" in decorators else "classmethod" if "classmethod" in decorators
                    else "staticmethod" if "staticmethod" in decorators else "method")
            entry = {"kind": kind, "defined_in": owner}
            if kind != "property":
                entry["params"] = params_of(item)
            members[item.name] = entry
        elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name) and not item.target.id.startswith("_"):
            entry = {"kind": "field", "defined_in": owner, "annotation": ast.unparse(item.annotation)}
            if item.value is not None:
                entry["default"] = ast.unparse(item.value)
            members[item.target.id] = entry
        elif isinstance(item, ast.Assign):
            for target in item.targets:
                if isinstance(target, ast.Name) and not target.id.startswith("_"):
                    members[target.id] = {"kind": "enum_member" if is_enum else "attribute", "defined_in": owner,
                                          "value": ast.unparse(item.value)}
    return members


def only_raises(fn: ast.FunctionDef) -> bool:
    """A method whose body (after its docstring) only raises exists to forbid the call (BaseOutput.pop)."""
    body = [n for n in fn.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
    return len(body) == 1 and isinstance(body[0], ast.Raise)


def example_utils(wheel: Wheel, codes: dict[str, str]) -> dict[str, dict]:
    """The `diffusers.utils` names the examples import, as exports of diffusers.utils."""
    found = {}
    for code in codes.values():
        for node in ast.walk(ast.parse(code)):
            if isinstance(node, ast.ImportFrom) and node.module == "diffusers.utils":
                for alias in node.names:
                    found[alias.name] = {"module": defining_module(wheel, "diffusers.utils", alias.name),
                                         "exported_from": ["diffusers.utils"]}
    return found


def build_api(wheel: Wheel, codes: dict[str, str]) -> dict[str, dict]:
    exports = {**flax_exports(wheel), **example_utils(wheel, codes)}
    names = set(wheel.flax_modules()) | set(BASE_MODULES) | {e["module"] for e in exports.values()}
    modules = {m: classes_and_functions(wheel.tree(m)) for m in sorted(names)}

    def resolve(name: str):
        for m, defs in modules.items():
            if isinstance(defs.get(name), ast.ClassDef):
                return defs[name], m
        return None

    api: dict[str, dict] = {}

    def add(name: str, module: str, exported_from: list[str]):
        node = modules[module][name]
        if isinstance(node, ast.ClassDef):
            entries = class_entries(name, node, module, resolve)
        else:
            entries = {name: {"kind": "function", "module": module, "params": params_of(node)}}
        entries[name]["exported_from"] = exported_from
        api.update(entries)

    for name, info in sorted(exports.items()):
        add(name, info["module"], info["exported_from"])
    # Every public class and function of the Flax scheduler modules (states, outputs, helpers).
    for module in (m for m in modules if m.startswith("diffusers.schedulers.")):
        for name in modules[module]:
            if not name.startswith("_") and name not in api:
                add(name, module, [])
    # Output dataclasses beside the exported classes, and the classes their fields name (e.g. the VAE's
    # FlaxDiagonalGaussianDistribution), until nothing new turns up.
    pending = [n for n, e in api.items() if e["kind"] == "class"]
    while pending:
        module = api[pending.pop()]["module"]
        for name, node in modules[module].items():
            if name.startswith("Flax") and name.endswith("Output") and name not in api:
                add(name, module, [])
                pending.append(name)
    for key, entry in list(api.items()):
        if entry["kind"] == "field":
            for word in re.findall(r"\w+", entry["annotation"]):
                found = resolve(word)
                if word not in api and found and found[1] not in BASE_MODULES:
                    add(word, found[1], [])
    return api


def example_code(docstring: str) -> str:
    """The code of a doctest-style ```py block: prompts stripped; unprompted comment and blank lines kept."""
    block = docstring.split("```py", 1)[1].split("```", 1)[0]
    lines = []
    for line in block.splitlines():
        stripped = line.strip()
        if stripped.startswith(">>>") or stripped.startswith("..."):
            lines.append(stripped[4:] if len(stripped) > 3 else "")
        elif stripped.startswith("#") or not stripped:
            lines.append(stripped)
    return "\n".join(lines).strip() + "\n"


def examples(wheel: Wheel) -> dict[str, str]:
    out = {}
    for module in wheel.flax_modules():
        if ".pipelines." not in module:
            continue
        for node in wheel.tree(module).body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "EXAMPLE_DOC_STRING" for t in node.targets):
                out[module.rsplit(".", 1)[1]] = example_code(ast.literal_eval(node.value))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheel", type=Path, help=f"diffusers-{VERSION}-py3-none-any.whl (default: pip download it)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        wheel_path = args.wheel
        if wheel_path is None:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", f"diffusers=={VERSION}",
                            "-d", tmp], check=True)
            wheel_path = next(Path(tmp).glob("diffusers-*.whl"))
        wheel = Wheel(wheel_path)
        source = {"package": "diffusers", "version": VERSION, "wheel": wheel_path.name,
                  "sha256": hashlib.sha256(wheel_path.read_bytes()).hexdigest(),
                  "generated_by": "tools/diffusers_flax_reference.py"}
        found_examples = examples(wheel)
        api = build_api(wheel, found_examples)
    API_JSON.parent.mkdir(parents=True, exist_ok=True)
    API_JSON.write_text(json.dumps({"source": source, "api": api}, indent=1) + "\n")
    EXAMPLES_DIR.mkdir(parents=True, exist_ok=True)
    for name, code in found_examples.items():
        header = f"# EXAMPLE_DOC_STRING of diffusers/{name} (diffusers {VERSION}), extracted by {source['generated_by']}\n"
        (EXAMPLES_DIR / f"{name}.py").write_text(header + code)
    print(f"{len(api)} API entries -> {API_JSON.relative_to(ROOT)}; examples: {sorted(found_examples)}")


if __name__ == "__main__":
    main()
