"""FlaxCLIPTextModel against transformers' PyTorch CLIPTextModel (tiny random models, CPU, fp32)."""
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModel, CLIPTextConfig, CLIPTextModel

from flax_inpaint.models import FlaxCLIPTextModel, FlaxCLIPTextModelOutput
from flax_inpaint.io import CheckpointError

VOCAB = 100
TOL = 1e-4

# name -> (CLIPTextConfig overrides, end-of-text id used in input_ids)
CASES = {
    # SD1-like: OpenAI ViT-L/14 text tower, legacy eos_token_id=2 -> pooling at argmax(input_ids).
    "sd1_legacy_eos": (dict(hidden_act="quick_gelu", eos_token_id=2, max_position_embeddings=77,
                            num_hidden_layers=2), VOCAB - 1),
    # SD2-like: OpenCLIP ViT-H text tower (gelu), eos_token_id in the vocabulary -> first eos position.
    "sd2_gelu_eos": (dict(hidden_act="gelu", eos_token_id=VOCAB - 2, max_position_embeddings=16,
                          num_hidden_layers=3), VOCAB - 2),
    "quick_gelu_eos": (dict(hidden_act="quick_gelu", eos_token_id=VOCAB - 2, max_position_embeddings=16,
                            num_hidden_layers=2), VOCAB - 2),
}


def make_torch(overrides, seed=0):
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_attention_heads=4,
        bos_token_id=0, pad_token_id=1, **overrides,
    )
    return CLIPTextModel(config).eval()


def make_ids(eos, lengths=(6, 10), width=10, seed=0, left_pad=False):
    """Tokenizer-like rows: bos, words, eos, with eos padding (what SD tokenizers do).

    The first word is the largest id other than eos, so pooling at argmax(input_ids) and pooling at
    the first eos differ whenever eos is not the largest id.
    """
    rng = np.random.RandomState(seed)
    words = np.setdiff1d(np.arange(3, VOCAB), [eos])
    ids = np.full((len(lengths), width), eos, np.int64)
    mask = np.zeros((len(lengths), width), np.int64)
    for row, n in enumerate(lengths):
        start = width - n if left_pad else 0
        ids[row, start] = 0
        ids[row, start + 1 : start + n - 1] = rng.choice(words, n - 2)
        ids[row, start + 1] = words.max()
        ids[row, start + n - 1] = eos
        mask[row, start : start + n] = 1
    return ids, mask


def torch_run(model, ids, mask=None):
    with torch.no_grad():
        return model(
            torch.tensor(ids),
            attention_mask=None if mask is None else torch.tensor(mask),
            output_hidden_states=True,
        )


def assert_close(ours, ref, tol=TOL, where=None):
    ours, ref = np.asarray(ours, np.float32), ref.numpy()
    if where is not None:
        ours, ref = ours[where], ref[where]
    np.testing.assert_allclose(ours, ref, atol=tol, rtol=0)


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    overrides, eos = CASES[request.param]
    model = make_torch(overrides)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)  # model.safetensors + a transformers 5 config.json
    return model, folder, eos


def test_parity_with_transformers(case):
    torch_model, folder, eos = case
    te, params = FlaxCLIPTextModel.from_pretrained(folder)
    ids, _ = make_ids(eos)
    ref = torch_run(torch_model, ids)
    out = te.apply({"params": params}, jnp.asarray(ids), output_hidden_states=True)
    assert isinstance(out, FlaxCLIPTextModelOutput)
    assert_close(out.last_hidden_state, ref.last_hidden_state)
    assert_close(out.pooler_output, ref.pooler_output)
    assert len(out.hidden_states) == len(ref.hidden_states) == te.num_hidden_layers + 1
    for ours, theirs in zip(out.hidden_states, ref.hidden_states):
        assert_close(ours, theirs)

    # Without hidden states, and as a tuple.
    plain = te.apply({"params": params}, jnp.asarray(ids))
    assert plain.hidden_states is None
    last, pooled = te.apply({"params": params}, jnp.asarray(ids), return_dict=False)
    np.testing.assert_array_equal(last, out.last_hidden_state)
    np.testing.assert_array_equal(pooled, out.pooler_output)


def test_padding_attention_mask(case):
    torch_model, folder, eos = case
    te, params = FlaxCLIPTextModel.from_pretrained(folder)
    ids, mask = make_ids(eos)
    ref = torch_run(torch_model, ids, mask)
    out = te.apply(
        {"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask), output_hidden_states=True
    )
    assert_close(out.last_hidden_state, ref.last_hidden_state)
    assert_close(out.pooler_output, ref.pooler_output)
    for ours, theirs in zip(out.hidden_states, ref.hidden_states):
        assert_close(ours, theirs)


def test_left_padding_matches_at_real_tokens(case):
    """Left padding: padded positions can attend to nothing, so only real tokens are defined."""
    torch_model, folder, eos = case
    te, params = FlaxCLIPTextModel.from_pretrained(folder)
    ids, mask = make_ids(eos, left_pad=True)
    ref = torch_run(torch_model, ids, mask)
    out = te.apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    real = mask.astype(bool)
    assert_close(out.last_hidden_state, ref.last_hidden_state, where=real)


def test_clip_skip_through_final_layer_norm(case):
    torch_model, folder, eos = case
    te, params = FlaxCLIPTextModel.from_pretrained(folder)
    ids, _ = make_ids(eos)
    ref = torch_run(torch_model, ids)
    out = te.apply({"params": params}, jnp.asarray(ids), output_hidden_states=True)
    variables = {"params": params}
    top = te.apply(variables, out.hidden_states[-1], method=te.final_layer_norm)
    np.testing.assert_allclose(top, out.last_hidden_state, atol=1e-6)
    skip1 = te.apply(variables, out.hidden_states[-2], method=te.final_layer_norm)
    with torch.no_grad():
        ref_skip1 = torch_model.final_layer_norm(ref.hidden_states[-2])
    assert_close(skip1, ref_skip1)


def test_bf16_is_finite_and_close(case):
    _, folder, eos = case
    ids, _ = make_ids(eos)
    te, params = FlaxCLIPTextModel.from_pretrained(folder)
    te16, params16 = FlaxCLIPTextModel.from_pretrained(folder, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree_util.tree_leaves(params16))
    ref = te.apply({"params": params}, jnp.asarray(ids))
    out = jax.jit(lambda p, x: te16.apply({"params": p}, x))(params16, jnp.asarray(ids))
    assert out.last_hidden_state.dtype == jnp.bfloat16
    for ours, theirs in ((out.last_hidden_state, ref.last_hidden_state), (out.pooler_output, ref.pooler_output)):
        ours = np.asarray(ours, np.float32)
        assert np.isfinite(ours).all()
        # Outputs are layer-normed (|x| ~ 1-3); bf16 keeps ~3 significant digits through 2-3 layers.
        np.testing.assert_allclose(ours, theirs, atol=0.1, rtol=0)


def test_jit_matches_eager_and_does_not_retrace():
    torch_model = make_torch(CASES["sd2_gelu_eos"][0])
    te = FlaxCLIPTextModel.from_config(torch_model.config.to_dict())
    params = te.convert_torch_state_dict({k: v.numpy() for k, v in torch_model.state_dict().items()})
    ids, mask = make_ids(VOCAB - 2)
    traces = []

    @jax.jit
    def encode(p, x, m):
        traces.append(1)
        return te.apply({"params": p}, x, attention_mask=m, output_hidden_states=True)

    eager = te.apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask), output_hidden_states=True)
    for _ in range(2):
        jitted = encode(params, jnp.asarray(ids), jnp.asarray(mask))
    assert len(traces) == 1
    for a, b in zip(jax.tree_util.tree_leaves(jitted), jax.tree_util.tree_leaves(eager)):
        np.testing.assert_allclose(a, b, atol=1e-5)


# ----------------------------------------------------------------------------- saving / loading

def test_msgpack_round_trip(case, tmp_path):
    _, folder, eos = case
    te, params = FlaxCLIPTextModel.from_pretrained(folder)
    te.save_pretrained(tmp_path, params)
    te2, params2 = FlaxCLIPTextModel.from_pretrained(tmp_path)
    assert te2.config == te.config
    jax.tree_util.tree_map(np.testing.assert_array_equal, params2, params)
    ids, _ = make_ids(eos)
    np.testing.assert_array_equal(
        te2.apply({"params": params2}, jnp.asarray(ids)).pooler_output,
        te.apply({"params": params}, jnp.asarray(ids)).pooler_output,
    )


def test_pytorch_format_loads_into_transformers(case, tmp_path):
    torch_model, folder, eos = case
    te, params = FlaxCLIPTextModel.from_pretrained(folder)
    te.save_pretrained(tmp_path, params, pytorch_format=True)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "clip_text_model"
    assert config["architectures"] == ["CLIPTextModel"]
    ids, mask = make_ids(eos)
    ref = torch_run(torch_model, ids, mask)
    for cls in (CLIPTextModel, AutoModel):
        reloaded = cls.from_pretrained(tmp_path).eval()
        assert type(reloaded) is CLIPTextModel
        assert reloaded.config.eos_token_id == torch_model.config.eos_token_id
        got = torch_run(reloaded, ids, mask)
        assert_close(got.last_hidden_state.numpy(), ref.last_hidden_state)
        assert_close(got.pooler_output.numpy(), ref.pooler_output)


def test_pytorch_model_bin_with_legacy_prefix_and_position_ids(tmp_path):
    """A transformers-4 style `pytorch_model.bin`: `text_model.` keys plus the position_ids buffer."""
    overrides, eos = CASES["sd1_legacy_eos"]
    torch_model = make_torch(overrides, seed=1)
    state = {f"text_model.{k}": v for k, v in torch_model.state_dict().items()}
    state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(torch_model.config.to_json_string())
    te, params = FlaxCLIPTextModel.from_pretrained(tmp_path)
    ids, _ = make_ids(eos)
    ref = torch_run(torch_model, ids)
    out = te.apply({"params": params}, jnp.asarray(ids))
    assert_close(out.last_hidden_state, ref.last_hidden_state)
    assert_close(out.pooler_output, ref.pooler_output)


def test_pipeline_subfolder(tmp_path):
    torch_model = make_torch(CASES["sd2_gelu_eos"][0])
    torch_model.save_pretrained(tmp_path / "text_encoder")
    te, params = FlaxCLIPTextModel.from_pretrained(tmp_path, subfolder="text_encoder")
    assert te.hidden_act == "gelu" and te.num_hidden_layers == 3


# ----------------------------------------------------------------------------- config handling

def test_every_transformers_config_key_is_classified(case):
    """Neither a transformers 5 config.json nor a full to_dict() (older releases wrote every
    generic attribute) produces an 'unknown config keys' warning."""
    torch_model, folder, _ = case
    legacy = {**torch_model.config.to_dict(), "dropout": 0.0, "torch_dtype": "float32",
              "bad_words_ids": None, "top_k": 50, "tie_word_embeddings": True, "use_bfloat16": False}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        te, _ = FlaxCLIPTextModel.from_pretrained(folder)
        FlaxCLIPTextModel.from_config(legacy)
    expected = json.loads((folder / "config.json").read_text())
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "max_position_embeddings", "hidden_act", "layer_norm_eps",
                "pad_token_id", "bos_token_id", "eos_token_id", "projection_dim"):
        assert getattr(te, key) == expected[key], key


def test_bad_configs_and_inputs_raise(case, tmp_path):
    torch_model, folder, eos = case
    config = torch_model.config.to_dict()
    with pytest.raises(ValueError, match="model_type='clip'"):
        FlaxCLIPTextModel.from_config({**config, "model_type": "clip"})
    with pytest.raises(ValueError, match="Unsupported activation 'swiglu'"):
        FlaxCLIPTextModel.from_config({**config, "hidden_act": "swiglu"})
    with pytest.raises(ValueError, match="not a multiple of num_attention_heads=5"):
        FlaxCLIPTextModel.from_config({**config, "num_attention_heads": 5})
    with pytest.raises(ValueError, match="single integer"):
        FlaxCLIPTextModel.from_config({**config, "eos_token_id": [2, 3]})

    te, params = FlaxCLIPTextModel.from_pretrained(folder)
    too_long = jnp.zeros((1, te.max_position_embeddings + 1), jnp.int32)
    with pytest.raises(ValueError, match="at most max_position_embeddings"):
        te.apply({"params": params}, too_long)
    ids, mask = make_ids(eos)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        te.apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask[:, :5]))
    with pytest.raises(ValueError, match=r"must be \[batch, length\]"):
        te.apply({"params": params}, jnp.asarray(ids[0]))

    # Weights that do not fit the config: one error naming the problem.
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 4}))
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="missing from the checkpoint"):
        FlaxCLIPTextModel.from_pretrained(tmp_path)
