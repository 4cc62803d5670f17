"""Runtime settings shared by every model, and the one attention function.

A model's architecture comes from its config; *how* it runs (activation dtype, parameter dtype,
attention kernel) comes from one `Runtime` object handed to the top-level module and passed down
unchanged, so no block grows a keyword argument per setting.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Literal, Optional

import jax
import jax.numpy as jnp

AttentionImpl = Literal["auto", "xla", "cudnn"]


@dataclasses.dataclass(frozen=True)
class Runtime:
    """How a model executes.

    dtype: activation/compute dtype (bf16 halves memory and doubles matmul speed on TPU/GPU).
    param_dtype: dtype of freshly initialised parameters.
    attention: "xla" (portable), "cudnn" (fused flash kernel on NVIDIA GPUs, bf16/fp16 only) or
      "auto" (cudnn where it applies, else xla).
    remat: gradient checkpointing: the UNet's and ControlNet's down, mid and up blocks keep only their
      inputs for the backward pass and recompute their activations (`nn.remat`), trading compute for
      the memory that training a large UNet at high resolution needs. Inference is unaffected.
    """

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention: AttentionImpl = "auto"
    remat: bool = False

    def __post_init__(self):
        if self.attention not in ("auto", "xla", "cudnn"):
            raise ValueError(
                f"attention={self.attention!r} is not supported; use 'auto', 'xla' or 'cudnn'."
            )


def _cudnn_applies(q: jax.Array, mask: Optional[jax.Array]) -> bool:
    return (
        jax.default_backend() == "gpu"
        and q.dtype in (jnp.bfloat16, jnp.float16)
        and q.shape[-1] % 8 == 0
        and q.shape[-1] <= 256
        and mask is None
    )


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    runtime: Runtime,
    *,
    scale: Optional[float] = None,
    is_causal: bool = False,
    mask: Optional[jax.Array] = None,
) -> jax.Array:
    """Multi-head scaled dot-product attention on [batch, length, heads, head_dim] arrays.

    Softmax is evaluated in float32 whatever the input dtype (what diffusers calls
    `upcast_softmax`), so bf16 activations do not saturate. `mask` is boolean, broadcastable to
    [batch, heads, q_len, kv_len], True where attention is allowed.
    """
    impl = runtime.attention
    if impl == "auto":
        impl = "cudnn" if _cudnn_applies(q, mask) else "xla"
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, scale=scale, is_causal=is_causal, implementation=impl
    )
