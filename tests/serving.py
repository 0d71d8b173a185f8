"""What the serve tests share: a micro model's weights file and distinct images written by the test, a
real `swinv2 serve` process on 127.0.0.1 (a free port the server picks, `--port 0`, read from its
first line), and HTTP calls through the standard library."""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import swinv2
from randomize import randomize_

CLASSES = ["ant", "bee", "cat", "dog", "eel", "fox", "gnu"]
HOST = "127.0.0.1"
_URL = re.compile(r"swinv2 serve: http://127\.0\.0\.1:(\d+)/")

pytest.importorskip("starlette", reason="the serve extra is not installed: pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="the serve extra is not installed: pip install -e '.[serve]'")


def write_weights(path: Path, seed: int = 3) -> Path:
    """The demo's micro model (32 px) with drawn weights and named classes, saved self-describing."""
    model = randomize_(swinv2.create_model("swinv2_micro_window4_32", num_classes=len(CLASSES)), seed=seed, std=0.02)
    swinv2.save_weights(model, path, class_names=CLASSES, model_name="swinv2_micro_window4_32")
    return path


def write_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """`n` distinct images (seeded noise over a colour gradient, various sizes, PNG and JPEG, one grey)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        h, w = 30 + 3 * (i % 7), 34 + 5 * (i % 5)
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx * (3 + i), yy * (5 + 2 * i), (xx + yy) * (i % 4 + 1)], -1) % 256
        arr = np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr)
        if i % 5 == 4:
            img = img.convert("L")
        path = folder / (f"img{i:02d}.jpg" if i % 3 == 2 else f"img{i:02d}.png")
        if path.suffix == ".jpg":
            img.save(path, quality=95)
        else:
            img.save(path)
        paths.append(path)
    return paths


def png_bytes(seed: int = 0, size: tuple[int, int] = (40, 48)) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------- HTTP


def multipart(data: bytes, field: str = "file", filename: str = "image.png") -> tuple[bytes, str]:
    boundary = "swinv2-test-boundary-7c1e"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def request(
    port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 30.0
) -> tuple[int, dict, bytes]:
    """(status, headers lower-cased, body) of one request on a new connection."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def predict(port: int, data: bytes, *, raw: bool = False, query: str = "", timeout: float = 30.0) -> tuple[int, dict]:
    """(status, JSON) of POST /v1/predict with `data` as a multipart upload, or as the raw body."""
    if raw:
        body, ctype = data, "application/octet-stream"
    else:
        body, ctype = multipart(data)
    status, _, payload = request(port, "POST", "/v1/predict" + query, body, {"Content-Type": ctype}, timeout)
    return status, json.loads(payload)


def get_json(port: int, path: str) -> tuple[int, dict]:
    status, _, payload = request(port, "GET", path, timeout=10)
    return status, json.loads(payload)


def metric(port: int, name: str) -> float:
    """The value of the unlabelled sample `name` in GET /metrics."""
    _, _, text = request(port, "GET", "/metrics", timeout=10)
    for line in text.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


# --------------------------------------------------------------------------- a server process


class ServerProcess:
    """`swinv2 serve --weights W --port 0 ARGS` in its own process; its output in `log_path`."""

    def __init__(self, weights: Path, args: list[str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")
        cmd = [sys.executable, "-m", "swinv2", "serve", "--weights", str(weights), "--host", HOST, "--port", "0", *args]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.port = self._wait_port()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _wait_port(self, timeout: float = 90.0) -> int:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if (m := _URL.search(self.log())) is not None:
                return int(m.group(1))
            if self.proc.poll() is not None:
                raise RuntimeError(f"swinv2 serve exited {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.05)
        raise TimeoutError(f"swinv2 serve printed no address in {timeout} s:\n{self.log()}")

    def wait_ready(self, timeout: float = 90.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                if request(self.port, "GET", "/health", timeout=5)[0] == 200:
                    return
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"swinv2 serve exited {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.05)
        raise TimeoutError(f"/health not 200 in {timeout} s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send `sig`, wait for the exit; the exit code (the process is killed past `timeout`)."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode
