"""transformers' `CLIPVisionModelWithProjection` in Flax: the image encoder of IP-Adapters.

The CLIP vision tower of models/clip.py (the safety checker's too) plus its bias-free `visual_projection`
of the pooled class token. It loads from a diffusers pipeline's `image_encoder` folder (a transformers
folder): the torch key `vision_model.encoder.layers.3.mlp.fc1.weight` is the Flax path
`vision_model/encoder/layers_3/mlp/fc1/kernel`.

Plain IP-Adapters take `image_embeds`; "plus" adapters the penultimate hidden state
(`hidden_states[-2]` with `output_hidden_states=True`), as diffusers' `encode_image` does.
"""
from __future__ import annotations

from typing import Optional, Tuple

import flax
import jax

from flax_inpaint.diffusers_compat import BaseOutput
from flax_inpaint.models.clip import CLIPEncoderConfig, CLIPVisionFields, CLIPVisionTransformer, TransformersCLIPFiles
from flax_inpaint.models.layers import dense
from flax_inpaint.models.modeling import FlaxModelMixin
from flax_inpaint.runtime import Runtime


@flax.struct.dataclass
class FlaxCLIPVisionModelOutput(BaseOutput):
    """image_embeds: [batch, projection_dim], the projected pooled (post-layernormed class) token.
    last_hidden_state: [batch, 1 + patches, hidden], the last layer's output (no final norm).
    hidden_states: with `output_hidden_states=True`, num_hidden_layers + 1 arrays like
      last_hidden_state: the pre-normed embeddings, then each layer's output.
    """

    image_embeds: jax.Array
    last_hidden_state: jax.Array
    hidden_states: Optional[Tuple[jax.Array, ...]] = None


class FlaxCLIPVisionModelWithProjection(TransformersCLIPFiles, FlaxModelMixin, CLIPVisionFields):
    """transformers' `CLIPVisionModelWithProjection`; fields are the `CLIPVisionConfig` keys.

    `encoder.apply({"params": p}, pixel_values, output_hidden_states=False, return_dict=True)` with NCHW
    CLIP pixel values [batch, num_channels, image_size, image_size] (`CLIPImagePreprocessing` in
    models/safety.py makes them from images) -> FlaxCLIPVisionModelOutput.
    """

    projection_dim: int = 512
    runtime: Runtime = Runtime()

    torch_class = "CLIPVisionModelWithProjection"
    fixed_config = {"model_type": ("clip_vision_model",)}
    dummy_inputs = CLIPVisionFields.dummy_inputs

    def setup(self):
        rt = self.runtime
        self.vision_model = CLIPVisionTransformer(
            CLIPEncoderConfig.from_model(self), self.image_size, self.patch_size, rt
        )
        self.visual_projection = dense(self.projection_dim, rt, use_bias=False)

    def __call__(self, pixel_values: jax.Array, output_hidden_states: bool = False, return_dict: bool = True):
        last, pooled, states = self.vision_model(self.to_nhwc(pixel_values, "pixel_values"))
        embeds = self.visual_projection(pooled)
        hidden_states = states if output_hidden_states else None
        if not return_dict:
            return (embeds, last) + ((hidden_states,) if output_hidden_states else ())
        return FlaxCLIPVisionModelOutput(embeds, last, hidden_states)

    @classmethod
    def torch_rename(cls, key: str) -> Optional[str]:
        """`position_ids` is a constant buffer that older transformers versions saved."""
        return None if key.endswith("embeddings.position_ids") else key
