"""``trace-jax serve``: a local web page to look at grounding (explain and invert, side by side).

``engine.py`` is the model side (a model dir, explain / MaskInversion on uploaded pixels, overlays at
the upload's resolution), ``app.py`` the Starlette app, ``page.py`` the HTML. A top layer beside
``trace_jax/cli`` (docs/architecture.md): it may import every library layer, and no library layer
imports it. Needs the ``serve`` extra (starlette, uvicorn, python-multipart). docs/serve.md.
"""
