"""`swinv2 serve` as a user runs it: a real server process on 127.0.0.1 (a free port), the demo's micro
model in a weights file written here. Its answers equal `swinv2 predict`'s for the same files; concurrent
clients each get their own image's answer; every bad input and limit is answered with its code in one
line while the server goes on serving; SIGTERM drains and exits 0; a bad command line fails in one line."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from serving import (
    CLASSES,
    HOST,
    ServerProcess,
    get_json,
    metric,
    multipart,
    png_bytes,
    predict,
    request,
    write_images,
    write_weights,
)
from swinv2.cli import main

SERVER_ARGS = [
    "--runtime",
    "torch",
    "--threads",
    "1",
    "--max-batch",
    "8",
    "--max-wait-ms",
    "30",
    "--max-body-mb",
    "1",
    "--workers",
    "2",
    "--queue",
    "64",
]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(weights, images, the running server, the reference answers of `swinv2 predict --json` by path)."""
    root = tmp_path_factory.mktemp("serve")
    weights = write_weights(root / "micro.safetensors")
    images = write_images(root / "imgs", 12)
    server = ServerProcess(weights, SERVER_ARGS, root / "server.log")
    try:
        ref_path = root / "predict.json"
        assert (
            main(
                [
                    "predict",
                    "--weights",
                    str(weights),
                    "--topk",
                    str(len(CLASSES)),
                    "--json",
                    str(ref_path),
                    *map(str, images),
                ]
            )
            == 0
        )
        reference = {r["path"]: r["top"] for r in json.loads(ref_path.read_text())["results"]}
        server.wait_ready()
        yield weights, images, server, reference
    finally:
        code = server.stop()
    assert code == 0, server.log()


def _same(top: list[dict], ref: list[dict], k: int | None = None) -> None:
    ref = ref[:k] if k else ref
    assert [t["index"] for t in top] == [t["index"] for t in ref]
    assert [t["label"] for t in top] == [t["label"] for t in ref]
    np.testing.assert_allclose([t["prob"] for t in top], [t["prob"] for t in ref], rtol=0, atol=1e-5)


def test_answers_equal_swinv2_predict(served):
    weights, images, server, reference = served
    for i, path in enumerate(images):
        status, answer = predict(server.port, path.read_bytes(), raw=i % 2 == 1, query="?topk=3")
        assert status == 200, answer
        assert answer["model"] == "swinv2_micro_window4_32" and answer["runtime"] == "torch"
        assert answer["topk"] == 3 and 1 <= answer["batch_size"] <= 8
        assert answer["time_ms"]["total"] >= answer["time_ms"]["model"] > 0
        _same(answer["top"], reference[str(path)], k=3)
    status, answer = predict(server.port, images[0].read_bytes(), query="?topk=1000")  # capped at the class count
    assert status == 200 and answer["topk"] == len(CLASSES)
    _same(answer["top"], reference[str(images[0])])
    status, answer = predict(server.port, images[1].read_bytes())  # default 5
    assert status == 200 and len(answer["top"]) == 5


def test_concurrent_clients_each_get_their_own_answer(served):
    weights, images, server, reference = served
    refs = [reference[str(p)] for p in images]
    # the test proves something only if no two images have the same answer
    assert len({tuple(round(t["prob"], 4) for t in r) for r in refs}) == len(images)
    sizes_before, batches_before = (
        metric(server.port, "swinv2_batch_size_sum"),
        metric(server.port, "swinv2_batch_size_count"),
    )
    clients, rounds = 24, 3

    def client(c: int) -> list[tuple[int, int, dict]]:
        out = []
        for r in range(rounds):
            i = (c + 5 * r) % len(images)
            out.append((i, *predict(server.port, images[i].read_bytes(), raw=(c + r) % 2 == 0, query="?topk=7")))
        return out

    with ThreadPoolExecutor(clients) as pool:
        answers = [a for part in pool.map(client, range(clients)) for a in part]
    assert len(answers) == clients * rounds
    for i, status, answer in answers:
        assert status == 200, answer
        _same(answer["top"], refs[i])
    sizes = metric(server.port, "swinv2_batch_size_sum") - sizes_before
    batches = metric(server.port, "swinv2_batch_size_count") - batches_before
    assert sizes == clients * rounds
    assert batches < sizes, "no two concurrent requests were ever batched together"


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height (8-bit RGB) over a few bytes of data: a decompression
    bomb's header, without the bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _raw_http(port: int, head: bytes, chunks: list[bytes]) -> tuple[int, bytes]:
    """Send a request's head and body chunks on a raw socket; (status, response bytes). The server may
    answer and close before the whole body is sent (413): what was not sent is then dropped."""
    with socket.create_connection((HOST, port), timeout=30) as s:
        try:
            s.sendall(head)
            for c in chunks:
                s.sendall(c)
        except (BrokenPipeError, ConnectionResetError):
            pass
        data = b""
        try:
            while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + _length(data):
                more = s.recv(65536)
                if not more:
                    break
                data += more
        except ConnectionResetError:
            pass
    return int(data.split(b" ", 2)[1]), data


def _length(data: bytes) -> int:
    m = re.search(rb"(?i)content-length: *(\d+)", data)
    return int(m.group(1)) if m else 0


def test_bad_inputs_get_their_code_in_one_line_and_the_server_keeps_serving(served):
    weights, images, server, reference = served
    good = images[3].read_bytes()
    png = images[0].read_bytes()
    jpeg = next(p for p in images if p.suffix == ".jpg").read_bytes()
    boundary_body, ctype = multipart(good, field="picture")
    cases = {
        "not an image": (415, dict(data=b"%PDF-1.4 not an image at all" * 10)),
        "an image format not accepted (PPM)": (415, dict(data=b"P6\n4 4\n255\n" + bytes(48))),
        "truncated PNG": (422, dict(data=png[: len(png) // 2])),
        "truncated JPEG": (422, dict(data=jpeg[: len(jpeg) // 2], raw=True)),
        "empty body": (422, dict(data=b"", raw=True)),
        "decompression bomb": (422, dict(data=_png_header_only(100_000, 100_000))),
        "over --max-megapixels": (422, dict(data=_png_header_only(8000, 8000))),
        "topk 0": (422, dict(data=good, query="?topk=0")),
        "topk not a number": (422, dict(data=good, query="?topk=five")),
    }
    for name, (code, kw) in cases.items():
        status, answer = predict(server.port, **kw)
        assert status == code, (name, answer)
        assert answer["status"] == code and answer["error"] and "\n" not in answer["error"], (name, answer)
        assert predict(server.port, good)[0] == 200, name  # still serving
    for side in (100_000, 8000):  # over PIL's own limit, and over ours (40 MP) only
        assert "decompression bomb" in predict(server.port, _png_header_only(side, side))[1]["error"]

    status, _, body = request(server.port, "POST", "/v1/predict", boundary_body, {"Content-Type": ctype})
    assert status == 422 and "'file'" in json.loads(body)["error"]
    for ctype, body in [
        ("multipart/form-data; boundary=x", b"--x\r\nbad header line\r\n\r\ndata\r\n--x--\r\n"),
        ("multipart/form-data; boundary=x", b"--y\r\n"),
        ("multipart/form-data", b"--x--"),
    ]:
        status, _, answer = request(server.port, "POST", "/v1/predict", body, {"Content-Type": ctype})
        assert status == 400 and json.loads(answer)["error"].startswith("malformed multipart body"), answer

    # over --max-body-mb 1: a declared length is refused before the body is read; a chunked body once it passes 1 MiB
    big = os.urandom(1_200_000)
    head = (
        f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: {len(big)}\r\n\r\n"
    ).encode()
    status, data = _raw_http(server.port, head, [big[:65536], big[65536:]])
    assert status == 413 and b"limit" in data
    head = b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunks = [b"%x\r\n%s\r\n" % (65536, big[i : i + 65536]) for i in range(0, 18 * 65536, 65536)] + [b"0\r\n\r\n"]
    status, data = _raw_http(server.port, head, chunks)
    assert status == 413 and b"limit" in data

    assert get_json(server.port, "/health") == (200, {"status": "ready"})
    status, answer = predict(server.port, good, query="?topk=7")
    assert status == 200
    _same(answer["top"], reference[str(images[3])])
    _, _, text = request(server.port, "GET", "/metrics")
    for code in (413, 415, 422, 400):
        assert re.search(rf'swinv2_requests_total{{endpoint="/v1/predict",status="{code}"}} [1-9]', text.decode())


def test_health_model_card_metrics_and_page(served):
    weights, images, server, reference = served
    assert get_json(server.port, "/health") == (200, {"status": "ready"})
    assert get_json(server.port, "/health/live") == (200, {"status": "alive"})
    status, card = get_json(server.port, "/v1/model")
    assert status == 200 and card["ready"] is True
    assert card["model"] == "swinv2_micro_window4_32" and card["classes"] == CLASSES and card["num_classes"] == 7
    assert card["runtime"] == "torch" and card["precision"] == "fp32"
    assert card["preprocessing"]["img_size"] == 32 and card["preprocessing"]["crop_pct"] == 0.875
    assert card["batching"]["max_batch"] == 8

    status, headers, text = request(server.port, "GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    text = text.decode()
    for name, kind in [
        ("swinv2_requests_total", "counter"),
        ("swinv2_predict_latency_seconds", "histogram"),
        ("swinv2_batch_size", "histogram"),
        ("swinv2_queue_depth", "gauge"),
        ("swinv2_ready", "gauge"),
    ]:
        assert f"# TYPE {name} {kind}" in text
    assert re.search(r'swinv2_predict_latency_seconds_bucket{le="\+Inf"} \d+', text)
    assert "swinv2_ready 1" in text and "swinv2_queue_limit 64" in text

    status, headers, page = request(server.port, "GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    page = page.decode()
    assert 'id="file-input"' in page and "v1/predict" in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//|@import|url\(\s*["']?https?:""", page), (
        "the page loads something from elsewhere: it must work offline"
    )
    assert request(server.port, "GET", "/nowhere")[0] == 404
    assert request(server.port, "GET", "/v1/predict")[0] == 405


def test_sigterm_drains_requests_in_progress_and_exits_0(tmp_path):
    weights = write_weights(tmp_path / "micro.safetensors")
    images = write_images(tmp_path / "imgs", 4)
    # requests wait up to 5 s for a batch to fill: SIGTERM comes while all four wait for the model
    server = ServerProcess(
        weights,
        ["--runtime", "torch", "--threads", "1", "--max-batch", "64", "--max-wait-ms", "5000"],
        tmp_path / "server.log",
    )
    try:
        server.wait_ready()
        with ThreadPoolExecutor(4) as pool:
            pending = [pool.submit(predict, server.port, p.read_bytes()) for p in images]
            end = time.monotonic() + 20
            while metric(server.port, "swinv2_batch_waiting") < 4 and time.monotonic() < end:
                time.sleep(0.02)
            assert metric(server.port, "swinv2_batch_waiting") == 4 == metric(server.port, "swinv2_queue_depth")
            assert not any(f.done() for f in pending)
            os.kill(server.proc.pid, signal.SIGTERM)
            try:  # a new request is refused: 503 while uvicorn still listens, then no connection at all
                status, answer = predict(server.port, images[0].read_bytes(), timeout=10)
                assert status == 503 and "shutting down" in answer["error"]
            except ConnectionError:
                pass
            answers = [f.result(timeout=30) for f in pending]
        assert all(status == 200 for status, _ in answers), answers
        assert {a["batch_size"] for _, a in answers} == {4}  # drained as one batch ...
        assert max(a["time_ms"]["total"] for _, a in answers) < 4900  # ... at once, not when the 5 s were up
        assert server.proc.wait(30) == 0, server.log()
    finally:
        server.stop(signal.SIGKILL)
    log = server.log()
    assert "SIGTERM: draining 4 requests in progress" in log and "swinv2 serve: stopped" in log
    with pytest.raises(ConnectionError):
        request(server.port, "GET", "/health", timeout=5)


def test_bad_command_lines_fail_in_one_line(tmp_path, capsys, monkeypatch):
    import importlib.util

    weights = write_weights(tmp_path / "micro.safetensors")

    assert main(["serve", "--weights", str(tmp_path / "missing.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("swinv2 serve: error:") and "missing.safetensors" in err and "\n" not in err

    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert main(["serve", "--weights", str(weights), "--runtime", "torch", "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("swinv2 serve: error: cannot listen on 127.0.0.1:") and str(port) in err

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    assert main(["serve", "--weights", str(weights)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "swinv2 serve: error: swinv2 serve needs the serve extra (uvicorn not installed): pip install 'swinv2[serve]'"
    )

    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--weights", str(weights), "--max-batch", "0"])
    assert exit_.value.code == 2
    assert "--max-batch: must be from 1 to 1024, got 0" in capsys.readouterr().err


def test_requests_in_flight_keep_their_answers_while_others_fail(served):
    """Good and bad uploads at once, from many clients: the bad ones fail alone, the good ones answer."""
    weights, images, server, reference = served
    bad = [b"not an image", png_bytes(1)[:60], b""]

    def client(c: int) -> tuple[int, int, dict]:
        if c % 3 == 0:
            return -1, *predict(server.port, bad[c % len(bad)], raw=True)
        i = c % len(images)
        return i, *predict(server.port, images[i].read_bytes(), query="?topk=7")

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(client, range(30)))
    for i, status, answer in results:
        if i < 0:
            assert status in (415, 422), answer
        else:
            assert status == 200, answer
            _same(answer["top"], reference[str(images[i])])
