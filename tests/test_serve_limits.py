"""The server's limits under a model held still: a real uvicorn server on 127.0.0.1 (a free port) in
this process, over the micro model's runtime behind a gate the test opens, so a request is in the model
for exactly as long as the test says. A full queue answers 503 with Retry-After, a request not answered
in --timeout-s answers 504 and is never run, a failed load says so on /health; afterwards the server
serves again."""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from serving import HOST, get_json, png_bytes, predict, request, write_weights

uvicorn = pytest.importorskip("uvicorn")

import swinv2  # noqa: E402
from swinv2.serve.app import Limits, ServeApp  # noqa: E402
from swinv2.serve.runtime import Runtime, load_runtime  # noqa: E402
from swinv2.serve.server import listen  # noqa: E402
from swinv2.serve.service import Classifier, ServeSettings  # noqa: E402
from swinv2.weights.registry import resolve_preprocess  # noqa: E402


class Gate:
    """The micro model's torch runtime, each call waiting for `open` (open at first, for the warm-up);
    `calls` holds each call's batch size."""

    def __init__(self, model) -> None:
        self.inner = load_runtime(model, "torch", "fp32")
        self.open = threading.Event()
        self.open.set()
        self.entered = threading.Event()
        self.calls: list[int] = []
        self.fail = False

    def __call__(self, x):
        self.calls.append(x.shape[0])
        self.entered.set()
        assert self.open.wait(60)
        if self.fail:
            raise RuntimeError("the runtime broke")
        return self.inner(x)

    def runtime(self) -> Runtime:
        return Runtime("torch", "fp32", 32, self.inner.num_classes, self)


@contextlib.contextmanager
def running(tmp_path, limits: Limits, settings: ServeSettings, gate: Gate | None = None, runtime=None):
    """(ServeApp, port) of a server running in a thread until the block ends."""
    model = swinv2.load_model(write_weights(tmp_path / "micro.safetensors"))
    gate = gate or Gate(model)
    web = ServeApp(Classifier(model, resolve_preprocess(model), settings), limits, runtime=runtime or gate.runtime())
    sock = listen(HOST, 0)
    server = uvicorn.Server(uvicorn.Config(web.app, log_config=None, access_log=False, lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    port = sock.getsockname()[1]
    try:
        end = time.monotonic() + 60
        while not (web.service.ready or web.load_error) and time.monotonic() < end:
            time.sleep(0.02)
        yield web, port
    finally:
        if gate is not None:
            gate.open.set()
        server.should_exit = True
        thread.join(30)
        sock.close()
    assert not thread.is_alive()


def _wait(condition, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out waiting"
        time.sleep(0.005)


def test_a_full_queue_answers_503_with_retry_after_and_then_serves_again(tmp_path):
    settings = ServeSettings(runtime="torch", max_batch=1, max_wait_ms=0, workers=1, threads=1)
    with running(tmp_path, Limits(queue=2, timeout_s=60), settings) as (web, port):
        gate: Gate = web._runtime.infer
        gate.calls.clear()
        gate.open.clear()
        gate.entered.clear()
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(predict, port, png_bytes(1))
            assert gate.entered.wait(30)  # the first is in the model, held
            second = pool.submit(predict, port, png_bytes(2))
            _wait(lambda: web.inflight == 2)  # the second is admitted: the queue is full
            status, headers, body = request(port, "POST", "/v1/predict", png_bytes(3), {"Content-Type": "image/png"})
            assert status == 503 and headers["retry-after"] == "1"
            assert b"queue full: 2 requests in progress" in body
            assert get_json(port, "/health") == (200, {"status": "ready"})  # full is not unhealthy
            gate.open.set()
            assert first.result(30)[0] == 200 and second.result(30)[0] == 200
        assert predict(port, png_bytes(4))[0] == 200
        assert web.inflight == 0
        assert gate.calls == [1, 1, 1]  # the refused request never reached the model


def test_a_request_not_answered_in_time_gets_504_and_is_never_run(tmp_path):
    settings = ServeSettings(runtime="torch", max_batch=1, max_wait_ms=0, workers=1, threads=1)
    with running(tmp_path, Limits(queue=8, timeout_s=2.0), settings) as (web, port):
        gate: Gate = web._runtime.infer
        gate.calls.clear()
        gate.open.clear()
        gate.entered.clear()
        with ThreadPoolExecutor(2) as pool:
            held = pool.submit(predict, port, png_bytes(1))  # in the model when its time is up
            assert gate.entered.wait(30)
            queued = pool.submit(predict, port, png_bytes(2))  # still waiting for the model then
            for future in (held, queued):
                status, answer = future.result(30)
                assert status == 504 and answer["error"] == "no answer within 2 s (--timeout-s)"
        gate.open.set()
        status, answer = predict(port, png_bytes(3))
        assert status == 200 and answer["batch_size"] == 1
        assert gate.calls == [1, 1]  # the held one, then the last: the queued one was dropped, not run
        assert web.inflight == 0


def test_a_broken_runtime_answers_500_and_a_failed_load_says_so(tmp_path):
    settings = ServeSettings(runtime="torch", max_batch=2, max_wait_ms=0, workers=1, threads=1)
    with running(tmp_path, Limits(), settings) as (web, port):
        gate: Gate = web._runtime.infer
        gate.fail = True
        status, answer = predict(port, png_bytes(1))
        assert status == 500 and answer["error"] == "internal error: RuntimeError: the runtime broke"
        gate.fail = False
        assert predict(port, png_bytes(1))[0] == 200

    class Unloadable(Gate):
        def __call__(self, x):
            raise RuntimeError("cannot compile the graph")

    model = swinv2.load_model(write_weights(tmp_path / "m2.safetensors"))
    broken = Unloadable(model)
    with running(tmp_path, Limits(), settings, gate=broken) as (web, port):
        assert get_json(port, "/health") == (503, {"status": "failed", "error": "cannot compile the graph"})
        status, answer = predict(port, png_bytes(1))
        assert status == 503 and answer["error"] == "the model is not loaded: cannot compile the graph"
