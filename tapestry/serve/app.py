"""The HTTP app: the native Document endpoint, OpenAI-compatible endpoints, operations, a page.

    POST /v1/documents            Document (or markup + images) in, generated Document out; SSE with "stream"
    POST /v1/images/generations   OpenAI images API: prompt -> data[].b64_json (stream + partial_images)
    POST /v1/images/edits         multipart image / image[] + prompt: the images are the prompt's references
    POST /v1/chat/completions     content parts (text, image_url) in and out, streamed as chunks
    GET  /v1/models   /healthz   /metrics   /

The app knows a pipeline only through `tapestry.infer` (stream, options, decode_latents), never
which model family is behind it.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.datastructures import UploadFile

from tapestry.document import Document, ImageSegment
from tapestry.infer.events import Done, Error
from tapestry.serve.inputs import (
    APIError, ServeLimits, apply_defaults, b64, bad, check_options, data_uri, decode_bytes, decode_data_uri,
    document_from_json, document_from_markup, document_to_json, parse_size, prompt_with_references,
)
from tapestry.serve.metrics import Metrics
from tapestry.serve.scheduler import Job, QueueFull, Scheduler, ShuttingDown, request_id

log = logging.getLogger("tapestry.serve")
_PID = str(os.getpid()).encode()


@dataclass
class ServeConfig:
    limits: ServeLimits = ServeLimits()
    batching: bool = True
    api_key: str | None = None
    max_wait_s: float = 0.02  # how long a step waits for the other live generations to join its batch
    grace_s: float = 10.0  # on shutdown: how long running generations may finish


class _Disconnected(Exception):
    pass


def model_id(pipeline) -> str:
    name = str(getattr(pipeline, "checkpoint", "default")).rstrip("/").split("/")[-1] or "default"
    return f"tapestry-{name}"


# ------------------------------------------------------------------------- middleware
class Gate:
    """Pure ASGI (so streaming and client disconnects pass straight through): a request id, the
    API key, the body limit, then one structured log line and the metrics when the answer ends."""

    def __init__(self, app, max_bytes: int, api_key: str | None, metrics: Metrics):
        self.app, self.max_bytes, self.api_key, self.metrics = app, max_bytes, api_key, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers", []))
        rid = headers.get(b"x-request-id", b"").decode("latin-1")[:64] or request_id()
        scope.setdefault("state", {})["rid"] = rid
        t0 = time.perf_counter()
        status = 0

        async def send_logged(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = dict(message)
                # x-tapestry-replica: which process answered (replicas behind Ray Serve's proxy)
                message["headers"] = list(message.get("headers", [])) + [(b"x-request-id", rid.encode()),
                                                                         (b"x-tapestry-replica", _PID)]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                self._record(scope, status, t0, rid)

        path = scope.get("path", "")
        if self.api_key and path.startswith("/v1/"):
            given = headers.get(b"authorization", b"").decode("latin-1")
            token = given[7:] if given.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                return await _send_error(send_logged, APIError(
                    401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                    type="authentication_error", code="invalid_api_key"))
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await _send_error(send_logged, APIError(
                413, f"request body of {int(length)} bytes exceeds the limit of {self.max_bytes} bytes",
                code="body_too_large"))
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise APIError(413, f"request body exceeds the limit of {self.max_bytes} bytes",
                                   code="body_too_large")
            return message

        try:
            await self.app(scope, limited, send_logged)
        except APIError as e:
            if status:  # the answer had begun: nothing more can be said
                raise
            await _send_error(send_logged, e)

    def _record(self, scope, status: int, t0: float, rid: str) -> None:
        route = scope.get("route")
        endpoint = getattr(route, "path", None) or "other"
        seconds = time.perf_counter() - t0
        self.metrics.requests.labels(endpoint, str(status)).inc()
        self.metrics.latency.labels(endpoint).observe(seconds)
        log.info(json.dumps({"request_id": rid, "method": scope.get("method"), "path": scope.get("path"),
                             "status": status, "seconds": round(seconds, 4)}))


async def _send_error(send, error: APIError):
    body = json.dumps(error.body()).encode()
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                + [(k.lower().encode(), str(v).encode()) for k, v in error.headers.items()]})
    await send({"type": "http.response.body", "body": body})


# ----------------------------------------------------------------------------- app
def create_app(pipeline, config: ServeConfig | None = None) -> FastAPI:
    config = config or ServeConfig()
    limits = config.limits
    metrics = Metrics()
    scheduler = Scheduler(pipeline, limits.max_batch, limits.max_queue, config.batching, metrics, config.max_wait_s)
    metrics.batches.scheduler = scheduler
    served_model = model_id(pipeline)
    started_at = time.time()

    @asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.get_running_loop().run_in_executor(None, scheduler.close, config.grace_s)

    app = FastAPI(title="tapestry", version="0.1.0", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.scheduler, app.state.metrics, app.state.pipeline = scheduler, metrics, pipeline
    app.add_middleware(Gate, max_bytes=limits.max_body_bytes, api_key=config.api_key, metrics=metrics)

    # ---------------------------------------------------------------- errors
    def error_response(error: APIError, rid: str = "") -> JSONResponse:
        headers = dict(error.headers)
        if rid:
            headers["x-request-id"] = rid
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc, getattr(request.state, "rid", ""))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = {404: f"no such endpoint: {request.method} {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return error_response(APIError(exc.status_code, message, code=kind))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", [])[1:]) or None
        return error_response(APIError(400, first.get("msg", "invalid request"), param))

    # ----------------------------------------------------------- generation
    async def start(request: Request, docs: list[tuple[Document, dict]], preview_steps: frozenset = frozenset()
                    ) -> list[Job]:
        loop = asyncio.get_running_loop()
        jobs = [Job(doc, options, loop, request.state.rid, preview_steps) for doc, options in docs]
        try:
            scheduler.submit(jobs)
        except QueueFull:
            metrics.rejected.inc()
            raise APIError(429, f"the server is at capacity ({limits.max_batch} running, {limits.max_queue} "
                                "waiting); retry after a moment", type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        except ShuttingDown:
            raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down") from None
        return jobs

    async def events(job: Job, request: Request, deadline: float) -> AsyncIterator[Any]:
        """The job's events; cancels it when the client goes away or the deadline passes."""
        loop = asyncio.get_running_loop()
        finished = False
        try:
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise APIError(504, f"the request took longer than {limits.timeout_s:g} s and was cancelled",
                                   type="timeout_error", code="timeout")
                try:
                    item = await asyncio.wait_for(job.next(), timeout=min(remaining, 0.25))
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        raise _Disconnected() from None
                    continue
                if item is None:
                    finished = True
                    return
                _count(item)
                yield item
        finally:
            if not finished:
                job.cancel()
                metrics.cancelled.inc()

    def _count(event) -> None:
        if event.type == "text_delta":
            pass
        elif event.type == "image_progress":
            metrics.steps.inc()
        elif event.type == "image_done":
            metrics.images.inc()
        elif event.type == "done":
            metrics.tokens.inc(event.document.meta.get("generation", {}).get("new_tokens", 0))

    def deadline() -> float:
        return asyncio.get_running_loop().time() + limits.timeout_s

    def failure(event: Error) -> APIError:
        internal = event.message.startswith("internal error")
        return APIError(500 if internal else 400, event.message, type="server_error" if internal else
                        "invalid_request_error", code="generation_failed")

    async def result(job: Job, request: Request, until: float) -> Done:
        done = None
        async for event in events(job, request, until):
            if isinstance(event, Error):
                raise failure(event)
            if isinstance(event, Done):
                done = event
        if done is None:
            raise APIError(500, "generation ended without a result", type="server_error")
        return done

    def sse(event: str | None, data: Any) -> bytes:
        head = f"event: {event}\n" if event else ""
        return (head + "data: " + (data if isinstance(data, str) else json.dumps(data)) + "\n\n").encode()

    def streaming(body: AsyncIterator[bytes]) -> StreamingResponse:
        return StreamingResponse(body, media_type="text/event-stream",
                                 headers={"cache-control": "no-cache", "x-accel-buffering": "no"})

    async def guarded(body: AsyncIterator[bytes], on_error: Callable[[APIError], bytes]) -> AsyncIterator[bytes]:
        """A stream that ends with an error event instead of a broken connection."""
        try:
            async for chunk in body:
                yield chunk
        except APIError as e:
            yield on_error(e)
        except _Disconnected:
            return

    # --------------------------------------------------------------- bodies
    async def json_body(request: Request) -> dict:
        try:
            body = await request.json()
        except APIError:
            raise
        except (ValueError, UnicodeDecodeError):
            raise bad("the body is not valid JSON", None, "invalid_json") from None
        if not isinstance(body, dict):
            raise bad("the body must be a JSON object", None, "invalid_json")
        return body

    async def form_body(request: Request) -> tuple[dict, list[UploadFile]]:
        try:
            form = await request.form(max_files=limits.max_images_in + 2, max_fields=64)
        except APIError:
            raise
        except Exception as e:  # noqa: BLE001 - the multipart parser's many errors: one clear answer
            raise bad(f"the body is not valid multipart form data: {e}", None, "invalid_multipart") from None
        fields: dict = {}
        files: list[UploadFile] = []
        for key, value in form.multi_items():
            if isinstance(value, UploadFile) or hasattr(value, "read"):
                if key not in ("image", "image[]", "images", "images[]", "mask"):
                    raise bad(f"unexpected file field {key!r} (images go in 'image' or 'image[]')", key)
                if key == "mask":
                    raise bad("masks are not supported: the images are the prompt's references", "mask",
                              "unsupported_parameter")
                files.append(value)
            else:
                fields[key] = value
        if len(files) > limits.max_images_in:
            raise bad(f"{len(files)} images exceed the limit of {limits.max_images_in} per request", "image")
        return fields, files

    async def read_images(files: list[UploadFile], param: str = "image") -> list:
        images = []
        for k, upload in enumerate(files):
            data = await upload.read(limits.max_image_bytes + 1)
            if len(data) > limits.max_image_bytes:
                raise bad(f"{param}[{k}] exceeds the limit of {limits.max_image_bytes} bytes", f"{param}[{k}]")
            images.append(decode_bytes(data, f"{param}[{k}]", limits))
        return images

    def check_model(value: Any) -> None:
        if value is not None and value != served_model:
            raise APIError(404, f"the model {value!r} does not exist here; this server serves {served_model!r} "
                                "(GET /v1/models)", param="model", code="model_not_found")

    # ================================================================ routes
    @app.get("/healthz")
    async def healthz():
        return {"status": "shutting_down" if scheduler.closed else "ok", "model": served_model,
                "checkpoint_hash": getattr(pipeline, "checkpoint_hash", None), "batching": scheduler.batching,
                "uptime_s": round(time.time() - started_at, 1), "pid": os.getpid(), **scheduler.stats()}

    @app.get("/metrics")
    async def metrics_endpoint():
        return Response(metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served_model, "object": "model", "created": int(started_at),
                                            "owned_by": "tapestry"}]}

    @app.get("/v1/models/{name}")
    async def model(name: str):
        check_model(name)
        return {"id": served_model, "object": "model", "created": int(started_at), "owned_by": "tapestry"}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(resources.files("tapestry.serve").joinpath("page.html").read_text(encoding="utf-8"))

    # ------------------------------------------------------------ native
    NATIVE_KEYS = {"document", "markup", "images", "options", "stream", "preview"}

    @app.post("/v1/documents")
    async def documents(request: Request):
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            fields, files = await form_body(request)
            body: dict = {}
            for key, value in fields.items():
                if key in ("document", "options"):
                    try:
                        body[key] = json.loads(value)
                    except ValueError:
                        raise bad(f"the form field {key!r} is not valid JSON", key) from None
                else:
                    body[key] = value
            for key in ("stream",):
                if key in body:
                    body[key] = str(body[key]).lower() == "true"
            if "preview" in body:
                body["preview"] = _int(body["preview"], "preview")
            uploaded = await read_images(files)
        else:
            body, uploaded = await json_body(request), []
        for key in body:
            if key not in NATIVE_KEYS:
                raise bad(f"unknown field {key!r} (allowed: {', '.join(sorted(NATIVE_KEYS))})", key,
                          "unknown_parameter")
        if ("document" in body) == ("markup" in body):
            raise bad("give exactly one of 'document' (a Document object) or 'markup' (text with [imgK] slots)",
                      "document")
        if "document" in body:
            if body.get("images") or uploaded:
                raise bad("images go inside the Document (as data URIs in 'src'); 'images' is for markup", "images")
            doc = document_from_json(body["document"], limits)
        else:
            raw_images = body.get("images", [])
            if isinstance(raw_images, dict):
                images: Any = {name: decode_data_uri(v, f"images.{name}", limits) for name, v in raw_images.items()}
                if uploaded:
                    raise bad("give images as data URIs or as files, not both", "images")
            elif isinstance(raw_images, list):
                images = [decode_data_uri(v, f"images[{k}]", limits) for k, v in enumerate(raw_images)] + uploaded
            else:
                raise bad("'images' must be a list of data URIs or an object name -> data URI", "images")
            doc = document_from_markup(body["markup"], images, limits)
        options = apply_defaults(pipeline, check_options(body.get("options", {}), limits), limits)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise bad("'stream' must be true or false", "stream")
        preview = body.get("preview", 0)
        if isinstance(preview, bool) or not isinstance(preview, int) or preview < 0:
            raise bad("'preview' must be a whole number of steps between previews (0: none)", "preview")
        steps = pipeline.options(**options).steps
        preview_steps = frozenset(range(preview, steps, preview)) if preview else frozenset()
        until = deadline()
        (job,) = await start(request, [(doc, options)], preview_steps)
        rid = request.state.rid
        if not stream:
            done = await result(job, request, until)
            return {"id": rid, "object": "document", "document": document_to_json(done.document),
                    "stop_reason": done.stop_reason, "timings": _rounded(done.timings),
                    "generation": done.document.meta.get("generation", {})}

        async def body_stream():
            async for event in events(job, request, until):
                data = {"type": event.type}
                if event.type == "text_delta":
                    data.update(text=event.text, segment=event.segment)
                elif event.type == "image_started":
                    data.update(index=event.index, segment=event.segment, height=event.height, width=event.width,
                                steps=event.steps)
                elif event.type == "image_progress":
                    data.update(index=event.index, step=event.step, steps=event.steps)
                    if getattr(event, "preview", None) is not None:
                        small = event.preview.copy()
                        small.thumbnail((32, 32))
                        data["preview"] = data_uri(small)
                elif event.type == "image_done":
                    data.update(index=event.index, segment=event.segment, image=data_uri(event.image),
                                width=event.image.width, height=event.image.height)
                elif event.type == "done":
                    data.update(id=rid, document=document_to_json(event.document), stop_reason=event.stop_reason,
                                timings=_rounded(event.timings))
                elif event.type == "error":
                    error = failure(event)
                    data.update(error=error.body()["error"])
                yield sse(event.type, data)

        return streaming(guarded(body_stream(), lambda e: sse("error", {"type": "error", "error": e.body()["error"]})))

    # ------------------------------------------------------------ images
    # OpenAI's fields this server honours (user and moderation are accepted: they change nothing
    # here), then tapestry's own generation options.
    IMAGE_KEYS = {"prompt", "model", "n", "size", "response_format", "stream", "partial_images", "output_format",
                  "quality", "background", "moderation", "user", "seed", "steps", "guidance", "guidance_scales",
                  "shift"}

    def images_request(body: dict, edit: bool) -> tuple[dict, dict]:
        for key in body:
            if key not in IMAGE_KEYS:
                raise bad(f"unsupported parameter {key!r} (this server takes: {', '.join(sorted(IMAGE_KEYS))})",
                          key, "unsupported_parameter")
        if body.get("moderation") not in (None, "auto", "low"):
            raise bad("moderation must be 'auto' or 'low'", "moderation")
        check_model(body.get("model"))
        if body.get("response_format") not in (None, "b64_json"):
            raise bad("response_format must be 'b64_json': this server returns images inline, never as URLs",
                      "response_format", "unsupported_value")
        fmt = body.get("output_format") or "png"
        if fmt not in ("png", "jpeg", "webp"):
            raise bad(f"output_format must be png, jpeg or webp, got {fmt!r}", "output_format")
        if body.get("background") not in (None, "auto", "opaque"):
            raise bad("background must be 'auto' or 'opaque': this model draws no transparency", "background",
                      "unsupported_value")
        if body.get("quality") not in (None, "auto"):
            raise bad("quality must be 'auto' (use 'steps' for more or fewer denoising steps)", "quality",
                      "unsupported_value")
        n = body.get("n") or 1
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= limits.max_n:
            raise bad(f"n must be between 1 and {limits.max_n}", "n")
        partial = body.get("partial_images") or 0
        if isinstance(partial, bool) or not isinstance(partial, int) or not 0 <= partial <= 3:
            raise bad("partial_images must be between 0 and 3", "partial_images")
        stream = body.get("stream") or False
        if not isinstance(stream, bool):
            raise bad("'stream' must be true or false", "stream")
        raw_options = {k: body[k] for k in ("seed", "steps", "guidance", "guidance_scales", "shift") if k in body}
        options = apply_defaults(pipeline, check_options(raw_options, limits, ""), limits)
        options["max_new_tokens"] = 0  # the images API draws the target; it writes no text
        spec = dict(n=n, partial=partial, stream=stream, fmt=fmt, size=parse_size(body.get("size"), limits))
        return spec, options

    async def images_answer(request: Request, spec: dict, options: dict, doc: Document, prefix: str):
        seed = pipeline.options(**options).seed
        steps = pipeline.options(**options).steps
        partial = spec["partial"]
        # partial images at evenly spaced steps before the last (the last is the completed image)
        preview_steps = frozenset(max(1, round(steps * (k + 1) / (partial + 1))) for k in range(partial)
                                  if round(steps * (k + 1) / (partial + 1)) < steps) if partial else frozenset()
        docs = [(doc.copy(), {**options, "seed": seed + i}) for i in range(spec["n"])]
        until = deadline()
        jobs = await start(request, docs, preview_steps)
        fmt = spec["fmt"]
        text_tokens = _count_tokens(pipeline, doc)
        usage = {"input_tokens": text_tokens, "input_tokens_details": {"image_tokens": 0, "text_tokens": text_tokens},
                 "output_tokens": 0, "total_tokens": text_tokens}

        def target_image(done: Done):
            return next(s.image for s in done.document.segments if isinstance(s, ImageSegment) and s.role == "target")

        if not spec["stream"]:
            try:
                dones = [await result(job, request, until) for job in jobs]
            finally:
                for job in jobs:
                    job.cancel()  # a failed sibling: the rest need not finish
            images = [target_image(d) for d in dones]
            return {"created": int(time.time()), "data": [{"b64_json": b64(im, fmt)} for im in images],
                    "background": "opaque", "output_format": fmt, "size": f"{images[0].width}x{images[0].height}",
                    "usage": usage}

        async def body_stream():
            try:
                index = 0
                for job in jobs:
                    async for event in events(job, request, until):
                        if isinstance(event, Error):
                            raise failure(event)
                        common = {"created_at": int(time.time()), "background": "opaque", "quality": "auto",
                                  "output_format": fmt}
                        if event.type == "image_progress" and getattr(event, "preview", None) is not None:
                            im = event.preview
                            yield sse(f"{prefix}.partial_image", {
                                "type": f"{prefix}.partial_image", "b64_json": b64(im, fmt), **common,
                                "size": f"{im.width}x{im.height}", "partial_image_index": index})
                            index += 1
                        elif event.type == "done":
                            im = target_image(event)
                            yield sse(f"{prefix}.completed", {
                                "type": f"{prefix}.completed", "b64_json": b64(im, fmt), **common,
                                "size": f"{im.width}x{im.height}", "usage": usage})
            finally:
                for job in jobs:
                    job.cancel()

        return streaming(guarded(body_stream(), lambda e: sse("error", e.body())))

    @app.post("/v1/images/generations")
    async def images_generations(request: Request):
        body = await json_body(request)
        if "prompt" not in body:
            raise bad("missing required parameter 'prompt'", "prompt", "missing_required_parameter")
        spec, options = images_request(body, edit=False)
        doc = prompt_with_references(body["prompt"], [], limits, spec["size"])
        return await images_answer(request, spec, options, doc, "image_generation")

    @app.post("/v1/images/edits")
    async def images_edits(request: Request):
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise bad("images/edits takes multipart/form-data (image or image[] files + prompt)", None,
                      "invalid_content_type")
        fields, files = await form_body(request)
        body: dict = {}
        for key, value in fields.items():
            if key in ("n", "partial_images", "seed", "steps"):
                body[key] = _int(value, key)
            elif key == "shift":
                body[key] = _float(value, key)
            elif key == "stream":
                body[key] = str(value).lower() == "true"
            elif key == "guidance_scales":
                try:
                    body[key] = json.loads(value)
                except ValueError:
                    raise bad("guidance_scales must be a JSON object", key) from None
            else:
                body[key] = value
        if not files:
            raise bad("missing required parameter 'image' (one or more image files)", "image",
                      "missing_required_parameter")
        if "prompt" not in body:
            raise bad("missing required parameter 'prompt'", "prompt", "missing_required_parameter")
        spec, options = images_request(body, edit=True)
        images = await read_images(files)
        doc = prompt_with_references(body["prompt"], images, limits, spec["size"])
        return await images_answer(request, spec, options, doc, "image_edit")

    # -------------------------------------------------------------- chat
    CHAT_KEYS = {"model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens",
                 "temperature", "top_p", "seed", "n", "user", "steps", "guidance", "guidance_scales",
                 "max_images", "image_size"}

    def chat_document(messages: Any) -> Document:
        if not isinstance(messages, list) or not messages:
            raise bad("'messages' must be a non-empty list", "messages")
        pieces: list[str] = []
        images: list = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in ("system", "developer", "user", "assistant"):
                raise bad("each message needs a role: system, developer, user or assistant", f"messages[{i}].role")
            for key in message:
                if key not in ("role", "content", "name"):
                    raise bad(f"unsupported message field {key!r}", f"messages[{i}].{key}", "unsupported_parameter")
            content = message.get("content")
            if isinstance(content, str):
                pieces.append(content)
                continue
            if not isinstance(content, list):
                raise bad("content must be a string or a list of parts", f"messages[{i}].content")
            for j, part in enumerate(content):
                param = f"messages[{i}].content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    pieces.append(part["text"])
                elif kind == "image_url":
                    url = part.get("image_url")
                    url = url.get("url") if isinstance(url, dict) else url
                    images.append(decode_data_uri(url, f"{param}.image_url.url", limits))
                    if len(images) > limits.max_images_in:
                        raise bad(f"more than {limits.max_images_in} images in one request", param)
                    pieces.append(f"[img{len(images)}]")
                else:
                    raise bad("content parts are {'type': 'text', 'text': ...} or "
                              "{'type': 'image_url', 'image_url': {'url': 'data:...'}}", param,
                              "unsupported_parameter")
        return document_from_markup(" ".join(p.strip() for p in pieces if p.strip()), images, limits, "messages")

    def answer_parts(done: Done, prompt_segments: int) -> list[dict]:
        doc = done.document
        parts: list[dict] = []
        for item, index in doc.reading_order_with_segments():
            if index < prompt_segments:
                continue
            if isinstance(item, str):
                if parts and parts[-1]["type"] == "text":
                    parts[-1]["text"] += item
                else:
                    parts.append({"type": "text", "text": item})
            elif item.image is not None:
                parts.append({"type": "image_url", "image_url": {"url": data_uri(item.image)}})
        return parts

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await json_body(request)
        for key in body:
            if key not in CHAT_KEYS:
                raise bad(f"unsupported parameter {key!r} (this server takes: {', '.join(sorted(CHAT_KEYS))})",
                          key, "unsupported_parameter")
        check_model(body.get("model"))
        if body.get("n") not in (None, 1):
            raise bad("n must be 1", "n")
        stream = body.get("stream") or False
        if not isinstance(stream, bool):
            raise bad("'stream' must be true or false", "stream")
        stream_options = body.get("stream_options") or {}
        if not isinstance(stream_options, dict) or set(stream_options) - {"include_usage"}:
            raise bad("stream_options takes only include_usage", "stream_options", "unsupported_parameter")
        raw = {k: body[k] for k in ("temperature", "top_p", "seed", "steps", "guidance", "guidance_scales",
                                    "max_images", "image_size") if k in body}
        budget = body.get("max_completion_tokens", body.get("max_tokens"))
        if budget is not None:
            raw["max_new_tokens"] = budget
        options = apply_defaults(pipeline, check_options(raw, limits, ""), limits)
        doc = chat_document(body.get("messages"))
        prompt_segments = len(doc.segments)
        until = deadline()
        (job,) = await start(request, [(doc, options)])
        rid = request.state.rid
        chat_id = f"chatcmpl-{rid}"
        created = int(time.time())
        prompt_tokens = _count_tokens(pipeline, doc)

        def usage(done: Done) -> dict:
            completion = done.document.meta.get("generation", {}).get("new_tokens", 0)
            return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                    "total_tokens": prompt_tokens + completion}

        def finish(done: Done) -> str:
            return "length" if done.stop_reason == "max_tokens" else "stop"

        if not stream:
            done = await result(job, request, until)
            parts = answer_parts(done, prompt_segments)
            content: Any = parts
            if all(p["type"] == "text" for p in parts):  # text only: the plain string every client reads
                content = "".join(p["text"] for p in parts)
            return {"id": chat_id, "object": "chat.completion", "created": created, "model": served_model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                 "finish_reason": finish(done), "logprobs": None}],
                    "usage": usage(done), "system_fingerprint": getattr(pipeline, "checkpoint_hash", None)}

        def chunk(delta: dict, finish_reason: str | None = None) -> bytes:
            return sse(None, {"id": chat_id, "object": "chat.completion.chunk", "created": created,
                              "model": served_model, "choices": [{"index": 0, "delta": delta,
                                                                  "finish_reason": finish_reason, "logprobs": None}]})

        async def body_stream():
            yield chunk({"role": "assistant", "content": ""})
            images = 0
            async for event in events(job, request, until):
                if isinstance(event, Error):
                    raise failure(event)
                if event.type == "text_delta":
                    yield chunk({"content": event.text})
                elif event.type == "image_done":
                    yield chunk({"images": [{"index": images, "type": "image_url",
                                             "image_url": {"url": data_uri(event.image)}}]})
                    images += 1
                elif event.type == "done":
                    yield chunk({}, finish(event))
                    if stream_options.get("include_usage"):
                        yield sse(None, {"id": chat_id, "object": "chat.completion.chunk", "created": created,
                                         "model": served_model, "choices": [], "usage": usage(event)})
            yield sse(None, "[DONE]")

        return streaming(guarded(body_stream(), lambda e: sse(None, e.body()) + sse(None, "[DONE]")))

    return app


# --------------------------------------------------------------------------- helpers
def _int(value: Any, param: str) -> int:
    try:
        return int(str(value))
    except ValueError:
        raise bad(f"{param} must be a whole number, got {value!r}", param) from None


def _float(value: Any, param: str) -> float:
    try:
        return float(str(value))
    except ValueError:
        raise bad(f"{param} must be a number, got {value!r}", param) from None


def _rounded(timings: dict) -> dict:
    return {k: round(v, 4) for k, v in timings.items()}


def _count_tokens(pipeline, doc: Document) -> int:
    """Text tokens of the prompt, when the pipeline's tokenizer can say (usage fields)."""
    tokenizer = getattr(getattr(pipeline, "engine", None), "tokenizer", None)
    if tokenizer is None:
        return 0
    return sum(len(tokenizer.encode(text)) for text in (t.text for t in doc.texts()))
