"""The web layer of ``trace-jax serve``: a Starlette app over one :class:`~trace_jax.serve.engine.Engine`.

    GET  /                   the page (plain HTML + JS, no external assets)
    GET  /api/info           model name, input size, methods, default classes
    GET  /api/example/{i}    an embedded-dataset example: PNG data URL, caption, phrases
    POST /api/explain        form: image (file), phrases (text, one per line), method (repeated)
    POST /api/invert         form: image (file), boxes (JSON [[x0, y0, x1, y1], ...]), mask (files),
                             classes (text, one per line; empty = the embedded dataset's concepts)
    GET  /api/npz/{id}       the raw maps of a result, as .npz

Uploads are read from the request only (never a path from the client); answers are JSON. Bad input
(an engine ValueError) is a 400 with ``{"error": message}`` that the page shows; anything else is a 500
with the exception's one-line message, and the server keeps serving. The engine's blocking JAX work
runs in Starlette's thread pool, so several requests are in flight at once (the engine serialises
the JAX calls themselves).
"""
from __future__ import annotations

import base64
import json
import logging
import traceback

log = logging.getLogger("trace_jax.serve")


def data_url(png: bytes) -> str:
  return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def make_app(engine):
  from starlette.applications import Starlette
  from starlette.concurrency import run_in_threadpool
  from starlette.datastructures import UploadFile
  from starlette.responses import HTMLResponse, JSONResponse, Response
  from starlette.routing import Route
  from trace_jax.serve.page import PAGE

  def error(status: int, msg: str) -> JSONResponse:
    return JSONResponse({"error": msg}, status_code=status)

  def guarded(handler):
    async def wrapped(request):
      try:
        return await handler(request)
      except (ValueError, KeyError) as e:
        msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        return error(404 if isinstance(e, KeyError) else 400, " ".join(msg.split()) or type(e).__name__)
      except Exception as e:  # a bug of ours: logged with its traceback, the server keeps serving
        log.error("%s %s failed:\n%s", request.method, request.url.path, traceback.format_exc())
        return error(500, f"internal error ({type(e).__name__}: {e})")
    return wrapped

  async def read_upload(form, field: str, what: str) -> bytes:
    f = form.get(field)
    if not isinstance(f, UploadFile):
      raise ValueError(f"no {what}: choose a file or an example first")
    return await f.read()

  async def page(request):
    return HTMLResponse(PAGE)

  async def info(request):
    return JSONResponse(engine.info())

  async def example(request):
    ex = await run_in_threadpool(engine.example, int(request.path_params["index"]))
    from trace_jax.serve.engine import png_bytes
    return JSONResponse({"image": data_url(png_bytes(ex["image"])), "caption": ex["caption"],
                         "phrases": ex["phrases"]})

  async def explain(request):
    form = await request.form()
    try:
      rgb = engine.decode_image(await read_upload(form, "image", "image"))
      phrases = str(form.get("phrases") or "").splitlines()
      methods = [str(m) for m in form.getlist("method")]
    finally:
      await form.close()
    res = await run_in_threadpool(engine.explain, rgb, phrases, methods)
    rid = engine.keep({**res["arrays"], "phrases": res["phrases"], "methods": res["methods"], "image": rgb})
    return JSONResponse({
        "width": res["width"], "height": res["height"], "phrases": res["phrases"], "methods": res["methods"],
        "warnings": res["warnings"], "scores": res["scores"], "tokens": res["tokens"],
        "overlays": {m: [data_url(p) for p in pics] for m, pics in res["overlays"].items()},
        "npz": f"/api/npz/{rid}"})

  async def invert(request):
    form = await request.form(max_files=64)
    try:
      rgb = engine.decode_image(await read_upload(form, "image", "image"))
      raw = str(form.get("boxes") or "[]")
      try:
        boxes = json.loads(raw)
      except json.JSONDecodeError:
        raise ValueError("boxes must be JSON [[x0, y0, x1, y1], ...]") from None
      masks = []
      for f in form.getlist("mask"):
        if isinstance(f, UploadFile):
          masks.append(engine.decode_mask(await f.read(), f.filename or f"#{len(masks) + 1}"))
      classes = [c for c in str(form.get("classes") or "").splitlines() if c.strip()] or None
    finally:
      await form.close()
    res = await run_in_threadpool(engine.invert, rgb, boxes=boxes, masks=masks, classes=classes)
    rid = engine.keep(res["arrays"])
    return JSONResponse({
        "width": res["width"], "height": res["height"], "top": res["top"], "losses": res["losses"],
        "mode": res["mode"], "masks": [data_url(p) for p in res["masks"]],
        "maps": [data_url(p) for p in res["maps"]], "npz": f"/api/npz/{rid}"})

  async def npz(request):
    rid = request.path_params["rid"]
    return Response(engine.result(rid), media_type="application/octet-stream",
                    headers={"Content-Disposition": f'attachment; filename="trace_jax_{rid[:8]}.npz"'})

  routes = [
      Route("/", page),
      Route("/api/info", guarded(info)),
      Route("/api/example/{index:int}", guarded(example)),
      Route("/api/explain", guarded(explain), methods=["POST"]),
      Route("/api/invert", guarded(invert), methods=["POST"]),
      Route("/api/npz/{rid:str}", guarded(npz)),
  ]
  return Starlette(routes=routes)
