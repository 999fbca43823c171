"""Datasets and input pipelines (no TensorFlow): the embedded `trace_shapes` tfds builder
(`trace_jax.data.shapes`) and the batch iterator (`trace_jax.data.pipeline`). See docs/data.md."""
