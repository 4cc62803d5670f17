"""Stable Diffusion pipelines: text-to-image, image-to-image and inpainting, with diffusers' Flax API.

Every pipeline's `__call__` hands its arguments to `inputs.build` (checked once, into a `Batch`), then
`sampling.run`, the one execution path: `jax.jit` of the sampling program over a device mesh.
  * `jit=False`: one device (the params'), no mesh; `mesh=Mesh(...)`: global arrays sharded along the
    mesh's data axis (multi-host);
  * `jit=True`: diffusers' pmap calling convention (inputs [devices, per_device, ...], replicated
    params, one key per device), adapted onto a mesh over the local devices: rows merged, params
    used where each device holds its copy, outputs split back to [devices, per_device, ...]; each
    device's images are those of a one-device call on its rows with its key.
Without jit=True, `prng_seed` may hold one key per prompt: each prompt is then sampled as if alone with
its key (like diffusers' list of generators), so results do not depend on how prompts are batched.
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from tqdm.auto import tqdm

from flax_inpaint.diffusers_compat import PUSH_TO_HUB, BaseOutput, ConfigMixin, FrozenConfig, not_provided
from flax_inpaint.image_processor import VaeImageProcessor, postprocess_inpaint, preprocess_inpaint
from flax_inpaint.loaders import ip_adapter
from flax_inpaint.loaders.lora import LoraLoaderMixin
from flax_inpaint.models.clip_vision import FlaxCLIPVisionModelWithProjection
from flax_inpaint.loaders.single_file import FromSingleFileMixin
from flax_inpaint.loaders.textual_inversion import TextualInversionLoaderMixin
from flax_inpaint.io import CheckpointError, read_config, resolve_folder
from flax_inpaint.pipelines import loading
from flax_inpaint.pipelines.callbacks import INPAINT_TENSOR_INPUTS, TEXT_TENSOR_INPUTS, CallHooks
from flax_inpaint.pipelines.inputs import Prepared, build
from flax_inpaint.pipelines.ip_adapter import ImageEncoder
from flax_inpaint.pipelines.sampling import (
    Components,
    decode_latents,
    run,
)
from flax_inpaint.schedulers.common import begin_index_for_strength

_decode_jit = jax.jit(decode_latents, static_argnums=0)


@dataclass
class FlaxStableDiffusionPipelineOutput(BaseOutput):
    """`images`: float arrays in [0, 1] (NHWC; leading device axis with `jit=True`), PIL images, or
    NCHW latents; `nsfw_content_detected`: bools per image, or None without a safety checker."""

    images: Any
    nsfw_content_detected: Any


class FlaxDiffusionPipeline(FromSingleFileMixin, LoraLoaderMixin, TextualInversionLoaderMixin, ConfigMixin):
    """Components, loading and the host-side plumbing shared by all Stable Diffusion pipelines.

    `FlaxDiffusionPipeline.from_pretrained(folder)` returns the pipeline class the folder's
    model_index.json names (e.g. StableDiffusionInpaintPipeline -> FlaxStableDiffusionInpaintPipeline).
    """

    config_name = "model_index.json"
    _pipeline_class = "StableDiffusionPipeline"
    _callback_tensor_inputs = TEXT_TENSOR_INPUTS

    push_to_hub = not_provided(PUSH_TO_HUB)
    register_modules = not_provided(
        "a pipeline's components are fixed at construction (they decide its compiled program); build "
        "another with type(pipe)(**{**pipe.components, name: module}) or from_pipe(pipe, name=module).")
    from_config = not_provided("a pipeline is built from a folder: use from_pretrained(folder), or the "
                               "constructor with its components.")

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, safety_checker=None,
                 feature_extractor=None, dtype: Any = jnp.float32, image_encoder=None):
        if unet.in_channels not in (4, 9):
            raise ValueError(
                f"The UNet has in_channels={unet.in_channels}; these pipelines support 4 (plain) or 9 "
                "(inpainting: latents + mask + masked-image latents)."
            )
        if feature_extractor is not None and not isinstance(feature_extractor, Mapping):
            raise TypeError(f"feature_extractor must be its preprocessor_config.json dict (or None); got "
                            f"{type(feature_extractor).__name__}. Pass e.g. image_processor.to_dict().")
        if safety_checker is not None and feature_extractor is not None:
            # The one place the feature extractor configures the checker's CLIP preprocessing, however
            # the pipeline is built (from_pretrained, directly, from_pipe).
            safety_checker = safety_checker.with_preprocessor_config(feature_extractor)
        self.vae, self.text_encoder, self.tokenizer, self.unet = vae, text_encoder, tokenizer, unet
        self.scheduler, self.safety_checker, self.feature_extractor = scheduler, safety_checker, feature_extractor
        self.image_encoder = image_encoder  # IP-Adapters' CLIP image encoder (ip_adapter_image)
        self.dtype = dtype
        self.vae_scale_factor = vae.downscale
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self.mask_processor = VaeImageProcessor.for_masks(self.vae_scale_factor)
        self._progress_bar_config: dict = {}

    # -- loading / saving ---------------------------------------------------------------------
    # Pipeline settings model_index.json holds beside the components (diffusers' register_to_config), passed
    # to the constructor by from_pretrained and from_pipe.
    _config_names: Tuple[str, ...] = ()
    _optional_components: Tuple[str, ...] = ()  # components a folder may leave null besides those with defaults

    @classmethod
    def component_names(cls) -> Tuple[str, ...]:
        """The constructor's components, in order (what `components` holds)."""
        skip = ("self", "dtype", *cls._config_names)
        return tuple(n for n in inspect.signature(cls.__init__).parameters if n not in skip)

    def _config_values(self) -> Dict[str, Any]:
        return {name: getattr(self, name) for name in self._config_names}

    @property
    def components(self) -> Dict[str, Any]:
        """The components by name: `OtherPipeline(**pipe.components)` builds another pipeline over them
        (the same params serve both)."""
        return {name: getattr(self, name) for name in self.component_names()}

    @property
    def config(self) -> FrozenConfig:
        """model_index.json's content: the pipeline class and each component's (library, class)."""
        return FrozenConfig({**loading.model_index(self._pipeline_class, self.components), **self._config_values()})

    @property
    def _config_class_name(self) -> str:
        return self._pipeline_class

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], dtype: Any = None,
                        param_dtype: Optional[Any] = None, attention: str = "auto", variant: Optional[str] = None,
                        local_files_only: bool = False, revision: Optional[str] = None, *, from_pt: bool = False,
                        cache_dir: Optional[Union[str, os.PathLike]] = None, proxies: Optional[dict] = None,
                        token: Union[str, bool, None] = None, force_download: bool = False,
                        use_memory_efficient_attention: bool = False, split_head_dim: bool = False, **components):
        """Load `(pipeline, params)` from a diffusers pipeline folder or a hub repo id.

        `dtype` is the activation dtype (default float32), also the params' dtype unless `param_dtype`
        is given. `components` replace the folder's by name (`scheduler=FlaxDPMSolverMultistepScheduler(...)`,
        `unet=...`, for ControlNet pipelines `controlnet=` a model, folder or list of them), or leave an
        optional one out (`safety_checker=None`). A model passed as an object brings no params: set
        `params[name]` to its params, as with diffusers (a passed scheduler's state is created here).

        Weights: Flax msgpack where the folder has it, else PyTorch weights converted (`from_pt=True`
        always converts the PyTorch ones). `cache_dir`, `proxies`, `token`, `force_download`,
        `local_files_only` and `revision` go to the hub download. `use_memory_efficient_attention` and
        `split_head_dim` select diffusers' own attention kernels and change nothing here: attention
        runs as `attention=` says (see `Runtime`).
        """
        del use_memory_efficient_attention, split_head_dim
        hub = dict(cache_dir=cache_dir, proxies=proxies, token=token, force_download=force_download)
        folder = resolve_folder(pretrained_model_name_or_path, None, local_files_only, revision, **hub)
        target, index = cls, read_config(folder, cls.config_name)
        if cls is FlaxDiffusionPipeline:
            target = pipeline_class(index.get("_class_name", ""))
        names = target.component_names()
        unknown = sorted(set(components) - set(names))
        if unknown:
            raise TypeError(f"{target.__name__}.from_pretrained got unexpected keyword arguments {unknown}; its "
                            f"components are {list(names)}.")
        dtype = jnp.float32 if dtype is None else dtype
        load = dict(dtype=dtype, param_dtype=param_dtype or dtype, attention=attention, variant=variant,
                    from_pt=from_pt, local_files_only=local_files_only, revision=revision, **hub)
        skip = tuple(components) + tuple(n for n in loading.OPTIONAL if n not in names)
        comps, params, _ = loading.load_components(folder, skip=skip, **load)
        for name, value in components.items():
            comps[name] = target._passed_component(name, value, params, load)
        if components.get("scheduler") is not None:
            params["scheduler"] = comps["scheduler"].create_state()
        optional = {n for n, p in inspect.signature(target.__init__).parameters.items() if p.default is not p.empty}
        optional.update(target._optional_components)
        for name in names:
            if comps.get(name) is None and name not in optional:
                why = "was passed as None" if name in components else f"has no {name} in its model_index.json"
                raise ValueError(f"{target.__name__} needs a {name}, but {folder} {why}; pass {name}=<a "
                                 f"{name} object{', folder, or a list of either' if name == 'controlnet' else ''}>.")
        settings = {name: index[name] for name in target._config_names if name in index}
        return target(**{name: comps.get(name) for name in names}, **settings, dtype=dtype), params

    @classmethod
    def _passed_component(cls, name: str, value: Any, params: dict, load: dict) -> Any:
        """The component for a `from_pretrained(name=value)` argument: `image_encoder` may be a folder (e.g.
        an IP-Adapter repo's models/image_encoder), loaded into params["image_encoder"] (ControlNet
        pipelines load `controlnet` folders too)."""
        if name == "image_encoder" and isinstance(value, (str, os.PathLike)):
            value, params[name] = FlaxCLIPVisionModelWithProjection.from_pretrained(value, **load)
        return value

    @classmethod
    def from_pipe(cls, pipe: "FlaxDiffusionPipeline", **components):
        """This pipeline over another one's components (no reloading; the same params serve both);
        keyword arguments add or replace components, e.g. `controlnet=` for a ControlNet pipeline
        (then set params["controlnet"])."""
        found = {n: getattr(pipe, n) for n in cls.component_names() + cls._config_names if hasattr(pipe, n)}
        return cls(**{**found, **components}, dtype=pipe.dtype)

    def save_pretrained(self, save_directory: Union[str, os.PathLike], params, push_to_hub: bool = False,
                        **kwargs) -> None:
        """Write a diffusers-format folder that both diffusers (PyTorch) and we can load."""
        if push_to_hub or kwargs:
            raise ValueError(f"save_pretrained(push_to_hub=True, {', '.join(kwargs)}) is not provided: {PUSH_TO_HUB}")
        loading.save_components(save_directory, self._pipeline_class, self.components, params, self._config_values())

    # -- diffusers' pipeline utilities ------------------------------------------------------------
    @staticmethod
    def get_timestep_start(num_inference_steps: int, strength: float) -> int:
        """The first of `num_inference_steps` steps that runs at `strength` (img2img, inpaint), as diffusers
        counts it: steps - int(steps * strength)."""
        return begin_index_for_strength(num_inference_steps, strength)

    @staticmethod
    def numpy_to_pil(images: np.ndarray) -> List[PIL.Image.Image]:
        """[N,]H,W,C floats in [0, 1] -> list of PIL images (C=1 gives mode "L"), as diffusers rounds."""
        return VaeImageProcessor.numpy_to_pil(images)

    def progress_bar(self, iterable=None, total: Optional[int] = None):
        """A tqdm bar over `iterable` (or of `total` steps) with the options of `set_progress_bar_config`.
        Sampling runs as one compiled program without a per-step bar; this is for your own loops."""
        return tqdm(iterable, total=total, **self._progress_bar_config)

    def set_progress_bar_config(self, **kwargs) -> None:
        """tqdm options for `progress_bar` (e.g. disable=True, desc=...)."""
        self._progress_bar_config = kwargs

    # -- host-side helpers ----------------------------------------------------------------------
    @property
    def max_length(self) -> int:
        return self.tokenizer.model_max_length

    @property
    def ids_shape(self) -> Tuple[int, ...]:
        """The trailing dims of one prompt's token ids."""
        return (self.max_length,)

    @property
    def context_width(self) -> int:
        """The width of the prompt embeddings the UNet attends to."""
        return self.text_encoder.hidden_size

    def tokenize(self, prompt: Union[str, Sequence[str]]) -> np.ndarray:
        """Token ids [B, max_length] padded/truncated like diffusers."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}.")
        return self.tokenizer(
            self.maybe_convert_prompt(prompts), padding="max_length", max_length=self.max_length, truncation=True,
            return_tensors="np",
        ).input_ids.astype(np.int32)

    def prepare_text_inputs(self, prompt) -> np.ndarray:
        return self.tokenize(prompt)

    def _prompt_inputs(self, prompt, negative_prompt, kwargs: dict) -> tuple:
        """(prompt_ids, neg_prompt_ids or None) of a convenience call's strings (a string negative prompt
        repeats per prompt); SDXL pipelines also take their extra prompt keywords out of `kwargs`."""
        ids = self.tokenize(prompt)
        if negative_prompt is None:
            return ids, None
        return ids, self.tokenize([negative_prompt] * ids.shape[0] if isinstance(negative_prompt, str)
                                  else negative_prompt)

    def default_size(self) -> tuple:
        """(height, width) the UNet was trained at: its sample_size (64 if unset) times the VAE factor."""
        size = self.unet.sample_size or 64
        h, w = (size, size) if isinstance(size, int) else size
        return h * self.vae_scale_factor, w * self.vae_scale_factor

    def decode_latents(self, latents, params) -> np.ndarray:
        """NHWC images in [0, 1] from NCHW latents of `output_type="latent"` (unreplicated params)."""
        latents = jnp.asarray(latents)
        if latents.ndim != 4 or latents.shape[1] != self.vae.latent_channels:
            raise ValueError(f"latents has shape {latents.shape}; expected [B, {self.vae.latent_channels}, h, w] "
                             "(reshape away a device axis first).")
        return np.asarray(_decode_jit(self.vae, params["vae"], jnp.transpose(latents, (0, 2, 3, 1))))

    def _components(self) -> Components:
        encoder = None if self.image_encoder is None else ImageEncoder.of(self.image_encoder, self.feature_extractor)
        return Components(self.unet, self.vae, self.text_encoder, self.scheduler, self.safety_checker,
                          image_encoder=encoder)

    def load_ip_adapter(self, params, pretrained_model_name_or_path_or_dict, subfolder: Optional[str] = None,
                        weight_name: Optional[str] = None):
        """New params with an IP-Adapter added (loaders/ip_adapter.py `load_ip_adapter`; diffusers'
        `load_ip_adapter`). Its image encoder is a pipeline component: see `from_pretrained(image_encoder=)`."""
        return ip_adapter.load_ip_adapter(params, pretrained_model_name_or_path_or_dict, subfolder, weight_name,
                                          unet=self.unet)

    def set_ip_adapter_scale(self, params, scale):
        """New params with the IP-Adapter scales of `scale` (a traced value: the program does not recompile)."""
        return ip_adapter.set_ip_adapter_scale(params, scale, unet=self.unet)

    def unload_ip_adapter(self, params):
        """New params without IP-Adapters."""
        return ip_adapter.unload_ip_adapter(params)

    # Flags of `inputs.build` for this pipeline's inputs, and its __call__ argument names that `build`
    # knows by another name.
    _inputs: Dict[str, Any] = {}
    _renamed: Dict[str, str] = {}

    def _call(self, args: Dict[str, Any]):
        """Every `__call__` hands over its arguments (`locals()`): one checked `Batch`, one program."""
        args = {self._renamed.get(k, k): v for k, v in args.items() if k != "self"}
        run = {k: args.pop(k) for k in ("params", "prng_seed", "jit", "mesh", "return_dict")}
        hooks = CallHooks(**args.pop("hooks", {}))
        args["num_inference_steps"] = hooks.num_inference_steps(self.scheduler, args["num_inference_steps"])
        prepared = build(self, run["jit"], **args, **self._inputs, params=run["params"])
        return self._run(prepared, args["output_type"], hooks=hooks, **run)

    def _program_params(self, params):
        """`params` as the sampling program reads them."""
        return params

    def _run(self, prepared: Prepared, output_type: str, params, prng_seed, jit: bool,
             mesh: Optional[Mesh], return_dict: bool, hooks: CallHooks):
        batch, opts, lead = prepared.batch, prepared.opts, prepared.lead
        batch, opts = hooks.apply(self, batch, opts, params)
        params = self._program_params(params)
        comps = self._components()
        encoders = [n for n in ("text_encoder", "text_encoder_2") if getattr(self, n, None) is not None]
        needed = ["unet", "vae", "scheduler"] + encoders * (batch.prompt_ids is not None) \
            + ["safety_checker"] * (self.safety_checker is not None) \
            + ["image_encoder"] * (batch.ip_adapter_images is not None)
        missing = [name for name in needed if name not in params]
        if missing:
            raise ValueError(f"params has no {missing}: a component passed to from_pretrained (or the constructor) as "
                             f"an object brings no params; set params[{missing[0]!r}] to its params (from its "
                             "from_pretrained), as with diffusers.")
        keys, mesh = call_layout(prng_seed, params, jit, mesh, lead)
        with hooks.session(batch, lead) as batch:  # host callbacks registered until the images are here
            if jit:  # the [devices, per_device] rows as one batch
                batch = batch.replace(**jax.tree_util.tree_map(merge_devices, batch.rows()))
            images, nsfw = fetch(run(comps, opts, params, batch, keys, mesh, stacked=jit))
        if output_type == "latent":  # NCHW at the public boundary, as diffusers returns latents
            images = np.moveaxis(images, -1, -3)
        if jit:  # back to [devices, per_device, ...]
            images = images.reshape(lead[0], -1, *images.shape[1:])
            nsfw = None if nsfw is None else nsfw.reshape(lead[0], -1)
        if output_type == "pil":
            images = VaeImageProcessor.numpy_to_pil(images.reshape(-1, *images.shape[-3:]))
        return FlaxStableDiffusionPipelineOutput(images, nsfw) if return_dict else (images, nsfw)


def call_layout(prng_seed, params, jit: bool, mesh: Optional[Mesh],
                lead: tuple) -> Tuple[jax.Array, Optional[Mesh]]:
    """A call's keys and mesh (see the module docstring), its `prng_seed` and `params` checked against
    `jit` and `lead`, the batch dims of its inputs."""
    if jit and mesh is not None:
        raise ValueError("Pass either jit=True (pmap over local devices) or mesh=..., not both.")
    keys = _keys(prng_seed)
    if jit:  # diffusers' pmap convention: [devices, per_device, ...] rows, replicated params, a key per device
        n = lead[0]
        if keys.shape != (n,):
            raise ValueError(f"prng_seed must hold one key per device ({n}); got shape {np.shape(prng_seed)}. "
                             "Use jax.random.split(key, jax.local_device_count()).")
        _check_replicated(params, n)
        return keys, _pmap_mesh(params)
    if keys.shape[0] not in (1, lead[0]):
        raise ValueError(f"prng_seed has shape {np.shape(prng_seed)}; pass one key (jax.random.key(seed)) or "
                         f"one key per prompt, e.g. jax.random.split(key, {lead[0]}) (this process's rows).")
    return keys, mesh


def _pmap_mesh(params) -> Mesh:
    """The mesh of a jit=True call: the one `params` were replicated over where that is a 1-D mesh of the local
    devices in order (flax's `replicate`), so they are used where they lie instead of placed again every call;
    else a new mesh over the local devices."""
    devices = jax.local_devices()
    mesh = getattr(getattr(jax.tree_util.tree_leaves(params)[0], "sharding", None), "mesh", None)
    if isinstance(mesh, Mesh) and mesh.devices.ndim == 1 and list(mesh.devices) == devices:
        return mesh
    return Mesh(np.array(devices), ("devices",))


def merge_devices(x) -> np.ndarray:
    """[devices, per_device, ...] rows of the pmap convention as one batch [devices * per_device, ...]."""
    return np.reshape(x, (-1, *np.shape(x)[2:]))


def fetch(outputs):
    """A program's outputs as numpy arrays, every process's rows (a mesh over several processes)."""
    if not all(x.is_fully_addressable for x in jax.tree_util.tree_leaves(outputs)):
        outputs = multihost_utils.process_allgather(outputs, tiled=True)
    return jax.tree_util.tree_map(np.asarray, outputs)


def _is_typed(prng_seed) -> bool:
    return jax.dtypes.issubdtype(getattr(prng_seed, "dtype", None), jax.dtypes.prng_key)


def _keys(prng_seed) -> jax.Array:
    """`prng_seed` as typed keys [K]: one key (typed, or raw jax.random.PRNGKey data) or a batch of them."""
    if _is_typed(prng_seed):
        return prng_seed.reshape(-1) if prng_seed.ndim == 0 else prng_seed
    data = np.asarray(prng_seed)  # one eager op (the wrap), not two: each costs ~0.1 ms a call
    return jax.random.wrap_key_data(data[None] if data.ndim == 1 else data)


def pipeline_class(name: str) -> type:
    """Our pipeline class for a model_index.json `_class_name` (diffusers' name, with or without "Flax")."""
    found, todo = {}, [FlaxDiffusionPipeline]
    while todo:
        for sub in todo.pop().__subclasses__():
            found[sub.__name__] = sub
            todo.append(sub)
    want = "Flax" + name.removeprefix("Flax")
    if want not in found:
        raise CheckpointError(f"model_index.json names the pipeline {name!r}; FlaxDiffusionPipeline.from_pretrained "
                              f"loads {sorted(n.removeprefix('Flax') for n in found)}. Call the class you want "
                              "directly, e.g. FlaxStableDiffusionPipeline.from_pretrained(folder).")
    return found[want]


class FlaxStableDiffusionPipeline(FlaxDiffusionPipeline):
    """Text-to-image."""

    def prepare_inputs(self, prompt) -> np.ndarray:
        return self.tokenize(prompt)

    def __call__(self, prompt_ids, params, prng_seed, num_inference_steps: int = 50,
                 height: Optional[int] = None, width: Optional[int] = None, guidance_scale=7.5,
                 latents=None, neg_prompt_ids=None, return_dict: bool = True, jit: bool = False, *,
                 num_images_per_prompt: int = 1, prompt_embeds=None, negative_prompt_embeds=None,
                 clip_skip: Optional[int] = None, eta: float = 0.0, output_type: str = "np",
                 mesh: Optional[Mesh] = None, ip_adapter_image=None, ip_adapter_image_embeds=None, **hooks):
        """Text to image; `hooks`: the per-step keywords of `CallHooks` (callbacks, progress, early stop,
        timesteps / sigmas, guidance_rescale, cross_attention_kwargs)."""
        return self._call(locals())


class FlaxStableDiffusionImg2ImgPipeline(FlaxDiffusionPipeline):
    """Image-to-image: start from the noised latents of `image` (pixels, or already latents) at `strength`."""

    _inputs = {"image_required": True}

    def prepare_inputs(self, prompt, image, height: Optional[int] = None, width: Optional[int] = None):
        """(prompt_ids, images NCHW in [-1, 1])."""
        return self.tokenize(prompt), self.image_processor.preprocess(image, height, width)

    def img2img(self, prompt, image, params, prng_seed, *, negative_prompt=None, height: Optional[int] = None,
                width: Optional[int] = None, output_type: str = "pil", **kwargs):
        """PyTorch-style convenience: strings and PIL images in, images out (one device); one `image` may
        serve every prompt. Other keyword arguments go to `__call__` (strength, num_inference_steps, ...)."""
        ids, images = self.tokenize(prompt), self.image_processor.preprocess(image, height, width)
        n = ids.shape[0]
        if images.shape[0] not in (1, n):
            raise ValueError(f"{images.shape[0]} images for {n} prompts; pass one, or one per prompt.")
        neg = None if negative_prompt is None else self.tokenize(
            [negative_prompt] * n if isinstance(negative_prompt, str) else negative_prompt)
        return self(ids, np.broadcast_to(images, (n,) + images.shape[1:]), params, prng_seed, neg_prompt_ids=neg,
                    output_type=output_type, **kwargs)

    def __call__(self, prompt_ids, image, params, prng_seed, strength: float = 0.8,
                 num_inference_steps: int = 50, height: Optional[int] = None, width: Optional[int] = None,
                 guidance_scale=7.5, noise=None, neg_prompt_ids=None, return_dict: bool = True,
                 jit: bool = False, *, num_images_per_prompt: int = 1, prompt_embeds=None,
                 negative_prompt_embeds=None, clip_skip: Optional[int] = None, eta: float = 0.0,
                 output_type: str = "np", mesh: Optional[Mesh] = None, ip_adapter_image=None,
                 ip_adapter_image_embeds=None, **hooks):
        """Image to image; `hooks`: the per-step keywords of `CallHooks`."""
        return self._call(locals())


class FlaxStableDiffusionInpaintPipeline(FlaxDiffusionPipeline):
    """Inpainting with 9-channel inpainting UNets or, by latent blending, plain 4-channel UNets."""

    _pipeline_class = "StableDiffusionInpaintPipeline"
    _inputs = {"inpainting": True}
    _callback_tensor_inputs = INPAINT_TENSOR_INPUTS

    def prepare_inputs(self, prompt, image, mask, height: Optional[int] = None, width: Optional[int] = None,
                       return_image: bool = False, padding_mask_crop: Optional[int] = None):
        """(prompt_ids, masked_images, masks) — plus the processed images when `return_image=True`.

        Images become NCHW floats in [-1, 1], masks N1HW in {0, 1} (grayscale, binarised at 0.5) and
        masked_images = images * (masks < 0.5), at height x width (default: the image's size floored to
        a multiple of `vae_scale_factor`). With `padding_mask_crop`, only the mask's padded bounding box is processed
        (see `inpaint`, which also pastes the result back).
        """
        inputs = self._preprocess(image, mask, height, width, padding_mask_crop)
        ids = self.tokenize(prompt)
        n = ids.shape[0]
        arrays = []
        for name, arr in (("masked_image", inputs.masked_image), ("mask", inputs.mask), ("image", inputs.image)):
            if arr.shape[0] not in (1, n):
                raise ValueError(f"{arr.shape[0]} {name}s for {n} prompts; pass one, or one per prompt.")
            arrays.append(np.broadcast_to(arr, (n,) + arr.shape[1:]).copy())
        return (ids, *arrays) if return_image else (ids, *arrays[:2])

    def _preprocess(self, image, mask, height, width, padding_mask_crop):
        if padding_mask_crop is not None:
            if height is None or width is None:
                height, width = self.image_processor.get_default_height_width(image, height, width)
        return preprocess_inpaint(image, mask, height, width, padding_mask_crop,
                                  self.image_processor, self.mask_processor)

    def inpaint(self, prompt, image, mask_image, params, prng_seed, *, negative_prompt=None,
                height: Optional[int] = None, width: Optional[int] = None,
                padding_mask_crop: Optional[int] = None, apply_overlay: bool = False,
                output_type: str = "pil", **kwargs):
        """PyTorch-style convenience: strings and PIL images in, images out (one device).

        `padding_mask_crop` inpaints only the mask's padded bounding box at full resolution and
        pastes it back; `apply_overlay` keeps every unmasked pixel of `image` exactly. Other keyword
        arguments go to `__call__` (num_inference_steps, guidance_scale, strength, latents, ...).
        """
        default_h, default_w = self.default_size()
        height, width = height or default_h, width or default_w
        inputs = self._preprocess(image, mask_image, height, width, padding_mask_crop)
        ids, neg = self._prompt_inputs(prompt, negative_prompt, kwargs)
        n = ids.shape[0]
        rep = lambda a: np.broadcast_to(a, (n,) + a.shape[1:])  # noqa: E731
        out = self(ids, rep(inputs.mask), rep(inputs.masked_image), params, prng_seed,
                   neg_prompt_ids=neg, image=rep(inputs.image), output_type="np", **kwargs)
        images = out.images
        if output_type == "np" and padding_mask_crop is None and not apply_overlay:
            return out
        pil = self.image_processor.numpy_to_pil(images)
        if padding_mask_crop is not None:
            pil = postprocess_inpaint(pil, image, mask_image, inputs.crops_coords, self.image_processor)
        elif apply_overlay:
            pil = [self.image_processor.apply_overlay(mask_image, image, im) for im in pil]
        images = pil if output_type == "pil" else np.stack([np.asarray(p, np.float32) / 255 for p in pil])
        return FlaxStableDiffusionPipelineOutput(images, out.nsfw_content_detected)

    def __call__(self, prompt_ids, mask, masked_image, params, prng_seed, num_inference_steps: int = 50,
                 height: Optional[int] = None, width: Optional[int] = None, guidance_scale=7.5,
                 latents=None, neg_prompt_ids=None, return_dict: bool = True, jit: bool = False, *,
                 image=None, strength: float = 1.0, eta: float = 0.0, num_images_per_prompt: int = 1,
                 prompt_embeds=None, negative_prompt_embeds=None, masked_image_latents=None,
                 clip_skip: Optional[int] = None, output_type: str = "np", mesh: Optional[Mesh] = None,
                 ip_adapter_image=None, ip_adapter_image_embeds=None, **hooks):
        """Inpaint; arguments as diffusers' Flax pipeline, plus PyTorch-pipeline features as keywords
        (`hooks`: the per-step keywords of `CallHooks`: callbacks, progress, early stop, timesteps / sigmas,
        guidance_rescale, cross_attention_kwargs).

        `image` (the unmasked, processed image from `prepare_inputs(..., return_image=True)`, or its
        scaled latents, e.g. another pipeline's output_type="latent") is needed for 4-channel UNets and
        for strength < 1. `masked_image_latents` (scaled, one per prompt) replaces `masked_image`, which
        may then be None.

        `latents` (one per image, unscaled) is the noise the call would otherwise draw from `prng_seed`:
        at strength 1 sampling starts from latents * init_noise_sigma; at strength < 1 from the image
        latents noised with it to the first timestep (scheduler.add_noise), i.e. what diffusers does with
        noise from its generator. diffusers' StableDiffusionInpaintPipeline (0.42) given `latents=`
        instead starts from latents * init_noise_sigma at every strength (at strength < 1 too, from the
        later first timestep), so the image is not in its starting point. Both re-noise a 4-channel
        UNet's unmasked region with this noise.

        IP-Adapter image prompts (after `load_ip_adapter`), as diffusers': `ip_adapter_image`, one PIL image (or
        HWC array, or a list of them) per adapter, the same for every prompt, encoded in the program by the
        pipeline's `image_encoder`; or `ip_adapter_image_embeds`, one array per adapter, [images, D] rows
        (plain) or [images, seq, width] ("plus"), one for every prompt or one per prompt, with CFG the
        negative rows first; unsharded with jit=True too.

        With `jit=True` every batched input (prompt_ids, mask, masked_image, image, per-example
        guidance_scale, latents, ...) needs a leading axis of jax.local_device_count() devices (=
        jax.device_count() on one host) and the same per-device batch. `flax.training.common_utils.shard`
        reshapes to (devices, -1, ...), so the batch must be divisible by the device count (shard itself
        fails with a numpy reshape error otherwise); params go through `flax.jax_utils.replicate` and
        `prng_seed` holds one key per device. With `mesh=`, the global batch must be divisible by the
        mesh's data axis instead.
        """
        return self._call(locals())


def _check_replicated(params, n: int):
    """With jit=True every params leaf needs a leading axis of `n` copies (flax.jax_utils.replicate)."""
    if all(np.shape(leaf)[:1] == (n,) for leaf in jax.tree_util.tree_leaves(params)):
        return
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        if np.shape(leaf)[:1] != (n,):
            raise ValueError(
                f"With jit=True params must be replicated over the {n} local devices: "
                f"params{jax.tree_util.keystr(path)} has shape {np.shape(leaf)}, without a leading axis of {n}. "
                "Use flax.jax_utils.replicate(params).")
