"""diffusers 0.39's Flax public API, entry by entry, exists here with the same keywords and defaults.

tests/data/diffusers_flax_api.json is generated from the diffusers 0.39.0 wheel by
tools/diffusers_flax_reference.py (classes, methods with their keywords and defaults, dataclass fields,
class attributes, enum members). Each entry must be found where a diffusers user imports it (diffusers'
top-level names at `flax_inpaint`, `diffusers.<package>` names at `flax_inpaint.<package>`) and:
  * a method accepts every keyword diffusers' does, by the same name, at the same position when
    diffusers takes it positionally, with an equal default, and requires nothing diffusers does not;
  * a field, property or attribute exists (fields with diffusers' default where ours has one too).
The exceptions are NOT_PROVIDED below: each says why, and accessing the entry raises an error that
names what to use instead (the test checks the message). Nothing else may be missing.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import importlib
import inspect
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

API_FILE = Path(__file__).parent / "data" / "diffusers_flax_api.json"
API = json.loads(API_FILE.read_text())["api"]

# Entry pattern (fnmatch over "Class", "Class.member" or "Class.method(keyword)") -> (why, what the error
# message names instead). A class's entry covers its members; a keyword's entry needs the method to take
# **kwargs, so that passing it reaches the method's own error (test_push_to_hub_options_raise).
PUSH = ("hub uploads are not done here", "upload_folder")
NOT_PROVIDED: dict[str, tuple[str, str]] = {
    "FlaxStableDiffusionXLPipeline": ("SDXL is not implemented", "StableDiffusionXLPipeline"),
    "FlaxImagePipelineOutput": ("no unconditional image pipelines here", "FlaxStableDiffusionPipelineOutput"),
    "*.push_to_hub": PUSH,
    "*.save_pretrained(commit_message)": PUSH, "*.save_pretrained(private)": PUSH,
    "*.save_pretrained(create_pr)": PUSH, "*.save_pretrained(token)": PUSH, "*.save_pretrained(repo_id)": PUSH,
    "*.save_config(commit_message)": PUSH, "*.save_config(private)": PUSH, "*.save_config(create_pr)": PUSH,
    "*.save_config(token)": PUSH, "*.save_config(repo_id)": PUSH, "*.save_config(subfolder)": PUSH,
    # diffusers' config machinery, internal to its registration of __init__ arguments.
    "*.register_to_config": ("configs are fixed at construction", "from_config"),
    "*.register_for_auto_class": ("no Auto classes here", "import the class itself"),
    "*.extract_init_dict": ("config parsing is internal", "from_config"),
    "*.get_config_dict": ("deprecated in diffusers too", "load_config"),
    # hub-client download options we do not pass on.
    "*.load_config(local_dir)": ("download options", "snapshot_download"),
    "*.load_config(local_dir_use_symlinks)": ("download options", "snapshot_download"),
    "*.load_config(mirror)": ("download options", "snapshot_download"),
    "*.load_config(user_agent)": ("download options", "snapshot_download"),
    "*.load_config(dduf_entries)": ("DDUF single-file archives are not read", "snapshot_download"),
    # Pipelines: components are fixed at construction (they decide the compiled program).
    "*Pipeline.register_modules": ("components are fixed at construction", "from_pipe"),
    "*Pipeline.from_config": ("a pipeline is built from a folder", "from_pretrained"),
}


def not_provided(entry_id: str):
    return next((v for k, v in NOT_PROVIDED.items() if fnmatch.fnmatchcase(entry_id, k)), None)


def home_modules(name: str) -> list[str]:
    """Where a diffusers user's import of `name` goes here."""
    entry = API[name]
    if "diffusers" in entry.get("exported_from", ()) or entry["module"].startswith("diffusers.utils"):
        return ["flax_inpaint"]
    package = entry["module"].split(".")[1]
    return [f"flax_inpaint.{package}", "flax_inpaint"]


def find(name: str):
    """Our object for a class or function entry (None if absent), and the modules searched."""
    homes = home_modules(name)
    for module in homes:
        obj = getattr(importlib.import_module(module), name, None)
        if obj is not None:
            return obj, homes
    return None, homes


def default_value(source: str):
    return eval(source, {"jnp": jnp, "jax": jax, "np": np, "os": os})  # noqa: S307 (the wheel's literal defaults)


def same_default(theirs: str, ours) -> bool:
    try:
        value = default_value(theirs)
    except Exception:
        return False
    if isinstance(value, (tuple, list)) and isinstance(ours, (tuple, list)):
        return tuple(value) == tuple(ours)
    return type(value) is type(ours) and value == ours or value is ours


def check_signature(entry_id: str, fn, params: list[dict]) -> list[str]:
    """Problems of `fn`'s signature against diffusers' keyword list (empty when compatible)."""
    sig = inspect.signature(fn)
    ours = [p for p in sig.parameters.values() if p.name not in ("self", "cls")]
    by_name = {p.name: p for p in ours}
    positional = [p.name for p in ours if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    problems = []
    theirs_positional = [p["name"] for p in params if p["kind"] in ("POSITIONAL_ONLY", "POSITIONAL_OR_KEYWORD")]
    takes_kwargs = any(q.kind == q.VAR_KEYWORD for q in ours)
    for p in params:
        if p["kind"] in ("VAR_POSITIONAL", "VAR_KEYWORD"):
            continue
        if not_provided(f"{entry_id}({p['name']})"):
            if not takes_kwargs and p["name"] not in by_name:
                problems.append(f"{p['name']!r} is not provided, but passing it fails without naming why (take **kwargs)")
            continue
        q = by_name.get(p["name"])
        if q is None or q.kind in (q.VAR_POSITIONAL, q.VAR_KEYWORD):
            problems.append(f"no keyword {p['name']!r}")
            continue
        if p["kind"] == "POSITIONAL_OR_KEYWORD" and "via" not in p:
            i = theirs_positional.index(p["name"])
            if i >= len(positional) or positional[i] != p["name"]:
                problems.append(f"{p['name']!r} is positional argument {i} in diffusers, not here ({positional})")
        elif q.kind == q.POSITIONAL_ONLY:
            problems.append(f"{p['name']!r} is positional-only here")
        if "default" in p:
            if q.default is inspect.Parameter.empty:
                problems.append(f"{p['name']!r} is required here; diffusers' default is {p['default']}")
            elif not same_default(p["default"], q.default):
                problems.append(f"{p['name']!r} defaults to {q.default!r} here, {p['default']} in diffusers")
    known = {p["name"] for p in params}
    for q in ours:
        if q.default is inspect.Parameter.empty and q.kind not in (q.VAR_POSITIONAL, q.VAR_KEYWORD) \
                and q.name not in known:
            problems.append(f"requires {q.name!r}, which diffusers does not take")
    return problems


def assert_names_alternative(entry_id: str, access, use: str):
    with pytest.raises((AttributeError, ImportError, NotImplementedError, TypeError)) as info:
        access()
    assert use in str(info.value), f"{entry_id}: the error does not name {use!r}: {info.value}"


@pytest.mark.parametrize("entry_id", sorted(API))
def test_entry(entry_id: str):
    entry = API[entry_id]
    owner_name, _, member = entry_id.partition(".")
    if member and not_provided(owner_name):
        return  # the class's own entry checks its error
    exception = not_provided(entry_id)
    if exception is not None and not member:
        for module in home_modules(owner_name):
            assert_names_alternative(entry_id, lambda: getattr(importlib.import_module(module), owner_name),
                                     exception[1])
        return
    owner, homes = find(owner_name)
    if exception is not None:
        assert owner is not None, f"{owner_name} is missing from {homes}"
        assert_names_alternative(entry_id, lambda: getattr(owner, member), exception[1])
        return
    assert owner is not None, f"{owner_name} is missing from {homes}"
    if not member:
        if entry["kind"] == "function":
            problems = check_signature(entry_id, owner, entry["params"])
            assert not problems, f"{entry_id}: " + "; ".join(problems)
        return
    kind = entry["kind"]
    if kind == "field":
        fields = {f.name: f for f in dataclasses.fields(owner)} if dataclasses.is_dataclass(owner) else {}
        static = inspect.getattr_static(owner, member, None)
        assert member in fields or static is not None, f"{entry_id}: no field or attribute {member!r} on {owner}"
        field = fields.get(member)
        if "default" in entry and field is not None and field.default is not dataclasses.MISSING:
            assert same_default(entry["default"], field.default), \
                f"{entry_id}: defaults to {field.default!r} here, {entry['default']} in diffusers"
        return
    static = inspect.getattr_static(owner, member, None)
    assert static is not None, f"{entry_id}: {owner.__name__} has no {member!r}"
    if kind in ("property", "attribute", "enum_member"):
        return
    fn = getattr(owner, member)
    assert callable(fn), f"{entry_id}: {member!r} is not callable here"
    problems = check_signature(entry_id, fn, entry["params"])
    assert not problems, f"{entry_id}: " + "; ".join(problems)


def test_not_provided_patterns_are_used():
    """Every exception in NOT_PROVIDED matches some entry or keyword (no stale excuses)."""
    ids = set(API) | {f"{k}({p['name']})" for k, e in API.items() for p in e.get("params", ())}
    unused = [pattern for pattern in NOT_PROVIDED if not fnmatch.filter(ids, pattern)]
    assert not unused, f"NOT_PROVIDED patterns that match nothing: {unused}"
