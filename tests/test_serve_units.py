"""The parts of `swinv2 serve` on their own, no HTTP: the dynamic batcher (each answer to its own caller,
batch bounds, waiting, cancelled items, failures, draining), the decoding of untrusted uploads (the same
pixels as `images.load_image`, refused formats, decompression bombs refused from the header) and the
Prometheus text."""

from __future__ import annotations

import io
import re
import struct
import threading
import time
import zlib
from concurrent.futures import CancelledError, ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from swinv2.images import load_image
from swinv2.serve.batching import Closed, DynamicBatcher, QueueFull
from swinv2.serve.decode import UploadError, decode_upload
from swinv2.serve.metrics import Counter, Histogram, ServerMetrics

# --------------------------------------------------------------------------- the batcher


def test_each_caller_gets_the_result_of_its_own_value():
    seen: list[list[int]] = []

    def run(values: list[int]) -> list[int]:
        seen.append(list(values))
        time.sleep(0.002)
        return [v * 10 + 1 for v in values]

    batcher = DynamicBatcher(run, max_batch=8, max_wait_s=0.01)
    try:
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda v: (v, batcher.submit(v).result(timeout=30)), range(400)))
    finally:
        assert batcher.close(timeout=10)
    assert all(r == v * 10 + 1 for v, r in results)
    assert sorted(v for batch in seen for v in batch) == list(range(400))  # each value run exactly once
    assert max(len(b) for b in seen) <= 8
    assert len(seen) < 400, "concurrent values were never batched"


def test_a_batch_waits_at_most_max_wait_for_company_and_no_longer_when_full():
    sizes: list[int] = []
    batcher = DynamicBatcher(lambda v: sizes.append(len(v)) or v, max_batch=4, max_wait_s=0.3)
    try:
        start = time.monotonic()
        assert batcher.submit(1).result(timeout=30) == 1
        assert time.monotonic() - start >= 0.3  # alone: it waited its max_wait for others
        start = time.monotonic()
        futures = [batcher.submit(i) for i in range(4)]  # a full batch runs without waiting
        assert [f.result(timeout=30) for f in futures] == [0, 1, 2, 3]
        assert time.monotonic() - start < 0.3
    finally:
        batcher.close(timeout=10)
    assert sizes == [1, 4]


def test_cancelled_items_are_not_run_and_failures_reach_every_item_of_their_batch():
    gate = threading.Event()
    ran: list[list[str]] = []

    def run(values: list[str]) -> list[str]:
        ran.append(list(values))
        gate.wait(30)
        if "boom" in values:
            raise ValueError("the model failed")
        return values

    batcher = DynamicBatcher(run, max_batch=3, max_wait_s=0.0)
    try:
        first = batcher.submit("a")  # runs alone and blocks on the gate
        while not ran:
            time.sleep(0.005)
        late = batcher.submit("timed-out")
        assert late.cancel()  # its caller gave up while it waited
        bad, victim = batcher.submit("boom"), batcher.submit("b")  # the next batch: these two (and the cancelled)
        gate.set()
        assert first.result(timeout=30) == "a"
        with pytest.raises(ValueError, match="the model failed"):
            bad.result(timeout=30)
        with pytest.raises(ValueError, match="the model failed"):
            victim.result(timeout=30)
        with pytest.raises(CancelledError):
            late.result()
        assert batcher.submit("after").result(timeout=30) == "after"  # the thread goes on
    finally:
        batcher.close(timeout=10)
    assert ["timed-out"] not in ran and all("timed-out" not in b for b in ran)


def test_close_runs_what_waits_at_once_then_refuses_and_max_pending_bounds_the_queue():
    batcher = DynamicBatcher(lambda v: v, max_batch=64, max_wait_s=30.0, max_pending=3)
    futures = [batcher.submit(i) for i in range(3)]
    with pytest.raises(QueueFull):
        batcher.submit(99)
    start = time.monotonic()
    assert batcher.close(timeout=10)
    assert time.monotonic() - start < 5  # not the 30 s max_wait
    assert [f.result(timeout=1) for f in futures] == [0, 1, 2]
    with pytest.raises(Closed):
        batcher.submit(4)


def test_hurry_stops_waiting_for_full_batches():
    batcher = DynamicBatcher(lambda v: v, max_batch=64, max_wait_s=30.0)
    try:
        future = batcher.submit("x")
        time.sleep(0.05)
        batcher.hurry()
        assert future.result(timeout=5) == "x"
        assert batcher.submit("y").result(timeout=5) == "y"
    finally:
        batcher.close(timeout=10)


# --------------------------------------------------------------------------- decoding uploads


def _encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize(
    "mode,fmt",
    [
        ("RGB", "JPEG"),
        ("RGB", "PNG"),
        ("RGBA", "PNG"),
        ("L", "PNG"),
        ("P", "GIF"),
        ("RGB", "WEBP"),
        ("RGB", "BMP"),
        ("I;16", "PNG"),
        ("CMYK", "TIFF"),
    ],
)
def test_uploads_decode_to_the_pixels_load_image_reads_from_a_file(tmp_path, mode, fmt):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (23, 31, 4), dtype=np.uint8)
    img = Image.fromarray(arr, "RGBA")
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65536, (23, 31), dtype=np.uint16))
    elif mode != "RGBA":
        img = img.convert(mode)
    data = _encoded(img, fmt)
    path = tmp_path / f"x.{fmt.lower()}"
    path.write_bytes(data)
    decoded = decode_upload(data)
    assert decoded.mode == "RGB" and decoded.size == (31, 23)
    assert np.array_equal(np.asarray(decoded), np.asarray(load_image(path)))


def test_exif_rotation_is_applied_as_predict_does(tmp_path):
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 40, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    data = _encoded(img, "JPEG", exif=exif)
    assert decode_upload(data).size == (20, 40)


def _png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def test_refusals_name_their_reason_and_status():
    noise = Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    png, jpeg = _encoded(noise, "PNG"), _encoded(noise, "JPEG")
    cases = [
        (b"", 422, "empty"),
        (b"hello world", 415, "accepted format"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", 415, "accepted format"),  # never Ghostscript
        (b"P6\n4 4\n255\n" + bytes(48), 415, "accepted format"),
        (png[: len(png) // 2], 422, "PNG"),
        (jpeg[: len(jpeg) // 2], 422, "JPEG"),
        (_png_header(9000, 9000), 422, "decompression bomb"),
        (_png_header(200_000, 200_000), 422, "decompression bomb"),
    ]
    for data, status, words in cases:
        with pytest.raises(UploadError) as e:
            decode_upload(data)
        assert e.value.status == status and words in e.value.reason and "\n" not in e.value.reason
    start = time.monotonic()
    with pytest.raises(UploadError, match="over the limit of 1,000"):
        decode_upload(_png_header(40, 40), max_pixels=1000)
    assert time.monotonic() - start < 1.0  # refused from the header: nothing of it was decoded


# --------------------------------------------------------------------------- the metrics text


def test_prometheus_text():
    c = Counter("x_total", "Things.", ("kind",))
    c.inc('a"b')
    c.inc('a"b')
    c.inc("c", by=3)
    assert c.render() == [
        "# HELP x_total Things.",
        "# TYPE x_total counter",
        'x_total{kind="a\\"b"} 2',
        'x_total{kind="c"} 3',
    ]
    h = Histogram("lat_seconds", "Latency.", (0.1, 1.0))
    for v in (0.05, 0.5, 0.5, 7.0):
        h.observe(v)
    assert h.render()[2:] == [
        'lat_seconds_bucket{le="0.1"} 1',
        'lat_seconds_bucket{le="1"} 3',
        'lat_seconds_bucket{le="+Inf"} 4',
        "lat_seconds_sum 8.05",
        "lat_seconds_count 4",
    ]
    m = ServerMetrics(lambda: 3, 64, lambda: True, lambda: 2)
    m.request("/v1/predict", 200, 0.02)
    m.request("/v1/predict", 503)
    m.batch(5, 0.01)
    text = m.render()
    assert 'swinv2_requests_total{endpoint="/v1/predict",status="503"} 1' in text
    assert "swinv2_predict_latency_seconds_count 1" in text and "swinv2_batch_size_sum 5" in text
    assert "swinv2_queue_depth 3" in text and "swinv2_batch_waiting 2" in text and "swinv2_ready 1" in text
    # every sample line is NAME{labels} VALUE, as Prometheus parses it
    sample = re.compile(r'^[a-z_][a-z0-9_]*(\{[a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*\})? [-+0-9.eInf]+$')
    assert all(sample.match(line) for line in text.splitlines() if not line.startswith("#"))
