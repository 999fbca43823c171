"""Weight converters: OpenAI CLIP, OpenCLIP and Hugging Face CLIPModel -> trace_jax model dirs.

    trace-jax convert --from openai|openclip|hf|crate SRC DST [--model-name NAME] [--bpe PATH]

Modules: ``openai`` (OpenAI / open_clip key layout), ``openclip`` (hub folders, named configs),
``hf`` (``save_pretrained`` folders), ``common`` (readers, key checks, layout maps), ``cli``.
Importing this package does not import torch; only .pt/.bin readers do, lazily.
"""
