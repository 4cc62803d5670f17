"""Per-step hooks of the compiled sampling loop: step-end callbacks, host progress and previews, early stop.

All are off unless asked for, and then the program is the one without them (tests compare the HLO).

* `callback_on_step_end=f` (diffusers' signature): `f(pipeline, step, timestep, tensors) -> dict` is a JAX
  function traced into the loop once, so `step` and `timestep` are traced scalars (use `jnp.where`, not
  `if`). `tensors` holds the names of `callback_on_step_end_tensor_inputs`; the returned dict replaces
  any of them (same shapes), plus `guidance_scale` (one value per image, or a scalar): what diffusers'
  callbacks do by setting `pipe._guidance_scale`. Layouts are the program's: latents, mask and
  masked_image_latents NHWC; prompt_embeds with CFG is [negative; prompt] like diffusers'.
* Host callbacks (`callback`/`callback_steps`, progress bars, previews): one `io_callback` per loop step
  sends the step, its timestep and, if a callback wants them, the latents to the host. The pieces of one
  step (one per device under pmap, one per prompt with per-prompt keys) are gathered here and each
  callback runs once per step on the whole batch: `fn(step, timestep, latents NCHW numpy or None)`.
  Callbacks that want VAE-decoded images get them from a second host callback that runs, with the
  decoder, only every k steps (`PreviewWriter(..., vae=True)`).
* Early stop: a `StopFlag` set from any thread (or a host callback) ends the loop between steps (the loop
  becomes a `lax.while_loop` only then); the call returns the current estimate of the clean latents
  decoded (the scheduler's x0 prediction where its step gives one, else the current latents).
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import os
import threading
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

Array = jax.Array

# Step-end tensors every pipeline offers (diffusers' StableDiffusionPipeline._callback_tensor_inputs); the
# inpaint pipeline adds mask and masked_image_latents. `guidance_scale` is ours (diffusers' callbacks set
# pipe._guidance_scale instead).
TEXT_TENSOR_INPUTS = ("latents", "prompt_embeds", "negative_prompt_embeds")
INPAINT_TENSOR_INPUTS = TEXT_TENSOR_INPUTS + ("mask", "masked_image_latents")


@dataclasses.dataclass(frozen=True)
class StepEnd:
    """A traced step-end callback with its pipeline and tensor names: static under jit (hashed by identity,
    so the same function and pipeline reuse the compiled program)."""

    fn: Callable[..., Dict[str, Array]]
    pipeline: Any
    tensor_inputs: Tuple[str, ...] = ("latents",)


@dataclasses.dataclass(frozen=True)
class HostCallback:
    """A host function `fn(step, timestep, latents)` called every `every` steps; `latents` (NCHW numpy,
    the whole batch) only when `latents=True` (sending them costs a device-to-host copy per step).

    With `decoded=True` it gets the VAE's images instead (NHWC float32 in [0, 1]): the program decodes the
    latents only on the steps such a callback wants (under a `lax.cond`), so the decoder's cost is paid
    every `every` steps, not every step."""

    fn: Callable[[int, float, Optional[np.ndarray]], None]
    every: int = 1
    latents: bool = True
    decoded: bool = False


class StopFlag:
    """Ends a running call between two steps once `set()` (thread-safe; reusable after `clear()`)."""

    def __init__(self):
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def clear(self) -> None:
        self._event.clear()

    def is_set(self) -> bool:
        return self._event.is_set()


def check_tensor_inputs(names: Sequence[str], allowed: Sequence[str]) -> Tuple[str, ...]:
    """`callback_on_step_end_tensor_inputs` checked as diffusers checks it (plus our `guidance_scale`)."""
    allowed = tuple(allowed) + ("guidance_scale",)
    bad = [k for k in names if k not in allowed]
    if bad:
        raise ValueError(f"`callback_on_step_end_tensor_inputs` has to be in {list(allowed)}, but found {bad}")
    return tuple(names)


# ----------------------------------------------------------------------------- in the program

def step_end(cb: StepEnd, step: Array, t: Array, latents: Array, live: Dict[str, Array],
             do_cfg: bool) -> Tuple[Array, Dict[str, Array]]:
    """Call the traced step-end callback on diffusers' names of the loop tensors and write back what it
    returns. `live` holds the loop's own tensors: context [2B or B, L, D], guidance [B, 1, 1, 1], and
    extra (9-channel UNets: cfg(mask ++ masked latents), NHWC) or mask (4-channel blending, NHWC)."""
    named = {"latents": latents, "prompt_embeds": live["context"],
             "guidance_scale": live["guidance"].reshape(-1)}
    if do_cfg:
        named["negative_prompt_embeds"] = live["context"][: live["context"].shape[0] // 2]
    if "extra" in live:
        named["mask"], named["masked_image_latents"] = live["extra"][..., :1], live["extra"][..., 1:]
    elif "mask" in live:  # diffusers' mask is doubled with CFG; its blending reads the first half
        named["mask"] = jnp.concatenate([live["mask"]] * 2) if do_cfg else live["mask"]
    missing = [k for k in cb.tensor_inputs if k not in named]
    if missing:
        raise ValueError(f"callback_on_step_end_tensor_inputs asks for {missing}, which this call does not have "
                         f"({'no CFG' if 'negative_prompt_embeds' in missing else 'no mask / 9-channel UNet'}).")
    out = cb.fn(cb.pipeline, step, t, {k: named[k] for k in cb.tensor_inputs})
    out = dict(out or {})
    unknown = sorted(set(out) - set(named))
    if unknown:
        raise ValueError(f"callback_on_step_end returned {unknown}; it may return {sorted(named)}.")
    for k, v in out.items():
        if k != "guidance_scale" and jnp.shape(v) != named[k].shape:
            raise ValueError(f"callback_on_step_end returned {k} of shape {jnp.shape(v)}; it must keep the shape "
                             f"{named[k].shape} (the loop's shapes are fixed; to drop CFG return guidance_scale=0).")
    live = dict(live)
    latents = out.get("latents", latents).astype(latents.dtype)
    context = live["context"]
    if "negative_prompt_embeds" in out:
        context = context.at[: context.shape[0] // 2].set(out["negative_prompt_embeds"].astype(context.dtype))
    live["context"] = out.get("prompt_embeds", context).astype(context.dtype)
    if "guidance_scale" in out:
        g = jnp.asarray(out["guidance_scale"], jnp.float32)
        live["guidance"] = jnp.broadcast_to(g.reshape(-1), (live["guidance"].shape[0],)).reshape(live["guidance"].shape)
    if "extra" in live and ("mask" in out or "masked_image_latents" in out):
        extra = jnp.concatenate([out.get("mask", named["mask"]), out.get("masked_image_latents",
                                                                         named["masked_image_latents"])], axis=-1)
        live["extra"] = extra.astype(live["extra"].dtype)
    elif "mask" in live and "mask" in out:
        live["mask"] = out["mask"][: live["mask"].shape[0]].astype(live["mask"].dtype)
    return latents, live


def host_step(ids: Array, step: Array, t: Array, latents: Optional[Array]) -> Array:
    """Send one finished step to the host (`ids`: [B, 2] int32 rows of (call id, prompt row)). Returns a
    token (int32 scalar) that a later callback takes as input so that it runs after this one."""
    args = (ids, step, t) + (() if latents is None else (latents,))
    return io_callback(_arrive, jax.ShapeDtypeStruct((), jnp.int32), *args, ordered=False)


def decoded_step(ids: Array, step: Array, t: Array, latents: Array, decode: Callable[[Array], Array],
                 every: int) -> None:
    """Every `every` steps, send `decode(latents)` (NHWC images) to the host's decoded callbacks; a
    `lax.cond` skips the decoder on the other steps. A `jax.debug.callback`, not an `io_callback`: JAX
    refuses IO effects in a cond under vmap (the per-prompt-key program)."""
    def send(x):
        jax.debug.callback(_arrive_decoded, ids, step, t, decode(x).astype(jnp.float32))

    jax.lax.cond(step % every == 0, send, lambda x: None, latents)


def send_step(opts, ids: Array, step: Array, t: Array, latents: Array,
              decode: Callable[[Array], Array]) -> Optional[Array]:
    """A loop step's host callbacks as the static `opts` (`host_switches`' fields) ask; returns the
    per-step token (None without one)."""
    done = None
    if opts.host_callback:
        done = host_step(ids, step, t, latents if opts.host_latents else None)
    if opts.decode_every:
        decoded_step(ids, step, t, latents, decode, opts.decode_every)
    return done


def host_switches(host: Sequence[HostCallback]) -> Dict[str, Any]:
    """The static program options the host callbacks need: host_callback (a per-step io_callback),
    host_latents (sending the latents) and decode_every (steps between VAE decodes, their `every`s' gcd;
    0: none)."""
    per_step, decoded = [h for h in host if not h.decoded], [h.every for h in host if h.decoded]
    return {"host_callback": bool(per_step), "host_latents": any(h.latents for h in per_step),
            "decode_every": math.gcd(*decoded) if decoded else 0}


def loop_until_stopped(body, begin: Array, end: Array, carry, ids: Array) -> Array:
    """`fori_loop(begin, end, body, carry)` as a while_loop that also ends once the call's StopFlag is set
    (read on the host after every step, after that step's host callbacks: the carry's "done" token).
    Returns the final latents, or the "estimate" of the last step run when stopped early."""

    def cond(c):
        i, stop, _ = c
        return (i < end) & ~stop

    def step(c):
        i, _, inner = c
        inner = body(i, inner)
        return i + 1, io_callback(_stop_requested, jax.ShapeDtypeStruct((), jnp.bool_), ids, inner[2]["done"],
                                  ordered=False), inner

    i, _, (latents, _, live) = jax.lax.while_loop(cond, step, (begin, jnp.zeros((), jnp.bool_), carry))
    return jnp.where(i < end, live["estimate"], latents)


# ----------------------------------------------------------------------------- on the host

@dataclasses.dataclass
class _Call:
    rows: int  # prompts in the call: a step is complete when all have arrived
    callbacks: Tuple[HostCallback, ...]
    stop: Optional[StopFlag]
    # (decoded, step) -> row -> latents (or images)
    pending: Dict[Tuple[bool, int], Dict[int, Any]] = dataclasses.field(default_factory=dict)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def arrive(self, rows: np.ndarray, step: int, t: float, latents: Optional[np.ndarray],
               decoded: bool = False) -> None:
        parts = [None] * len(rows) if latents is None else np.split(latents, len(rows))
        with self.lock:
            got = self.pending.setdefault((decoded, step), {})
            got.update(zip(rows.tolist(), parts))
            if len(got) < self.rows:
                return
            del self.pending[decoded, step]
        full = None if latents is None else np.concatenate([got[r] for r in sorted(got)])
        if full is not None and not decoded:
            full = np.transpose(full, (0, 3, 1, 2))
        for cb in self.callbacks:
            if cb.decoded == decoded and step % cb.every == 0:
                cb.fn(step, t, full if cb.latents or decoded else None)


_CALLS: Dict[int, _Call] = {}
_IDS = itertools.count(1)


def _arrive(ids, step, t, latents=None, decoded=False) -> np.ndarray:
    ids = np.asarray(ids)
    call = _CALLS.get(int(ids[0, 0]))
    if call is not None:
        call.arrive(ids[:, 1], int(step), float(t), None if latents is None else np.asarray(latents, np.float32),
                    decoded)
    return np.int32(0)


def _arrive_decoded(ids, step, t, images) -> None:
    _arrive(ids, step, t, images, decoded=True)


def _stop_requested(ids, done) -> np.ndarray:
    call = _CALLS.get(int(np.asarray(ids)[0, 0]))
    return np.bool_(call is not None and call.stop is not None and call.stop.is_set())


@contextlib.contextmanager
def host_session(lead: tuple, callbacks: Sequence[HostCallback],
                 stop: Optional[StopFlag] = None) -> Iterator[Optional[np.ndarray]]:
    """Register a call's host callbacks and stop flag for as long as it runs (its programs must have
    finished inside); yields the call's `callback_ids` [*lead, 2], or None when it has neither (its program
    then has no hook). Closes the progress bars at the end."""
    if not callbacks and stop is None:
        yield None
        return
    call_id = next(_IDS) % (2**31 - 1)
    _CALLS[call_id] = _Call(int(np.prod(lead)), tuple(callbacks), stop)
    try:
        yield call_ids(call_id, lead)
    finally:
        del _CALLS[call_id]
        for h in callbacks:
            if isinstance(h.fn, StepProgress):
                h.fn.close()


def call_ids(call_id: int, lead: tuple) -> np.ndarray:
    """The Batch's `callback_ids` [*lead, 2]: (call id, global prompt row) per prompt."""
    rows = np.arange(int(np.prod(lead)), dtype=np.int32).reshape(lead)
    return np.stack([np.full(lead, call_id, np.int32), rows], axis=-1)


def make_host_callbacks(callback: Optional[Callable[[int, float, np.ndarray], None]], callback_steps: int,
                        progress_total: Optional[int], bar_config: Dict[str, Any],
                        more: Sequence[HostCallback] = ()) -> List[HostCallback]:
    """A call's host callbacks: `more`, diffusers' `callback` every `callback_steps` steps (checked as
    diffusers checks it) and, when `progress_total` is given, a per-step bar of that many steps."""
    if not isinstance(callback_steps, int) or isinstance(callback_steps, bool) or callback_steps <= 0:
        raise ValueError(f"`callback_steps` has to be a positive integer but is {callback_steps} of type "
                         f"{type(callback_steps)}.")
    host = list(more)
    if callback is not None:
        host.append(HostCallback(callback, callback_steps, latents=True))
    if progress_total is not None:
        host.append(HostCallback(StepProgress(progress_total, **bar_config), 1, latents=False))
    return host


# ----------------------------------------------------------------------------- progress and previews

def wants_bar(progress: Optional[bool]) -> bool:
    """A bar's switch as tqdm reads `disable=not progress`: None means only when stderr is a terminal."""
    import sys

    return sys.stderr.isatty() if progress is None else bool(progress)


class StepProgress:
    """A tqdm bar that moves once per denoising step (a host callback without latents)."""

    def __init__(self, total: int, **tqdm_kwargs):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, **tqdm_kwargs)

    def __call__(self, step: int, t: float, latents=None) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


# Least-squares fit rgb ~ [latents, 1] @ LATENT_RGB for the bundled tiny VAE (assets/tiny-shapes-inpaint):
# rows are the 4 latent channels (scaled latents, as the loop holds them) and a bias; columns R, G, B in
# [-1, 1]. tools/fit_latent_rgb.py derives it from encoded training-like scenes, decoded and averaged
# over each latent cell (held-out RMSE 0.30 against a pixel std of 0.71). Other VAEs (SD 1.5's) need
# their own factors: pass them to PreviewWriter.
LATENT_RGB = np.array([
    [0.5068, 0.6317, 0.3270],
    [-0.1312, -0.1773, -0.4702],
    [0.0343, 0.3667, 0.5299],
    [0.4182, 0.2089, -0.1203],
    [0.2640, 0.3834, 0.0414],
], np.float32)


def latents_to_rgb(latents: np.ndarray, factors: np.ndarray = LATENT_RGB) -> np.ndarray:
    """A cheap preview: NCHW scaled latents -> NHWC uint8 RGB at the latent resolution (a linear map)."""
    x = np.transpose(np.asarray(latents, np.float32), (0, 2, 3, 1))
    rgb = x @ factors[:-1] + factors[-1]
    return np.clip(np.rint((rgb + 1) * 127.5), 0, 255).astype(np.uint8)


class PreviewWriter:
    """Writes a preview PNG per image every `every` steps into `directory` ({prefix}{image}-step{step}.png),
    each written to a temporary name first and renamed, so no half-written file is left. The preview is
    the latent-to-RGB map (latent resolution), or with `vae=True` the VAE's decode (full resolution, the
    decoder run in the program every `every` steps)."""

    def __init__(self, directory: os.PathLike, every: int = 1, prefix: str = "", factors: np.ndarray = LATENT_RGB,
                 vae: bool = False):
        self.directory, self.every, self.prefix, self.factors = Path(directory), every, prefix, factors
        self.vae = vae
        self.directory.mkdir(parents=True, exist_ok=True)
        self.written: List[Path] = []

    def __call__(self, step: int, t: float, latents: np.ndarray) -> None:
        """`latents`: NCHW latents, or with `vae=True` the decoded NHWC images in [0, 1]."""
        import PIL.Image

        rgbs = (np.clip(np.rint(latents * 255), 0, 255).astype(np.uint8) if self.vae
                else latents_to_rgb(latents, self.factors))
        for k, rgb in enumerate(rgbs):
            path = self.directory / f"{self.prefix}{k:03d}-step{step:03d}.png"
            tmp = path.with_name(path.name + ".partial")
            PIL.Image.fromarray(rgb).save(tmp, format="PNG")
            os.replace(tmp, path)
            self.written.append(path)

    def host_callback(self) -> HostCallback:
        return HostCallback(self, self.every, latents=True, decoded=self.vae)


# ----------------------------------------------------------------------------- the pipelines' keywords

@dataclasses.dataclass
class CallHooks:
    """The per-step keywords of every pipeline `__call__` (diffusers' names):

    guidance_rescale: diffusers' rescale_noise_cfg factor (a traced value; 0 leaves it out of the program).
    timesteps / sigmas: a custom schedule, where the scheduler's `set_timesteps` takes it (diffusers'
      `retrieve_timesteps` errors otherwise); its length replaces num_inference_steps, its values are traced.
    cross_attention_kwargs: {"scale": s}, the LoRA scale (traced).
    callback_on_step_end, callback_on_step_end_tensor_inputs: see the module docstring.
    callback, callback_steps: diffusers' older host callback `callback(step, timestep, latents)`.
    host_callbacks: more `HostCallback`s (e.g. `PreviewWriter(dir).host_callback()`).
    progress: a per-step tqdm bar (options of `pipeline.set_progress_bar_config`).
    stop: a `StopFlag` that ends the loop early.
    """

    guidance_rescale: float = 0.0
    timesteps: Optional[Sequence[float]] = None
    sigmas: Optional[Sequence[float]] = None
    cross_attention_kwargs: Optional[Dict[str, Any]] = None
    callback_on_step_end: Optional[Callable[..., Dict[str, Array]]] = None
    callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",)
    callback: Optional[Callable[[int, float, np.ndarray], None]] = None
    callback_steps: int = 1
    host_callbacks: Sequence[HostCallback] = ()
    progress: bool = False
    stop: Optional[StopFlag] = None

    def num_inference_steps(self, scheduler, num_inference_steps: int) -> int:
        """The step count: the custom schedule's length when one is given."""
        from flax_inpaint.schedulers.custom import check_custom_schedule

        return check_custom_schedule(scheduler, num_inference_steps, self.timesteps, self.sigmas)

    def apply(self, pipeline, batch, opts, params):
        """(batch, options) with the traced values and static switches these keywords ask for."""
        from flax_inpaint.schedulers.custom import custom_schedule

        kwargs = dict(self.cross_attention_kwargs or {})
        if set(kwargs) - {"scale"}:
            raise ValueError(f"cross_attention_kwargs={kwargs}: only 'scale' (the LoRA scale) is supported here.")
        fields = {}
        if "scale" in kwargs:
            fields["lora_scale"] = np.float32(kwargs["scale"])
        if self.guidance_rescale:
            fields["guidance_rescale"] = np.float32(self.guidance_rescale)
        if self.timesteps is not None or self.sigmas is not None:
            fields["schedule"] = custom_schedule(pipeline.scheduler, self.timesteps, self.sigmas)
        step_end = None
        if self.callback_on_step_end is not None:
            names = check_tensor_inputs(self.callback_on_step_end_tensor_inputs, pipeline._callback_tensor_inputs)
            step_end = StepEnd(self.callback_on_step_end, pipeline, names)
        total = None
        if self.progress:
            sched, f = pipeline.scheduler, pipeline.vae_scale_factor
            shape = (1, opts.height // f, opts.width // f, pipeline.vae.latent_channels)
            loop = np.shape(sched.set_timesteps(params["scheduler"], opts.num_inference_steps, shape).timesteps)[-1]
            end = loop if batch.end_index is None else int(np.max(batch.end_index))  # denoising_end
            total = end - int(np.max(batch.begin_index))
        self._host = make_host_callbacks(self.callback, self.callback_steps, total, pipeline._progress_bar_config,
                                         self.host_callbacks)
        opts = dataclasses.replace(opts, step_end=step_end, early_stop=self.stop is not None,
                                   **host_switches(self._host))
        return batch.replace(**fields), opts

    @contextlib.contextmanager
    def session(self, batch, lead: tuple):
        """The batch with its `callback_ids` while the call's host callbacks are registered (the batch as is
        when there are none)."""
        with host_session(lead, self._host, self.stop) as ids:
            yield batch if ids is None else batch.replace(callback_ids=ids)
