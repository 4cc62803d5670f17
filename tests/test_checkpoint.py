"""The generic checkpoint machinery: file discovery, safe reading, checked conversion, msgpack cache."""
import json

import flax
import flax.linen as nn
import huggingface_hub
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.models.resnet import ResnetBlock2D as TorchResnet
from safetensors.torch import save_file

from flax_inpaint.io import CheckpointError
from flax_inpaint.models import conversion, modeling
from flax_inpaint.models.modeling import PretrainedMixin
from flax_inpaint.models.layers import ResnetBlock2D
from flax_inpaint.runtime import Runtime
from flax_inpaint.sweep import COMPILE_EVENT


class TinyNet(nn.Module, PretrainedMixin):
    """A one-block model named like a diffusers module, to exercise the loader alone."""

    in_channels: int = 4
    out_channels: int = 8
    runtime: Runtime = Runtime()

    torch_class = "TinyNet"
    ignored_config_keys = frozenset({"harmless"})
    fixed_config = {"mode": ("plain",)}

    def dummy_inputs(self):
        return jnp.zeros((1, 8, 8, self.in_channels)), jnp.zeros((1, 16))

    @nn.compact
    def __call__(self, x, temb):
        return ResnetBlock2D(self.out_channels, self.runtime, groups=4, name="block")(x, temb)


def torch_twin():
    torch.manual_seed(0)
    return TorchResnet(in_channels=4, out_channels=8, temb_channels=16, groups=4, eps=1e-6).eval()


def state(model):
    return {f"block.{k}": v.contiguous() for k, v in model.state_dict().items()}


def write_folder(path, tensors, name="diffusion_pytorch_model.safetensors", config=None):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config or {"in_channels": 4, "out_channels": 8}))
    save_file(tensors, str(path / name))
    return path


def reference_output(model, x, temb):
    with torch.no_grad():
        out = model(torch.tensor(x).permute(0, 3, 1, 2), torch.tensor(temb))
    return out.permute(0, 2, 3, 1).numpy()


@pytest.fixture
def inputs():
    rng = np.random.default_rng(0)
    return rng.standard_normal((2, 8, 8, 4), np.float32), rng.standard_normal((2, 16), np.float32)


def test_load_matches_torch_and_round_trips(tmp_path, inputs):
    tm = torch_twin()
    folder = write_folder(tmp_path / "m", state(tm))
    model, params = TinyNet.from_pretrained(folder)
    out = model.apply({"params": params}, *inputs)
    np.testing.assert_allclose(out, reference_output(tm, *inputs), atol=1e-5)

    back = conversion.to_torch_state_dict(params)
    ref = {k: v.numpy() for k, v in state(tm).items()}
    assert set(back) == set(ref)
    for k in ref:
        np.testing.assert_array_equal(back[k], ref[k])


def test_sharded_and_variant_files(tmp_path, inputs):
    tm = torch_twin()
    sd = state(tm)
    keys = sorted(sd)
    half = len(keys) // 2
    folder = tmp_path / "sharded"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({}))
    shards = {"a-00001-of-00002.safetensors": keys[:half], "a-00002-of-00002.safetensors": keys[half:]}
    for name, ks in shards.items():
        save_file({k: sd[k] for k in ks}, str(folder / name))
    index = {"weight_map": {k: n for n, ks in shards.items() for k in ks}}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    model, params = TinyNet.from_pretrained(folder)
    np.testing.assert_allclose(
        model.apply({"params": params}, *inputs), reference_output(tm, *inputs), atol=1e-5
    )

    fp16 = write_folder(
        tmp_path / "fp16",
        {k: v.half() for k, v in sd.items()},
        name="diffusion_pytorch_model.fp16.safetensors",
    )
    with pytest.raises(CheckpointError, match="variant"):
        TinyNet.from_pretrained(fp16)
    model, params = TinyNet.from_pretrained(fp16, variant="fp16")
    assert jax.tree_util.tree_leaves(params)[0].dtype == jnp.float32
    np.testing.assert_allclose(
        model.apply({"params": params}, *inputs), reference_output(tm, *inputs), atol=2e-2
    )


def test_bfloat16_safetensors_and_param_dtype(tmp_path, inputs):
    sd = {k: v.to(torch.bfloat16) for k, v in state(torch_twin()).items()}
    folder = write_folder(tmp_path / "bf16", sd)
    _, params = TinyNet.from_pretrained(folder, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
    leaf = params["block"]["conv1"]["kernel"]
    assert leaf.dtype == jnp.bfloat16
    ref = sd["block.conv1.weight"].float().numpy().transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(np.asarray(leaf, np.float32), ref)


def test_pickled_bin_loads_with_weights_only(tmp_path, inputs):
    tm = torch_twin()
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    torch.save(state(tm), folder / "diffusion_pytorch_model.bin")
    model, params = TinyNet.from_pretrained(folder)
    np.testing.assert_allclose(
        model.apply({"params": params}, *inputs), reference_output(tm, *inputs), atol=1e-5
    )

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, folder / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        TinyNet.from_pretrained(folder, use_cache=False)


def test_second_load_uses_msgpack_cache(tmp_path, monkeypatch):
    folder = write_folder(tmp_path / "m", state(torch_twin()))
    _, first = TinyNet.from_pretrained(folder)
    calls = []
    monkeypatch.setattr(modeling, "read_state_dict", lambda files: calls.append(files))
    _, second = TinyNet.from_pretrained(folder)
    assert calls == []
    jax.tree_util.tree_map(np.testing.assert_array_equal, first, second)


TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"


def test_init_and_param_shapes_trace_and_compile_once_per_model():
    """Every conversion, load and check asks for param_shapes: an equal model (same config and runtime)
    reuses the init that param_shapes traced, compiled once; another param_dtype is another model."""
    seen = []

    def listener(event, duration, fun_name="", **_):
        if "init_params" in fun_name and event in (TRACE_EVENT, COMPILE_EVENT):
            seen.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        shapes = TinyNet(out_channels=12).param_shapes()
        first = TinyNet(out_channels=12).init_weights(jax.random.key(1))
        again = TinyNet(out_channels=12).init_weights(jax.random.key(1))
        assert TinyNet(out_channels=12).param_shapes() == shapes
        assert seen == [TRACE_EVENT, COMPILE_EVENT]
        bf16 = TinyNet(out_channels=12, runtime=Runtime(param_dtype=jnp.bfloat16)).param_shapes()
        assert seen[2:] == [TRACE_EVENT]
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert {s.dtype for s in bf16.values()} == {jnp.dtype(jnp.bfloat16)} and bf16.keys() == shapes.keys()
    traced = jax.eval_shape(TinyNet(out_channels=12).init_weights, jax.random.key(1))  # inside another trace
    for tree in (first, traced):
        flat = flax.traverse_util.flatten_dict(tree)
        assert {k: (v.shape, v.dtype) for k, v in flat.items()} == {k: (s.shape, s.dtype) for k, s in shapes.items()}
    jax.tree_util.tree_map(np.testing.assert_array_equal, first, again)


def test_weight_format_precedence(tmp_path):
    """A folder loads its Flax msgpack (as diffusers' Flax from_pretrained does), else its safetensors,
    else its pickled .bin; from_pt=True skips the msgpack. Each file holds different weights here, and
    removing the preferred file falls through to the next."""
    folder = write_folder(tmp_path / "m", state(torch_twin()))
    model, first = TinyNet.from_pretrained(folder, use_cache=False)
    second = jax.tree_util.tree_map(lambda x: x + 1, first)
    (folder / "diffusion_flax_model.msgpack").write_bytes(flax.serialization.msgpack_serialize(second))
    (folder / "flax_model.msgpack").write_bytes(b"transformers' name: second choice of a diffusers model")
    torch.save({k: v + 2 for k, v in state(torch_twin()).items()}, folder / "diffusion_pytorch_model.bin")
    third = jax.tree_util.tree_map(lambda x: x + 2, first)
    _, got = TinyNet.from_pretrained(folder, use_cache=False, from_pt=True)
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, first)
    for expected, then_remove in (
        (second, "diffusion_flax_model.msgpack"), (None, "flax_model.msgpack"),
        (first, "diffusion_pytorch_model.safetensors"), (third, None),
    ):
        if expected is None:
            with pytest.raises(CheckpointError, match="flax_model.msgpack: corrupt msgpack"):
                TinyNet.from_pretrained(folder, use_cache=False)
        else:
            _, got = TinyNet.from_pretrained(folder, use_cache=False)
            jax.tree_util.tree_map(np.testing.assert_array_equal, got, expected)
        if then_remove:
            (folder / then_remove).unlink()


def test_save_pretrained_leaves_one_set_of_weights(tmp_path):
    """A later save into the same folder removes the weight files it does not rewrite: the safetensors
    of an earlier `pytorch_format=True` save would otherwise be loaded instead of the new msgpack."""
    model, params = TinyNet.from_pretrained(write_folder(tmp_path / "m", state(torch_twin())))
    saved = tmp_path / "saved"
    model.save_pretrained(saved, params, pytorch_format=True)
    assert sorted(p.name for p in saved.iterdir()) == [
        "config.json", "diffusion_flax_model.msgpack", "diffusion_pytorch_model.safetensors",
    ]
    _, again = TinyNet.from_pretrained(saved)
    jax.tree_util.tree_map(np.testing.assert_array_equal, again, params)
    tuned = jax.tree_util.tree_map(lambda x: x * 2, params)
    model.save_pretrained(saved, tuned)
    assert sorted(p.name for p in saved.iterdir()) == ["config.json", "diffusion_flax_model.msgpack"]
    _, again = TinyNet.from_pretrained(saved)
    jax.tree_util.tree_map(np.testing.assert_array_equal, again, tuned)


@pytest.mark.parametrize("damage", ["truncate", "header", "empty"])
def test_corrupt_safetensors_raise(tmp_path, damage):
    folder = write_folder(tmp_path / "m", state(torch_twin()))
    f = folder / "diffusion_pytorch_model.safetensors"
    raw = f.read_bytes()
    f.write_bytes({"truncate": raw[: len(raw) // 2], "header": raw[:8] + b"{not json" + raw[17:],
                   "empty": b""}[damage])
    with pytest.raises(CheckpointError, match="corrupt or truncated|too short"):
        TinyNet.from_pretrained(folder)


def test_mismatched_checkpoint_lists_every_problem(tmp_path):
    sd = state(torch_twin())
    sd["block.conv2.weight"] = torch.zeros(8, 8, 1, 1)
    sd["block.extra.weight"] = torch.zeros(3)
    del sd["block.norm1.bias"]
    with pytest.raises(CheckpointError) as err:
        TinyNet.from_pretrained(write_folder(tmp_path / "m", sd))
    msg = str(err.value)
    assert "block.conv2.weight [8, 8, 1, 1]" in msg and "expects [3, 3, 8, 8]" in msg
    assert "block.extra.weight" in msg
    assert "block/norm1/bias" in msg


def test_config_validation(tmp_path):
    assert TinyNet.from_config({"in_channels": 4, "harmless": 1, "mode": "plain"}).in_channels == 4
    with pytest.raises(ValueError, match="mode='fancy'"):
        TinyNet.from_config({"mode": "fancy"})
    with pytest.warns(UserWarning, match="surprise"):
        TinyNet.from_config({"surprise": 3})


def test_missing_folder_and_weights(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        TinyNet.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        TinyNet.from_pretrained(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="No weights"):
        TinyNet.from_pretrained(tmp_path / "empty")


def test_hub_id_respects_local_files_only():
    with pytest.raises(CheckpointError, match="local_files_only=True"):
        TinyNet.from_pretrained("nobody/not-a-model", local_files_only=True)


def test_hub_id_loads_the_snapshot_folder(tmp_path, monkeypatch, inputs):
    """An org/name id goes to huggingface_hub.snapshot_download with its revision and local_files_only;
    the returned snapshot (with the model in a subfolder) loads and matches the torch model."""
    tm = torch_twin()
    snapshot = tmp_path / "snapshot"
    write_folder(snapshot / "tiny", state(tm))
    calls = []

    def snapshot_download(repo_id, revision=None, local_files_only=False, **kwargs):
        calls.append((repo_id, revision, local_files_only))
        return str(snapshot)

    monkeypatch.chdir(tmp_path)  # no local folder named org/tiny-net
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    for local_files_only in (True, False):
        model, params = TinyNet.from_pretrained("org/tiny-net", subfolder="tiny", revision="v1",
                                                local_files_only=local_files_only)
        np.testing.assert_allclose(model.apply({"params": params}, *inputs), reference_output(tm, *inputs), atol=1e-5)
    assert calls == [("org/tiny-net", "v1", True), ("org/tiny-net", "v1", False)]
    with pytest.raises(CheckpointError, match=r"'org/tiny-net' \(.*snapshot\) has no subfolder 'unet'"):
        TinyNet.from_pretrained("org/tiny-net", subfolder="unet")


@pytest.mark.parametrize("name", ["nosuchmodel", "./no/such/model", "a/b/c"])
def test_name_that_is_neither_a_folder_nor_a_repo_id(tmp_path, monkeypatch, name):
    """Not a folder and not of the org/name form (a single word, a ./ path, several slashes): the error
    names both readings and the hub is never asked."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("asked the hub"))
    with pytest.raises(CheckpointError) as err:
        TinyNet.from_pretrained(name)
    assert str(err.value) == (f"{name!r} does not exist as a local folder ({tmp_path / name}), and it is not a hub "
                              "repo id either (those have the form 'org/name').")
