"""Runtime settings shared by every model, the one attention function, and the one data-parallel mesh.

A model's architecture comes from its config; *how* it runs (activation dtype, parameter dtype,
attention kernel) comes from one `Runtime` object handed to the top-level module and passed down
unchanged, so no block grows a keyword argument per setting.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Literal, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import flash_attention as pallas_flash
from jax.sharding import Mesh, PartitionSpec as P

AttentionImpl = Literal["auto", "xla", "cudnn", "pallas"]
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "pallas")

# The Pallas TPU kernel works on (8, 128) tiles: sequence blocks and the head dim are multiples of
# 128 lanes. Its VMEM tiles are sized against half of the 16 MiB default scoped VMEM of v4/v5e chips,
# leaving the rest to the kernel's own temporaries.
_LANES = 128
_FLASH_BLOCKS = (512, 256, 128)
_FLASH_VMEM_BUDGET = 8 << 20


@dataclasses.dataclass(frozen=True)
class Runtime:
    """How a model executes.

    dtype: activation/compute dtype (bf16 halves memory and doubles matmul speed on TPU/GPU).
    param_dtype: dtype of freshly initialised parameters.
    attention: "xla" (portable), "cudnn" (fused flash kernel on NVIDIA GPUs, bf16/fp16 only),
      "pallas" (the Pallas TPU flash kernel for long unmasked attention, XLA for the rest: on a TPU,
      in Pallas' TPU interpret mode, or when lowering for TPU from another host) or "auto" (cudnn
      where it applies on a GPU, pallas where it applies on a TPU, else xla).
    flash_min_length: shortest query and key length that "auto"/"pallas" give to the Pallas kernel
      (SD at 512px: its 4096- and 1024-token self-attention; the 256- and 64-token levels and the
      77-token cross-attention stay with XLA, whose fused softmax is cheap at those sizes).
    remat: gradient checkpointing: the UNet's and ControlNet's down, mid and up blocks keep only their
      inputs for the backward pass and recompute their activations (`nn.remat`), trading compute for
      the memory that training a large UNet at high resolution needs. Inference is unaffected.
    """

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention: AttentionImpl = "auto"
    flash_min_length: int = 1024
    remat: bool = False

    def __post_init__(self):
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(
                f"attention={self.attention!r} is not supported; use 'auto', 'xla', 'cudnn' or 'pallas'."
            )
        if isinstance(self.flash_min_length, bool) or not isinstance(self.flash_min_length, int) \
                or self.flash_min_length < 1:
            raise ValueError(f"flash_min_length={self.flash_min_length!r} must be an int >= 1 (tokens).")


def _cudnn_applies(q: jax.Array, mask: Optional[jax.Array]) -> bool:
    return (
        jax.default_backend() == "gpu"
        and q.dtype in (jnp.bfloat16, jnp.float16)
        and q.shape[-1] % 8 == 0
        and q.shape[-1] <= 256
        and mask is None
    )


def flash_applies(q: jax.Array, k: jax.Array, runtime: Runtime, mask, is_causal: bool) -> bool:
    """Whether the Pallas TPU kernel takes this attention: unmasked, both lengths at least
    `runtime.flash_min_length` and whole 128-token blocks (the kernel tiles keys in such blocks)."""
    q_len, kv_len = q.shape[1], k.shape[1]
    return (
        mask is None
        and not is_causal
        and min(q_len, kv_len) >= runtime.flash_min_length
        and q_len % _LANES == 0
        and kv_len % _LANES == 0
    )


def flash_block_size(q_len: int, kv_len: int, head_dim: int, itemsize: int) -> int:
    """Query and key block of the Pallas kernel: the largest of 512/256/128 dividing both lengths whose
    VMEM tiles fit the budget. Tiles: q, k, v and output blocks double-buffered, the float32
    accumulator, the running max and sum (128 lanes each) and the float32 scores and probabilities."""
    for block in _FLASH_BLOCKS:
        if q_len % block or kv_len % block:
            continue
        vmem = (2 * 4 * block * head_dim * itemsize + block * head_dim * 4 + 2 * block * _LANES * 4
                + 2 * block * block * 4)
        if vmem <= _FLASH_VMEM_BUDGET:
            return block
    return _LANES


def _flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
    """The Pallas TPU flash kernel on [batch, length, heads, head_dim] arrays.

    The head dim is zero-padded to a multiple of 128: the kernel refuses head dims above 128 that
    are not multiples of it (SD's 160), and below 128 (SD's 40, 64, 80) padding makes the kernel's
    matmuls and its broadcast of the softmax sums lane-aligned, at no cost in HBM, where TPUs store
    the minor dimension in 128-lane tiles anyway. Zero columns add nothing to q.k, and v's zero
    columns only produce output columns that are cut off; `scale` keeps the unpadded head dim's.
    """
    head_dim = q.shape[-1]
    padded = -(-head_dim // _LANES) * _LANES

    def prepare(x):  # -> [batch, heads, length, padded head dim]
        return jnp.pad(jnp.swapaxes(x, 1, 2), ((0, 0), (0, 0), (0, 0), (0, padded - head_dim)))

    block = flash_block_size(q.shape[1], k.shape[1], padded, q.dtype.itemsize)
    sizes = pallas_flash.BlockSizes(block_q=block, block_k_major=block, block_k=block, block_b=1)
    kernel = functools.partial(pallas_flash.flash_attention, sm_scale=scale, block_sizes=sizes)
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and q.shape[0] % mesh.shape[mesh.axis_names[0]] == 0:
        # XLA cannot split a custom call across devices (it would gather the batch onto each one):
        # under a mesh, each device runs the kernel on its rows of the mesh's first (data) axis,
        # the axis the pipelines shard batches along.
        rows = P(mesh.axis_names[0])
        kernel = jax.shard_map(kernel, mesh=mesh, in_specs=(rows,) * 3, out_specs=rows, check_vma=False)
    out = kernel(prepare(q), prepare(k), prepare(v))
    return jnp.swapaxes(out[..., :head_dim], 1, 2)


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
        on_tpu = jax.default_backend() == "tpu"
        impl = "cudnn" if _cudnn_applies(q, mask) else ("pallas" if on_tpu else "xla")
    if impl == "pallas":
        if flash_applies(q, k, runtime, mask, is_causal):
            return _flash_attention(q, k, v, 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)
        impl = "xla"
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, scale=scale, is_causal=is_causal, implementation=impl
    )


def data_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A one-axis ("data") mesh over `devices`; by default every device of every process, each process's
    devices contiguous (so each process feeds one block of a batch)."""
    if devices is None:
        devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    return Mesh(np.asarray(devices), ("data",))
