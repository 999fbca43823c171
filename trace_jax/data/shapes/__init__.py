"""The embedded synthetic grounding dataset `trace_shapes` (docs/data.md).

concepts.py reads the concept hierarchy (concepts.json); paint.py draws pixel-exact shapes and
textures; scene.py samples scenes, captions and referring expressions with their exact ground truth
(`generate_example`, `word_masks`); builder.py is the tfds builder (imported on demand: it pulls in
tensorflow_datasets).
"""
