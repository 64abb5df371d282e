"""The HTTP face of the server: FastAPI routes, pydantic request models, 4xx errors naming the field, the page.

  GET  /                      the web page (page.html)
  GET  /api/health            {"ready": true, "compile_seconds", "batch_sizes", "pending"}
  GET  /api/classes           the classes (id, name), grid, image size, K, limits, default settings
  POST /api/generate          {"class": id or name, "n", "seed", "first_index", settings...} -> images (PNG data
                              URLs), codes, the settings used
  POST /api/generate/stream   the same as NDJSON events while it runs: start, progress, image (each as it is
                              ready), done (or error)
  POST /api/encode            multipart `image` -> its codes [grid][grid]
  POST /api/decode            {"codes": [grid][grid]} -> the image
  POST /api/reconstruct       multipart `image` -> the input as encoded (center crop), its codes, the reconstruction

Settings a request leaves out (or sends as null) take the server's defaults (configs/serve.py). Errors are
{"error": "<field>: <what is wrong>", "field": ...} with 413 (upload too large), 415 (not an image) or 422.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.resources
import io
import json
import time

import numpy as np
from fastapi import FastAPI, File, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr

from fvq_jax.evaluation import image_metrics
from fvq_jax.serving.service import RequestError, Service

Number = StrictInt | StrictFloat
UPLOAD_ROUTES = ("/api/encode", "/api/reconstruct")
MULTIPART_OVERHEAD = 64 * 1024  # boundaries and part headers around the image's bytes


class GenerateRequest(BaseModel):
    """Values are checked by the Service (one place per field); the model checks their types."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    class_: StrictInt | StrictStr = Field(alias="class", description="class id or name (GET /api/classes)")
    n: StrictInt = Field(1, description="images, up to serve.max_images")
    seed: StrictInt = 0
    first_index: StrictInt = Field(0, description="the first image is sample `first_index` of the seed")
    cfg_scale: Number | None = None
    cfg_schedule: StrictStr | None = None
    cfg_interval: tuple[Number, Number] | None = None
    temperature: Number | None = None
    top_k: StrictInt | None = None
    top_p: Number | None = None

    def generation(self, service: Service):
        settings = self.model_dump(include={"cfg_scale", "cfg_schedule", "cfg_interval", "temperature", "top_k",
                                            "top_p"})
        return service.generation(self.class_, n=self.n, seed=self.seed, first_index=self.first_index,
                                  settings=settings)


class DecodeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    codes: list[list[StrictInt]] | list[StrictInt]


def png_url(image: np.ndarray) -> str:
    """uint8 [H, W, 3] -> a data: URL of its PNG (lossless: the page shows the exact pixels)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _error(status: int, field: str, message: str, **extra) -> JSONResponse:
    return JSONResponse({"error": f"{field}: {message}", "field": field, **extra}, status_code=status)


def request_error(error: RequestError) -> JSONResponse:
    return _error(error.status, error.field, str(error).split(": ", 1)[1])


def _field(loc) -> str:
    """A pydantic error location as the request field: ("body", "n") -> "n"; a JSON syntax error -> "body"."""
    parts = [str(p) for p in loc[1:] if not isinstance(p, int)] if len(loc) > 1 and loc[0] == "body" else []
    return ".".join(parts) if parts else ".".join(str(p) for p in loc[:1]) or "body"


def make_app(service: Service) -> FastAPI:
    app = FastAPI(title="fvq_jax GPT sampler", summary="Class-conditional images from a GPT and its tokenizer")
    page = importlib.resources.files("fvq_jax.serving").joinpath("page.html").read_text()

    @app.middleware("http")
    async def refuse_large_uploads(request: Request, call_next):
        # Before the body is read: FastAPI parses (and spools) a multipart body before the route can look at it.
        length = request.headers.get("content-length", "")
        if request.url.path in UPLOAD_ROUTES and length.isdigit() and \
                int(length) > service.max_upload_bytes + MULTIPART_OVERHEAD:
            return request_error(service.upload_too_large())
        return await call_next(request)

    @app.exception_handler(RequestError)
    async def handle_request_error(_: Request, error: RequestError):
        return request_error(error)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, error: RequestValidationError):
        first = error.errors()[0]
        if first["type"] == "json_invalid":
            return _error(422, "body", f"malformed JSON ({first.get('ctx', {}).get('error', first['msg'])})")
        field = _field(first["loc"])
        return _error(422, field.replace("class_", "class"), first["msg"],
                      detail=[dict(field=_field(e["loc"]), message=e["msg"]) for e in error.errors()])

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return page

    @app.get("/api/health")
    async def health():
        return dict(ready=service.compile_seconds is not None, compile_seconds=service.compile_seconds,
                    batch_sizes=list(service.batcher.batch_sizes), pending=service.batcher.pending())

    @app.get("/api/classes")
    async def classes():
        return service.info()

    @app.post("/api/generate")
    async def generate(request: GenerateRequest):
        generation = request.generation(service)
        start = time.perf_counter()
        codes, images = await asyncio.wrap_future(service.submit(generation).future)
        return dict(generation.record(service.class_names), codes=codes.tolist(),
                    images=[png_url(image) for image in images], seconds=time.perf_counter() - start)

    @app.post("/api/generate/stream")
    async def generate_stream(request: GenerateRequest):
        generation = request.generation(service)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        start = time.perf_counter()
        service.submit(generation, lambda kind, payload: loop.call_soon_threadsafe(events.put_nowait, (kind, payload)))

        async def lines():
            yield json.dumps(dict(event="start", **generation.record(service.class_names))) + "\n"
            while True:
                kind, payload = await events.get()
                if kind == "progress":
                    yield json.dumps(dict(event="progress", fraction=payload)) + "\n"
                elif kind == "images":
                    for slot, codes, image in payload:
                        yield json.dumps(dict(event="image", slot=slot, index=generation.first_index + slot,
                                              codes=codes.tolist(), image=png_url(image))) + "\n"
                else:
                    done = dict(event=kind, seconds=time.perf_counter() - start)
                    yield json.dumps(done if kind == "done" else dict(done, error=str(payload))) + "\n"
                    return

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    async def upload(image: UploadFile) -> np.ndarray:
        return service.image(await image.read(service.max_upload_bytes + 1))

    @app.post("/api/encode")
    async def encode(image: UploadFile = File(...)):
        codes = await asyncio.to_thread(service.encode, await upload(image))
        return dict(codes=codes.reshape(service.painter.grid, -1).tolist())

    @app.post("/api/decode")
    async def decode(request: DecodeRequest):
        image = await asyncio.to_thread(service.decode, service.codes(request.codes))
        return dict(image=png_url(image))

    @app.post("/api/reconstruct")
    async def reconstruct(image: UploadFile = File(...)):
        pixels = await upload(image)
        codes = await asyncio.to_thread(service.encode, pixels)
        reconstruction = await asyncio.to_thread(service.decode, codes)
        psnr = float(image_metrics.psnr(pixels[None], reconstruction[None], data_range=255.0)[0])
        return dict(input=png_url(pixels), reconstruction=png_url(reconstruction),
                    codes=codes.reshape(service.painter.grid, -1).tolist(),
                    psnr=psnr if np.isfinite(psnr) else None)  # identical images: no finite PSNR (JSON has no inf)

    return app
