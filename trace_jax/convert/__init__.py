"""Weight converters: OpenAI CLIP, OpenCLIP, Hugging Face CLIPModel and CRATE -> trace_jax model dirs.

    from trace_jax.convert import convert
    convert("openai", "ViT-B-16.pt", "models/vit-b-16")      # = trace-jax convert --from openai SRC DST

Modules: ``api`` (``convert``: writes the model dir into a temporary sibling, then renames it into
place), ``openai`` (OpenAI / open_clip key layout), ``openclip`` (hub folders, named configs), ``hf``
(``save_pretrained`` folders), ``crate``, ``common`` (readers, key checks, layout maps),
``torchscript`` (tensors of a TorchScript archive without running its code). The command line is
trace_jax/cli/convert.py. Importing this package does not import torch; only .pt/.bin readers do, lazily.
"""
from trace_jax.convert.api import SOURCES, convert

__all__ = ["SOURCES", "convert"]
