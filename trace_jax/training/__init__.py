"""Training: mesh and sharding rules, train state, the jitted step, orbax checkpoints, the loop.

    from trace_jax.training.loop import default_config, train
    state = train(config, workdir)

See docs/training.md.
"""
