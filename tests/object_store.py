"""An S3-compatible store on 127.0.0.1 for the tests (moto's server), behind a proxy that can fail on
purpose: answer 503 to the next N reads of an object, or stall them longer than the reader waits."""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Faults:
    """What the proxy does to GETs of keys containing `match`: `fail` of them get 503, then `stall` of
    them wait `stall_s` seconds before answering; `gets` counts the GETs that matched."""

    match: str = "\0"
    fail: int = 0
    stall: int = 0
    stall_s: float = 0.0
    gets: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def decide(self, path: str) -> str:
        with self.lock:
            if self.match not in path:
                return "pass"
            self.gets += 1
            if self.fail > 0:
                self.fail -= 1
                return "fail"
            if self.stall > 0:
                self.stall -= 1
                return "stall"
            return "pass"


def _proxy(upstream: int, faults: Faults) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _forward(self) -> None:
            action = faults.decide(self.path) if self.command == "GET" else "pass"
            if action == "fail":
                body = b"<Error><Code>ServiceUnavailable</Code><Message>injected</Message></Error>"
                self.send_response(503)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            if action == "stall":
                time.sleep(faults.stall_s)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            conn = http.client.HTTPConnection("127.0.0.1", upstream, timeout=60)
            headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
            headers["Host"] = f"127.0.0.1:{upstream}"
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            self.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            conn.close()

        def _answer(self) -> None:
            try:
                self._forward()
            except (BrokenPipeError, ConnectionResetError):  # the reader gave up on a stalled answer
                pass

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _answer

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    server.daemon_threads = True
    return server


@contextmanager
def s3_store(monkeypatch) -> Iterator[tuple[str, Faults]]:
    """(endpoint URL, faults) of a fresh moto S3 server behind the failing proxy; the standard AWS
    variables point boto3 at it."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    faults = Faults()
    proxy = _proxy(port, faults)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{proxy.server_address[1]}"
    for key, value in {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    try:
        yield endpoint, faults
    finally:
        proxy.shutdown()
        proxy.server_close()
        moto.stop()


def upload(folder: Path, bucket: str, prefix: str) -> None:
    """Every file under `folder` to s3://bucket/prefix/<relative path> (the bucket made if needed)."""
    import boto3

    client = boto3.client("s3")
    try:
        client.create_bucket(Bucket=bucket)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            client.upload_file(str(p), bucket, f"{prefix}/{p.relative_to(folder).as_posix()}")
