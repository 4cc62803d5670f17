"""A generic data-parallel optax training loop with atomic, resumable checkpoints.

Data parallelism is `jax.jit` over a one-axis device mesh ("data"): the train state is replicated, each
batch is sharded along its leading axis, and XLA inserts the gradient all-reduce. One program runs on
one CPU, eight fake CPU devices, a GPU or a TPU slice alike.

The step is a pure function of (state, frozen, batch): its randomness is `fold_in(key(seed), step)`,
and `batches(step)` must be deterministic in `step`, so a run resumed from a checkpoint continues
exactly as the uninterrupted one would. Checkpoints are msgpack (`flax.serialization`) written with
`write_bytes_atomic`: a crash leaves the previous checkpoint intact, never a torn file.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from flax_inpaint.io import CheckpointError, write_bytes_atomic
from flax_inpaint.runtime import data_mesh

Params = Any
Batch = Dict[str, np.ndarray]
# loss_fn(params, frozen, batch, key) -> (scalar loss, {name: scalar metric})
LossFn = Callable[[Params, Any, Batch, jax.Array], Tuple[jax.Array, Dict[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings: adamw with linear warm-up then cosine decay to `final_lr_fraction`."""

    steps: int
    batch_size: int = 32
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    final_lr_fraction: float = 0.1
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0
    checkpoint_every: int = 500
    log_every: int = 10
    seed: int = 0

    def optimizer(self) -> optax.GradientTransformation:
        warmup = max(1, min(self.warmup_steps, self.steps // 2))
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, self.learning_rate, warmup, max(self.steps, warmup + 1),
            end_value=self.learning_rate * self.final_lr_fraction,
        )
        return optax.chain(
            optax.clip_by_global_norm(self.max_grad_norm),
            optax.adamw(schedule, weight_decay=self.weight_decay),
        )


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # [] int32, optimiser steps taken
    params: Params
    opt_state: optax.OptState


class FitResult(NamedTuple):
    params: Params
    losses: List[float]  # per logged interval (mean over `log_every` steps), this run only
    start_step: int  # > 0 when resumed from a checkpoint
    seconds: float  # wall time of this run, compilation and checkpoints included

    @property
    def final_loss(self) -> float:
        """Mean of the last (up to) 10 logged losses: a smoothed end-of-training loss."""
        return float(np.mean(self.losses[-10:])) if self.losses else float("nan")


def checkpoint_path(out_dir: Path, name: str) -> Path:
    return Path(out_dir) / f"{name}.ckpt.msgpack"


def save_checkpoint(path: Path, state: TrainState) -> None:
    write_bytes_atomic(path, flax.serialization.to_bytes(jax.device_get(state)))


def load_checkpoint(path: Path, template: TrainState) -> TrainState:
    """Restore `path` into the structure of `template`, or raise naming the file and the fix."""
    try:
        return flax.serialization.from_bytes(template, path.read_bytes())
    except Exception as e:
        raise CheckpointError(
            f"{path} does not hold a training checkpoint of this model and optimiser ({e}); "
            "delete it to start afresh, or pass the out_dir of the run it came from."
        ) from e


def _train_step(optimizer, loss_fn: LossFn, seed: int, state: TrainState, frozen, batch: Batch):
    key = jax.random.fold_in(jax.random.key(seed), state.step)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, frozen, batch, key)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **metrics}
    return TrainState(state.step + 1, params, opt_state), metrics


def fit(
    name: str,
    loss_fn: LossFn,
    params: Params,
    batches: Callable[[int], Batch],
    config: TrainConfig,
    out_dir: Optional[Path] = None,
    frozen: Any = None,
    mesh: Optional[Mesh] = None,
    progress: bool = True,
) -> FitResult:
    """Train `params` on `loss_fn` for `config.steps` steps, resuming from `out_dir`'s checkpoint.

    `batches(step)` returns the numpy batch of that step (leading axis = config.batch_size, divisible
    by the mesh's size). `frozen` holds arrays the loss reads but does not train (e.g. a VAE's params).
    Checkpoints go to `<out_dir>/<name>.ckpt.msgpack` every `checkpoint_every` steps and at the end;
    without `out_dir` nothing is written. A progress bar shows the running loss.
    """
    began = time.perf_counter()
    mesh = mesh or data_mesh()
    n_dev = mesh.devices.size
    if config.batch_size % n_dev:
        raise ValueError(
            f"batch_size={config.batch_size} is not divisible by the {n_dev} devices of the mesh; "
            f"use a multiple of {n_dev}."
        )
    replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    optimizer = config.optimizer()
    # The state is donated to each step, so it must not share buffers with `frozen` (e.g. a
    # ControlNet initialised from the frozen UNet's arrays): train on a copy.
    params = jax.tree_util.tree_map(jnp.copy, params)
    state = TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))
    path = checkpoint_path(out_dir, name) if out_dir is not None else None
    if path is not None and path.is_file():
        state = load_checkpoint(path, state)
    start = int(state.step)
    state = jax.device_put(state, replicated)
    frozen = jax.device_put(frozen, replicated)
    step_fn = jax.jit(
        lambda s, f, b: _train_step(optimizer, loss_fn, config.seed, s, f, b),
        out_shardings=(replicated, replicated), donate_argnums=0,
    )

    from tqdm.auto import tqdm

    bar = tqdm(total=config.steps, initial=start, desc=name, disable=not progress, dynamic_ncols=True)
    losses: List[float] = []
    pending: List[Dict[str, jax.Array]] = []
    for step in range(start, config.steps):
        batch = batches(step)
        if len(next(iter(batch.values()))) != config.batch_size:
            raise ValueError(f"batches({step}) has a leading axis != batch_size={config.batch_size}.")
        state, metrics = step_fn(state, frozen, jax.device_put(batch, sharded))
        pending.append(metrics)
        done = step + 1
        if len(pending) == config.log_every or done == config.steps:
            logged = jax.device_get(pending)  # one host sync per interval, not per step
            losses.append(float(np.mean([m["loss"] for m in logged])))
            bar.set_postfix(loss=f"{losses[-1]:.4f}", grad_norm=f"{logged[-1]['grad_norm']:.2f}")
            bar.update(len(pending))
            pending = []
        if path is not None and (done % config.checkpoint_every == 0 or done == config.steps):
            save_checkpoint(path, state)
    bar.close()
    return FitResult(jax.device_get(state.params), losses, start, time.perf_counter() - began)
