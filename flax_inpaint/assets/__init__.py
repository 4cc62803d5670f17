"""Bundled data: the tiny shapes models (diffusers-format folders) and the demo image and mask."""
