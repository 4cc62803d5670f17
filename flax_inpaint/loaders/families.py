"""The model families a single file may belong to, with what its tensors cannot tell (attention heads, norm
groups, activations, scheduler, tokenizers), as each family's reference diffusers folder has it; and the
built-in CLIP tokenizer those folders use, so that a known family's file loads without any download.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

_SD_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "set_alpha_to_one": False, "steps_offset": 1}
SD_UNET_CHANNELS = (320, 640, 1280, 1280)
SD_VAE_CHANNELS = (128, 256, 512, 512)
# The step count of Stability's SD 2.x 512-base (epsilon) release, which diffusers also reads this way.
SD2_BASE_GLOBAL_STEP = 875000
SD_VAE = {"norm_num_groups": 32, "act_fn": "silu", "scaling_factor": 0.18215}
SD_CONTROLNET_EMBEDDING = (16, 32, 96, 256)
_CLIP_L = {"num_attention_heads": 12, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 768}
_OPENCLIP_BIGG = {"num_attention_heads": 20, "hidden_act": "gelu", "layer_norm_eps": 1e-5}
_SD_UNET = {"norm_num_groups": 32, "norm_eps": 1e-5, "act_fn": "silu", "flip_sin_to_cos": True, "freq_shift": 0}


@dataclasses.dataclass(frozen=True)
class Family:
    """Defaults for what tensors cannot tell, for one known family (as its reference diffusers folder has).

    SDXL families also have `text_encoder_2` (OpenCLIP ViT-bigG with its projection) and `tokenizer_2`; the
    refiner has no `text_encoder` (None)."""

    name: str
    text_width: int  # the cross-attention width that identifies it (with unet_channels)
    unet: Mapping[str, Any]  # non-shape UNet config
    text_encoder: Optional[Mapping[str, Any]]  # non-shape CLIPTextModel config
    tokenizer_pad: Optional[str]  # the reference tokenizer's pad token
    reference: str  # the diffusers repo whose folders these defaults follow
    unet_channels: Tuple[int, ...] = SD_UNET_CHANNELS
    vae: Mapping[str, Any] = dataclasses.field(default_factory=lambda: dict(SD_VAE))  # non-shape VAE config
    text_encoder_2: Optional[Mapping[str, Any]] = None  # non-shape CLIPTextModelWithProjection config
    tokenizer_2_pad: Optional[str] = None

    @property
    def sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    def scheduler(self, in_channels: int, global_step: Optional[int]) -> Dict[str, Any]:
        """The reference scheduler config (SD2's 768-v text-to-image model predicts v; the rest epsilon;
        SDXL's folders hold Euler with "leading" spacing)."""
        if self.sdxl:
            return {"_class_name": "EulerDiscreteScheduler", **_SD_SCHEDULE, "timestep_spacing": "leading",
                    "interpolation_type": "linear", "use_karras_sigmas": False, "prediction_type": "epsilon"}
        if self._v_model(in_channels, global_step):
            return {"_class_name": "DDIMScheduler", **_SD_SCHEDULE, "clip_sample": False,
                    "prediction_type": "v_prediction"}
        return {"_class_name": "PNDMScheduler", **_SD_SCHEDULE, "skip_prk_steps": True, "prediction_type": "epsilon"}

    def image_size(self, in_channels: int, global_step: Optional[int]) -> int:
        if self.sdxl:
            return 1024
        return 768 if self._v_model(in_channels, global_step) else 512

    def _v_model(self, in_channels: int, global_step: Optional[int]) -> bool:
        return self.text_width == 1024 and in_channels == 4 and global_step != SD2_BASE_GLOBAL_STEP


FAMILIES = (
    Family("Stable Diffusion 1.x", 768, unet={"attention_head_dim": 8, **_SD_UNET}, text_encoder=_CLIP_L,
           tokenizer_pad="<|endoftext|>", reference="stable-diffusion-v1-5/stable-diffusion-v1-5"),
    Family("Stable Diffusion 2.x", 1024,
           unet={"attention_head_dim": (5, 10, 20, 20), **_SD_UNET, "upcast_attention": True},
           text_encoder={"num_attention_heads": 16, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
                         "projection_dim": 512},
           tokenizer_pad="!", reference="stabilityai/stable-diffusion-2-1"),
    # SDXL base and its inpainting model (9 input channels, diffusers/stable-diffusion-xl-1.0-inpainting-0.1):
    # 64-wide heads, six size values (original size, crop, target size) of 256-wide sinusoids.
    Family("SDXL", 2048, unet={"attention_head_dim": (5, 10, 20), **_SD_UNET, "addition_time_embed_dim": 256},
           text_encoder=_CLIP_L, tokenizer_pad="<|endoftext|>", reference="stabilityai/stable-diffusion-xl-base-1.0",
           unet_channels=(320, 640, 1280), vae={**SD_VAE, "scaling_factor": 0.13025},
           text_encoder_2=_OPENCLIP_BIGG, tokenizer_2_pad="!"),
    # The refiner: OpenCLIP only, five size values (the aesthetic score instead of the target size).
    Family("SDXL refiner", 1280,
           unet={"attention_head_dim": (6, 12, 24, 24), **_SD_UNET, "addition_time_embed_dim": 256},
           text_encoder=None, tokenizer_pad=None, reference="stabilityai/stable-diffusion-xl-refiner-1.0",
           unet_channels=(384, 768, 1536, 1536), vae={**SD_VAE, "scaling_factor": 0.13025},
           text_encoder_2=_OPENCLIP_BIGG, tokenizer_2_pad="!"),
)


# ----------------------------------------------------------------------------- the built-in tokenizer

CLIP_MERGES = Path(__file__).resolve().parents[1] / "assets" / "clip_bpe_merges.txt.gz"


def _byte_chars() -> List[str]:
    """The characters CLIP's byte-level BPE stands for bytes with (GPT-2's table), in vocabulary order:
    the printable bytes as themselves, then the other bytes as chr(256), chr(257), ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def clip_tokenizer(pad_token: str = "<|endoftext|>", max_length: int = 77):
    """The CLIP ViT-L/14 (and OpenCLIP ViT-H / ViT-bigG) BPE tokenizer, built from the bundled merges list.

    Its vocabulary is CLIP's: the 256 byte characters, the same with the end-of-word mark `</w>`, the
    48894 merges in order, then <|startoftext|> (49406) and <|endoftext|> (49407). SD1 and SDXL's first
    tokenizer pad with <|endoftext|>, SD2 and SDXL's `tokenizer_2` with "!".
    """
    import gzip
    import tempfile

    from transformers import CLIPTokenizer

    merges = gzip.decompress(CLIP_MERGES.read_bytes()).decode("utf-8").splitlines()
    chars = _byte_chars()
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    vocab = {t: i for i, t in enumerate(tokens + ["<|startoftext|>", "<|endoftext|>"])}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        return CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), pad_token=pad_token,
                             model_max_length=max_length)
