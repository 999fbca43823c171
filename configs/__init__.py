"""Experiment configs (``get_config()`` per file, big_vision style); ``common.get_config()`` is the base."""
