"""Running a model dir's model over inputs: embeddings (``embed``), batched in fixed-size, padded calls.

The commands in ``trace_jax/cli/`` call these; they take arrays and params, never command-line
arguments, so that evaluation code and notebooks can use them too.
"""
