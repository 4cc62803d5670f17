"""`FlaxModelMixin`: diffusers' public model API (config files, dtype casts) on top of checkpoint I/O.

Every model here is a linen module with `FlaxModelMixin` as a base: `from_pretrained` / `save_pretrained`
/ `from_config` / `init_weights` come from `checkpoint.PretrainedMixin`, the rest of diffusers'
FlaxModelMixin and ConfigMixin surface from here.
"""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp

from flax_inpaint.diffusers_compat import PUSH_TO_HUB, ConfigMixin, not_provided
from flax_inpaint.models.checkpoint import Params, PretrainedMixin


class FlaxModelMixin(PretrainedMixin, ConfigMixin):
    """diffusers' FlaxModelMixin: `model, params = Model.from_pretrained(...)`, `model.init_weights(rng)`,
    `model.to_bf16(params)`, `model.save_pretrained(folder, params)`, `model.config.<key>`.

    List it before nn.Module among a model's bases (its `__getattr__` must come first)."""

    config_name = "config.json"
    push_to_hub = not_provided(PUSH_TO_HUB)

    def __getattr__(self, name: str):
        # linen's Module.__getattr__ would replace a not_provided attribute's message with its own.
        for klass in type(self).__mro__:
            if isinstance(klass.__dict__.get(name), not_provided):
                klass.__dict__[name].__get__(self, type(self))  # raises, saying what to use instead
        return super().__getattr__(name)

    @property
    def _config_class_name(self) -> str:
        return self.torch_class

    @property
    def dtype(self) -> Any:
        """The activation dtype (`runtime.dtype`; diffusers' models take it as a field)."""
        return self.runtime.dtype

    def to_bf16(self, params: Params, mask: Any = None) -> Params:
        """The floating-point leaves of `params` cast to bfloat16 (a new tree). `mask`, a tree like
        `params` with bool leaves, limits the cast to the leaves marked True."""
        return _cast_floating(params, jnp.bfloat16, mask)

    def to_fp16(self, params: Params, mask: Any = None) -> Params:
        """As `to_bf16`, to float16 (for GPUs; TPUs want bfloat16)."""
        return _cast_floating(params, jnp.float16, mask)

    def to_fp32(self, params: Params, mask: Any = None) -> Params:
        """As `to_bf16`, to float32."""
        return _cast_floating(params, jnp.float32, mask)


def _cast_floating(params: Params, dtype: Any, mask: Any) -> Params:
    def cast(leaf, selected=True):
        if selected and jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.floating):
            return jnp.asarray(leaf, dtype)
        return leaf

    if mask is None:
        return jax.tree_util.tree_map(cast, params)
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
    flat_mask = flax.traverse_util.flatten_dict(flax.core.unfreeze(mask))
    if set(flat_mask) != set(flat):
        raise ValueError("mask must have the structure of params (one bool per parameter); "
                         f"{len(set(flat) ^ set(flat_mask))} paths differ.")
    return flax.traverse_util.unflatten_dict({k: cast(v, bool(flat_mask[k])) for k, v in flat.items()})
