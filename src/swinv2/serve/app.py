"""The HTTP side of `swinv2 serve`: a Starlette app over a `service.Classifier`.

  POST /v1/predict   an image (multipart field `file`, or the raw body) -> top-k JSON
  GET  /             the web page (`page.html`: drop an image, see its top-5)
  GET  /health       200 {"status": "ready"} once the model is loaded and warmed up; 503 while loading,
                     after a failed load and while draining
  GET  /health/live  200 while the process serves HTTP at all (liveness)
  GET  /v1/model     the model card: name, classes, preprocessing, runtime, precision, batching
  GET  /metrics      Prometheus text (`metrics.ServerMetrics`)

Every refusal is JSON `{"error": "<one line>", "status": N}`, and the server goes on serving:

  400 a malformed multipart body      413 a body over --max-body-mb
  415 bytes that are not an image     422 an unusable image (empty, truncated, a decompression bomb),
                                          a bad ?topk=
  503 the queue is full (--queue requests in progress), the model is still loading, or the server is
      draining; with Retry-After      504 no answer within --timeout-s

Why these bounds hold memory: at most `queue` predictions are admitted at once (decoding, waiting or
in the model), each with a body of at most `max_body_bytes`; decoding holds at most `workers` images of
at most `max_pixels`. Bodies are read and counted before they are parsed, so a client that declares
no length cannot send more either.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from .decode import UploadError
from .metrics import CONTENT_TYPE, ServerMetrics
from .runtime import Runtime
from .service import Classifier

log = logging.getLogger(__name__)

PREDICT = "/v1/predict"
ENDPOINTS = (PREDICT, "/", "/health", "/health/live", "/v1/model", "/metrics")
RETRY_AFTER_S = 1


@dataclass(frozen=True)
class Limits:
    """The bounds of the HTTP side (the `swinv2 serve` options of the same names)."""

    queue: int = 64
    max_body_bytes: int = 20 * 1024 * 1024
    timeout_s: float = 30.0


class HTTPError(Exception):
    """A request refused with `status` and a one-line `reason`."""

    def __init__(self, status: int, reason: str, *, retry: bool = False) -> None:
        super().__init__(reason)
        self.status, self.reason, self.retry = status, reason, retry


def error_response(status: int, reason: str, *, retry: bool = False) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if retry else None
    return JSONResponse({"error": reason, "status": status}, status_code=status, headers=headers)


def _page() -> str:
    return resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8")


class ServeApp:
    """The app (`.app`, an ASGI app) with its state: the classifier, the limits, the metrics, whether it
    is draining. The lifespan's startup loads the model in a thread (`runtime` given: that one, else
    `load_runtime`), so `/health` answers 503 meanwhile; its shutdown lets the queue run dry."""

    def __init__(self, service: Classifier, limits: Limits, *, runtime: Runtime | None = None) -> None:
        self.service, self.limits, self._runtime = service, limits, runtime
        self.inflight = 0  # admitted predictions not yet answered; read and written on the event loop only
        self.draining = False
        self.load_error: str | None = None
        self.on_load_error: Any = None  # (exception) -> None: what the server does when loading fails
        self.metrics = ServerMetrics(
            lambda: self.inflight,
            limits.queue,
            lambda: service.ready,
            lambda: service.batcher.pending if service.batcher else 0,
        )
        service.on_batch = self.metrics.batch
        self.page = _page()
        routes = [
            Route(PREDICT, self.predict, methods=["POST"]),
            Route("/", self.index, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/health/live", self.live, methods=["GET"]),
            Route("/v1/model", self.model_card, methods=["GET"]),
            Route("/metrics", self.prometheus, methods=["GET"]),
        ]
        starlette = Starlette(
            routes=routes,
            lifespan=self._lifespan,
            exception_handlers={HTTPException: self._http_exception, Exception: self._crash},
        )
        self.app = _CountRequests(starlette, self.metrics)

    # ----------------------------------------------------------------------- lifecycle

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette):
        threading.Thread(target=self._load, name="swinv2-load", daemon=True).start()
        yield
        await asyncio.to_thread(self.service.close, self.limits.timeout_s)

    def drain(self) -> None:
        """Refuse new predictions (503) and run the queued ones without waiting for their batches to fill."""
        self.draining = True
        if self.service.batcher is not None:
            self.service.batcher.hurry()

    def _load(self) -> None:
        try:
            self.service.load(self._runtime)
        except Exception as e:  # reported in one line by the server; /health says failed meanwhile
            self.load_error = str(e).splitlines()[0] if str(e) else type(e).__name__
            log.error("loading the model failed: %s", self.load_error)
            if self.on_load_error is not None:
                self.on_load_error(e)

    # ----------------------------------------------------------------------- endpoints

    async def predict(self, request: Request) -> Response:
        arrived = time.perf_counter()
        try:
            k = self._topk(request)
            if self.draining:
                raise HTTPError(503, "the server is shutting down", retry=True)
            if not self.service.ready:
                state = f"not loaded: {self.load_error}" if self.load_error else "loading"
                raise HTTPError(503, f"the model is {state}", retry=True)
            if self.inflight >= self.limits.queue:
                raise HTTPError(503, f"queue full: {self.limits.queue} requests in progress (--queue)", retry=True)
            self.inflight += 1
            try:
                return await self._predict(request, k, arrived)
            finally:
                self.inflight -= 1
        except HTTPError as e:
            return error_response(e.status, e.reason, retry=e.retry)

    async def _predict(self, request: Request, k: int, arrived: float) -> Response:
        deadline = arrived + self.limits.timeout_s
        loop = asyncio.get_running_loop()
        try:
            data = await asyncio.wait_for(self._image_bytes(request), self._left(deadline))
            crop = await asyncio.wait_for(
                loop.run_in_executor(self.service.pool, self.service.prepare, data), self._left(deadline)
            )
            decoded = time.perf_counter()
            scored = await asyncio.wait_for(asyncio.wrap_future(self.service.submit(crop)), self._left(deadline))
        except UploadError as e:
            raise HTTPError(e.status, e.reason) from None
        except asyncio.TimeoutError:  # TimeoutError from Python 3.11 on, its own class on 3.10
            raise HTTPError(504, f"no answer within {self.limits.timeout_s:g} s (--timeout-s)") from None
        done = time.perf_counter()
        rt = self.service.runtime
        return JSONResponse(
            {
                "model": self.service.name,
                "runtime": rt.name if rt else None,
                "precision": rt.precision if rt else None,
                "topk": min(k, len(self.service.class_names)),
                "top": self.service.top(scored.probs, k),
                "batch_size": scored.batch_size,
                "time_ms": {
                    "total": round(1000 * (done - arrived), 3),
                    "decode": round(1000 * (decoded - arrived), 3),
                    "queue": round(1000 * max(0.0, done - decoded - scored.model_seconds), 3),
                    "model": round(1000 * scored.model_seconds, 3),
                },
            }
        )

    def _left(self, deadline: float) -> float:
        left = deadline - time.perf_counter()
        if left <= 0:
            raise HTTPError(504, f"no answer within {self.limits.timeout_s:g} s (--timeout-s)")
        return left

    @staticmethod
    def _topk(request: Request) -> int:
        text = request.query_params.get("topk", "5")
        try:
            k = int(text)
        except ValueError:
            k = 0
        if k < 1:
            raise HTTPError(422, f"topk must be a whole number of at least 1, got {text!r}")
        return k

    async def _image_bytes(self, request: Request) -> bytes:
        """The uploaded image: the multipart field `file`, else the whole body; 413 past the body limit."""
        limit = self.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise HTTPError(413, f"body of {int(declared):,} bytes is over the limit of {limit:,} (--max-body-mb)")
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise HTTPError(413, f"body over the limit of {limit:,} bytes (--max-body-mb)")
        except ClientDisconnect:  # nobody is left to answer; not a fault of the server's
            raise HTTPError(400, "the client disconnected before the body was read") from None
        if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            return bytes(body)
        return await _multipart_file(request, bytes(body))

    async def index(self, request: Request) -> Response:
        return HTMLResponse(self.page)

    async def health(self, request: Request) -> Response:
        if self.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if self.load_error:
            return JSONResponse({"status": "failed", "error": self.load_error}, status_code=503)
        if not self.service.ready:
            return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})
        return JSONResponse({"status": "ready"})

    async def live(self, request: Request) -> Response:
        return JSONResponse({"status": "alive"})

    async def model_card(self, request: Request) -> Response:
        return JSONResponse(self.service.describe())

    async def prometheus(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    # ----------------------------------------------------------------------- errors

    async def _http_exception(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return error_response(exc.status_code, str(exc.detail))

    async def _crash(self, request: Request, exc: Exception) -> Response:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        first = str(exc).splitlines()[0] if str(exc) else ""
        return error_response(500, f"internal error: {type(exc).__name__}: {first}")


async def _multipart_file(request: Request, body: bytes) -> bytes:
    """The bytes of the form field `file` of the multipart `body` (read already, within the limit)."""
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=4, max_fields=16)
    except HTTPException as e:  # python-multipart's parse error, as Starlette reports it
        raise HTTPError(400, f"malformed multipart body: {e.detail}") from None
    try:
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise HTTPError(422, "multipart upload without a file in the field 'file'")
        return await upload.read()
    finally:
        await form.close()


class _CountRequests:
    """ASGI middleware: each HTTP response counted by endpoint and status, the latency of answered predictions."""

    def __init__(self, app: Any, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope["path"]
            endpoint = path if path in ENDPOINTS else "other"
            seconds = time.perf_counter() - start if path == PREDICT and status == 200 else None
            self.metrics.request(endpoint, status, seconds)
