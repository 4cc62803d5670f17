"""Textual-inversion embeddings: new tokens for the tokenizer, new rows for the text encoder's embedding table.

Formats: diffusers' `learned_embeds.safetensors` / `.bin` ({token: [dim] or [n, dim]}); A1111's `.pt`
({"string_to_param": {"*": [n, dim]}, "name": token, ...}) and `.safetensors` ({"emb_params": [n, dim]});
a bare tensor (then `token=` names it). An embedding of n vectors becomes the tokens `token`, `token_1`, ...,
`token_{n-1}`, and prompts are rewritten so that `token` stands for all of them (`expand_prompt`, diffusers'
`maybe_convert_prompt`). Ids and rows follow diffusers: the table grows to len(tokenizer) + new tokens and
each token's row is its embedding.

SDXL embeddings hold `clip_l` (for text_encoder, CLIP ViT-L) and `clip_g` (for text_encoder_2, OpenCLIP
bigG) vectors. As in diffusers, each part loads into its encoder and tokenizer
(`load_textual_inversion(params, state["clip_g"], token=..., text_encoder=pipe.text_encoder_2,
tokenizer=pipe.tokenizer_2)`); given the whole file, a pipeline with `text_encoder_2` loads both parts at once
(the refiner: `clip_g` only), under one token (default: the file's name, as A1111 uses it).
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import flax
import jax.numpy as jnp
import numpy as np

from flax_inpaint.io import CheckpointError, named_file, read_safetensors

WEIGHT_NAMES = ("learned_embeds.safetensors", "learned_embeds.bin")
Source = Union[str, os.PathLike, Mapping[str, Any], np.ndarray]
EMBEDDING_PATH = ("text_model", "embeddings", "token_embedding", "embedding")
SDXL_PARTS = ("clip_l", "clip_g")
# (text encoder, tokenizer, part of an SDXL embedding) of the pipelines' attributes
ENCODERS = (("text_encoder", "tokenizer", "clip_l"), ("text_encoder_2", "tokenizer_2", "clip_g"))


def read_source(source: Source, weight_name: Optional[str] = None) -> Tuple[str, Any]:
    """(name for messages, contents) of one textual-inversion file, folder, state dict or tensor."""
    if isinstance(source, (str, os.PathLike)):
        path = named_file(source, [weight_name] if weight_name else WEIGHT_NAMES, "textual inversion",
                          "a .pt/.bin/.safetensors file, a folder holding learned_embeds.*, a state dict or an array")
        return str(path), read_safetensors(path) if path.suffix == ".safetensors" else _torch_load(path)
    return "the embedding", source


def is_sdxl_embedding(contents: Any) -> bool:
    return isinstance(contents, Mapping) and set(SDXL_PARTS) <= set(contents)


def read_embedding(source: Source, token: Optional[str] = None, weight_name: Optional[str] = None,
                   part: Optional[str] = None) -> Tuple[str, np.ndarray]:
    """(token, embedding [n, dim]) of one textual-inversion file, folder, state dict or tensor; `part`
    ("clip_l" / "clip_g") picks one encoder's vectors of an SDXL embedding."""
    name, source = read_source(source, weight_name)
    if is_sdxl_embedding(source):
        if part is None:
            raise CheckpointError(f"{name} is an SDXL embedding (clip_l and clip_g vectors); load it into a pipeline "
                                  "with text_encoder_2, or load its 'clip_l' / 'clip_g' tensor with text_encoder= and "
                                  "tokenizer= (as diffusers does).")
        if token is None and name == "the embedding":
            raise ValueError("an SDXL embedding given as a state dict has no name; pass token= the word for it.")
        return token or Path(name).stem, _rows(source[part])
    if hasattr(source, "shape"):
        if token is None:
            raise ValueError(f"{name} is a bare tensor; pass token= the word that stands for it.")
        return token, _rows(source)
    if "string_to_param" in source:  # A1111
        return token or str(source["name"]), _rows(source["string_to_param"]["*"])
    if len(source) != 1:
        raise CheckpointError(f"{name} has keys {sorted(source)[:5]}; expected one token -> embedding (diffusers), "
                              "'string_to_param' (A1111 .pt) or 'emb_params' (A1111 .safetensors).")
    (key, value), = source.items()
    return token or key, _rows(value)


def _torch_load(path: Path):
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot be read safely with torch.load(weights_only=True) ({e}). "
                              "Re-save it as .safetensors.") from e


def _rows(value) -> np.ndarray:
    if type(value).__module__.startswith("torch"):
        value = value.detach().float().cpu().numpy()
    value = np.asarray(value, np.float32)
    return value[None] if value.ndim == 1 else value


def add_embeddings(tokenizer, table: np.ndarray, embeddings: Sequence[Tuple[str, np.ndarray]]):
    """(a copy of `tokenizer` with the new tokens, the grown embedding table [len(tokenizer) + new, dim]).

    A multi-vector embedding adds `token`, `token_1`, ...; tokens already in the vocabulary, duplicates
    and width mismatches are errors."""
    vocab = tokenizer.get_vocab()
    tokens, rows = [], []
    for token, emb in embeddings:
        if emb.shape[-1] != table.shape[-1]:
            raise ValueError(f"the embedding for {token!r} has vectors of size {emb.shape[-1]}, but this text encoder's "
                             f"are {table.shape[-1]} (an embedding for another model family?).")
        names = [token] + [f"{token}_{i}" for i in range(1, emb.shape[0])]
        taken = [t for t in names if t in vocab or t in tokens]
        if taken:
            raise ValueError(f"tokens {taken} are already in the tokenizer's vocabulary; choose another token= or "
                             "load into a pipeline without them.")
        tokens += names
        rows += list(emb)
    tokenizer = copy.deepcopy(tokenizer)
    start = len(tokenizer)
    grown = np.zeros((start + len(tokens), table.shape[1]), table.dtype)
    grown[: min(start, table.shape[0])] = table[:start]
    for token, row in zip(tokens, rows):
        tokenizer.add_tokens(token)
        grown[tokenizer.convert_tokens_to_ids(token)] = row
    return tokenizer, grown


def expand_prompt(prompt: str, tokenizer) -> str:
    """`prompt` with every multi-vector token replaced by the tokens of all its vectors ("<cat>" ->
    "<cat> <cat>_1 <cat>_2"), as diffusers' maybe_convert_prompt does; other prompts are unchanged."""
    added = tokenizer.added_tokens_encoder
    for token in set(tokenizer.tokenize(prompt)):
        if token in added and f"{token}_1" in added:
            count = 1
            while f"{token}_{count}" in added:
                count += 1
            prompt = prompt.replace(token, " ".join([token] + [f"{token}_{i}" for i in range(1, count)]))
    return prompt


class TextualInversionLoaderMixin:
    """`load_textual_inversion` and `maybe_convert_prompt` on a pipeline."""

    def load_textual_inversion(self, params, path_or_state_dict: Union[Source, Sequence[Source]],
                               token: Union[None, str, Sequence[Optional[str]]] = None,
                               weight_name: Optional[str] = None, text_encoder=None, tokenizer=None):
        """New params whose text encoder knows the embeddings' tokens; several at once with lists.

        Like diffusers, this extends the pipeline itself: its tokenizer (a copy, so pipelines that shared
        it are unaffected) gains the tokens and its text encoder the vocabulary size, so params loaded
        before no longer fit this pipeline's text encoder; use the returned params. `text_encoder` /
        `tokenizer` (this pipeline's own, e.g. SDXL's `text_encoder_2` and `tokenizer_2` for `clip_g` vectors)
        choose which pair is extended (a text encoder alone brings its own tokenizer); by default
        `text_encoder` and `tokenizer`, or for SDXL embeddings
        (`clip_l` + `clip_g`) every pair this pipeline has.
        """
        sources = list(path_or_state_dict) if isinstance(path_or_state_dict, (list, tuple)) else [path_or_state_dict]
        tokens = list(token) if isinstance(token, (list, tuple)) else [token] * len(sources)
        if len(tokens) != len(sources):
            raise ValueError(f"{len(sources)} embeddings but {len(tokens)} tokens; give one token per embedding.")
        if text_encoder is not None or tokenizer is not None:
            encoder = self._attribute(text_encoder, 0, "text_encoder")
            pair = next(e[1] for e in ENCODERS if e[0] == encoder)
            targets = [(encoder, self._attribute(tokenizer, 1, pair), None)]
        else:
            read = [read_source(s, weight_name) for s in sources]
            sdxl = getattr(self, "text_encoder_2", None) is not None and all(is_sdxl_embedding(c) for _, c in read)
            targets = [e for e in ENCODERS if getattr(self, e[0], None) is not None] if sdxl else [
                ("text_encoder", "tokenizer", None)]
        for encoder, tok, part in targets:
            embeddings = [read_embedding(s, t, weight_name, part) for s, t in zip(sources, tokens)]
            params = self._add_embeddings(params, embeddings, encoder, tok)
        return params

    def _attribute(self, value, index: int, default: str) -> str:
        """The name of this pipeline's attribute (`text_encoder`/`text_encoder_2`, or the tokenizers) that
        `value` is (the default's when None)."""
        if value is None:
            return default
        names = [e[index] for e in ENCODERS]
        found = next((n for n in names if getattr(self, n, None) is value), None)
        if found is None:
            raise ValueError(f"{names[0]}= must be this pipeline's own {' or '.join(names)} (the one whose vocabulary "
                             f"grows); got a {type(value).__name__} that is neither.")
        return found

    def _add_embeddings(self, params, embeddings: Sequence[Tuple[str, np.ndarray]], encoder: str,
                        tokenizer: str) -> Dict[str, Any]:
        """Params with `encoder`'s table grown by the embeddings; this pipeline's `tokenizer` and `encoder`
        replaced by their extended copies."""
        te = flax.traverse_util.flatten_dict(flax.core.unfreeze(params[encoder]))
        table = np.asarray(te[EMBEDDING_PATH])
        grown_tokenizer, grown = add_embeddings(getattr(self, tokenizer), table, embeddings)
        setattr(self, tokenizer, grown_tokenizer)
        setattr(self, encoder, getattr(self, encoder).clone(vocab_size=grown.shape[0]))
        te[EMBEDDING_PATH] = jnp.asarray(grown, table.dtype)
        return {**params, encoder: flax.traverse_util.unflatten_dict(te)}

    def maybe_convert_prompt(self, prompt: Union[str, List[str]], tokenizer=None):
        """Prompts with multi-vector tokens expanded (diffusers' maybe_convert_prompt)."""
        tokenizer = tokenizer or self.tokenizer
        if isinstance(prompt, str):
            return expand_prompt(prompt, tokenizer)
        return [expand_prompt(p, tokenizer) for p in prompt]
