"""The embedded synthetic grounding dataset `trace_shapes` (docs/data.md).

render.py draws scenes and their exact ground truth in NumPy; builder.py is the tfds builder
(imported on demand: it pulls in tensorflow_datasets); concepts.json is the concept hierarchy.
"""
from trace_jax.data.shapes.render import (CONCEPTS_PATH, SPLITS, WORD_KINDS, Concepts,  # noqa: F401
                                          generate_example, load_concepts, word_masks)
