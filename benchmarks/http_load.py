"""A small HTTP/1.1 load generator for loopback benchmarks: C clients, each on its own keep-alive
connection, sending prepared requests back to back, bounded in count and in time.

It is asyncio over raw streams, not a client library: the requests are bytes prepared once, and a
response is read by its Content-Length (or chunks), so the client spends as little of a shared 2-core
machine as a Python client can, and the same client measures every server it is pointed at.

Only loopback addresses are accepted (`check_loopback`): a load test here never leaves the machine.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field


def check_loopback(host: str) -> None:
    """ValueError unless `host` is a loopback address (127.0.0.0/8, ::1) or localhost."""
    if host == "localhost":
        return
    if not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"{host}: load is only ever sent to loopback addresses (127.0.0.1, ::1)")


def request_bytes(
    method: str, path: str, *, body: bytes = b"", content_type: str | None = None, host: str = "127.0.0.1"
) -> bytes:
    """One HTTP/1.1 keep-alive request as bytes."""
    head = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Connection: keep-alive"]
    if body or method in ("POST", "PUT"):
        head.append(f"Content-Length: {len(body)}")
    if content_type:
        head.append(f"Content-Type: {content_type}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def multipart_bytes(
    field_name: str,
    filename: str,
    data: bytes,
    content_type: str = "image/jpeg",
    boundary: str = "swinv2-load-boundary",
) -> tuple[bytes, str]:
    """(body, content type) of a multipart/form-data upload of one file."""
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field_name}"; filename="{filename}"\r\n'
            f"Content-Type: {content_type}\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


@dataclass
class LoadResult:
    """What a load run saw: per request (client index, request index, latency s, status, body)."""

    concurrency: int
    seconds: float
    records: list[tuple[int, int, float, int, bytes]] = field(default_factory=list, repr=False)
    connect_errors: int = 0

    @property
    def ok(self) -> list[tuple[int, int, float, int, bytes]]:
        return [r for r in self.records if r[3] == 200]

    def summary(self) -> dict:
        lat = sorted(r[2] for r in self.ok)
        statuses: dict[str, int] = {}
        for r in self.records:
            statuses[str(r[3])] = statuses.get(str(r[3]), 0) + 1
        return {
            "clients": self.concurrency,
            "requests": len(self.records),
            "ok": len(lat),
            "statuses": statuses,
            "connect_errors": self.connect_errors,
            "seconds": round(self.seconds, 3),
            "req_per_s": round(len(lat) / self.seconds, 2) if self.seconds else 0.0,
            "p50_ms": round(1000 * percentile(lat, 50), 2) if lat else None,
            "p99_ms": round(1000 * percentile(lat, 99), 2) if lat else None,
            "mean_ms": round(1000 * statistics.fmean(lat), 2) if lat else None,
        }


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (nearest rank) of already sorted values."""
    if not sorted_values:
        raise ValueError("no values")
    rank = max(1, min(len(sorted_values), round(q / 100 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool, bytes]:
    """(status, whether the server keeps the connection, body) of one response."""
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("connection closed by the server")
    status = int(status_line.split()[1])
    length, chunked, keep = None, False, True
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "transfer-encoding" and "chunked" in value:
            chunked = True
        elif name == "connection" and value == "close":
            keep = False
    if chunked:
        parts = []
        while (size := int((await reader.readline()).strip() or b"0", 16)) > 0:
            parts.append(await reader.readexactly(size))
            await reader.readline()
        await reader.readline()
        return status, keep, b"".join(parts)
    if length is None:
        return status, False, await reader.read()
    return status, keep, await reader.readexactly(length)


async def _client(
    index: int,
    host: str,
    port: int,
    requests: Sequence[bytes],
    n: int,
    deadline: float,
    out: LoadResult,
    keep_bodies: bool,
) -> None:
    reader = writer = None
    i = 0
    while i < n and time.perf_counter() < deadline:
        if writer is None:
            try:
                reader, writer = await asyncio.open_connection(host, port)
            except OSError:
                out.connect_errors += 1
                await asyncio.sleep(0.05)
                i += 1
                continue
        raw = requests[(index + i) % len(requests)]
        t0 = time.perf_counter()
        try:
            writer.write(raw)
            status, keep, body = await _read_response(reader)
        except (ConnectionError, asyncio.IncompleteReadError, OSError):
            out.records.append((index, i, time.perf_counter() - t0, 0, b""))
            writer.close()
            reader = writer = None
            i += 1
            continue
        out.records.append((index, i, time.perf_counter() - t0, status, body if keep_bodies else b""))
        if not keep:
            writer.close()
            reader = writer = None
        i += 1
    if writer is not None:
        writer.close()


def run_load(
    host: str,
    port: int,
    requests: Sequence[bytes],
    *,
    concurrency: int,
    per_client: int,
    max_seconds: float,
    keep_bodies: bool = False,
) -> LoadResult:
    """`concurrency` clients each send up to `per_client` requests (client c's i-th is
    requests[(c + i) % len]), stopping at `max_seconds`; every response is recorded."""
    check_loopback(host)

    async def main() -> LoadResult:
        out = LoadResult(concurrency, 0.0)
        start = time.perf_counter()
        deadline = start + max_seconds
        await asyncio.gather(
            *(_client(c, host, port, requests, per_client, deadline, out, keep_bodies) for c in range(concurrency))
        )
        out.seconds = time.perf_counter() - start
        return out

    return asyncio.run(main())


def get(host: str, port: int, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
    """(status, body) of one GET, through the standard library."""
    import http.client

    check_loopback(host)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def get_json(host: str, port: int, path: str, timeout: float = 10.0) -> tuple[int, dict]:
    """(status, JSON body) of one GET."""
    status, body = get(host, port, path, timeout)
    return status, json.loads(body or b"{}")


def wait_ready(host: str, port: int, path: str = "/health", timeout: float = 120.0, ok: Sequence[int] = (200,)) -> None:
    """Return once GET `path` answers a status in `ok`; TimeoutError after `timeout` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if get(host, port, path, timeout=2.0)[0] in ok:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"http://{host}:{port}{path} not ready after {timeout:.0f} s")
