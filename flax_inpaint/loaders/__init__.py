"""Loaders for what users have besides diffusers folders: single-file checkpoints in the original
Stable Diffusion layout, LoRA adapters, textual-inversion embeddings and IP-Adapters.

Each module is pure functions over state dicts, params and tokenizers; the pipelines' and models'
`from_single_file`, `load_lora_weights`, `set_adapters`, `fuse_lora`, ... and `load_textual_inversion`
are thin methods over them.
"""
