"""Which HTTP framework `swinv2 serve` is built on: the same two endpoints in each candidate, under the
same loopback load (`http_load.py`), at 32 concurrent clients.

  * hello: POST a small JSON body, get a small JSON body back (what the framework itself costs);
  * image: POST a 500 x 375 JPEG as a multipart upload; the server decodes it with PIL off the event
    loop, resizes it to 256 x 256 and answers its size as JSON (the framework's upload path plus the
    work a classifier does before its model).

Candidates: Starlette on uvicorn (httptools + uvloop, and plain h11 + asyncio), FastAPI on uvicorn, and
LitServe (FastAPI-based, with its inference in a worker process). Each runs as a child process of this
script on 127.0.0.1; each (candidate, endpoint) is measured `--rounds` times in turns and its best
round counts (a shared machine's speed drifts).

    python benchmarks/serve_frameworks.py [--seconds 6] [--rounds 2] [--only starlette,fastapi]

Needs the candidates installed (`pip install fastapi uvicorn[standard] python-multipart litserve`);
one that is not is reported and skipped. Writes benchmarks/results/serve_frameworks.{md,json}.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from http_load import multipart_bytes, request_bytes, run_load, wait_ready

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "serve_frameworks"
HOST = "127.0.0.1"
CANDIDATES = ("starlette", "starlette-h11", "fastapi", "litserve")


# --------------------------------------------------------------------------- the servers (child processes)


def _decode(data: bytes) -> dict:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB").resize((256, 256), Image.BICUBIC)
    return {"w": im.width, "h": im.height}


def _starlette_app():
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def hello(request):
        return JSONResponse({"y": (await request.json())["x"]})

    async def image(request):
        form = await request.form()
        data = await form["file"].read()
        return JSONResponse(await run_in_threadpool(_decode, data))

    return Starlette(routes=[Route("/hello", hello, methods=["POST"]), Route("/image", image, methods=["POST"])])


def _fastapi_app():
    from fastapi import FastAPI, UploadFile
    from fastapi.concurrency import run_in_threadpool
    from pydantic import BaseModel

    class In(BaseModel):
        x: int

    app = FastAPI()

    async def hello(body):
        return {"y": body.x}

    async def image(file):
        return await run_in_threadpool(_decode, await file.read())

    # FastAPI reads the parameters' types from the annotations, which `from __future__ import annotations`
    # leaves as strings it cannot resolve for classes imported here: they are given as the classes.
    hello.__annotations__ = {"body": In, "return": dict}
    image.__annotations__ = {"file": UploadFile, "return": dict}
    app.post("/hello")(hello)
    app.post("/image")(image)
    return app


def _litserve_apis() -> list:
    """The two endpoints as LitAPIs. LitServe starts its inference workers with `spawn`, which pickles
    the API objects: their classes are made module-level (`_LIT_CLASSES`) for pickle to find them."""
    import litserve as ls

    class Hello(ls.LitAPI):
        def setup(self, device):
            pass

        def decode_request(self, request):
            return request["x"]

        def predict(self, x):
            return x

        def encode_response(self, output):
            return {"y": output}

    class Img(ls.LitAPI):
        def setup(self, device):
            pass

        def decode_request(self, request):
            return _decode(request["file"].file.read())

        def predict(self, x):
            return x

        def encode_response(self, output):
            return output

    for cls in (Hello, Img):
        cls.__qualname__ = f"_Lit{cls.__name__}"
        globals()[cls.__qualname__] = cls
    return [Hello(api_path="/hello"), Img(api_path="/image")]


if __name__ == "__mp_main__" and os.environ.get("SWINV2_LITSERVE_CHILD"):  # a LitServe worker: the classes again
    _litserve_apis()


def _serve_litserve(port: int) -> None:
    import litserve as ls

    os.environ["SWINV2_LITSERVE_CHILD"] = "1"
    server = ls.LitServer(_litserve_apis(), accelerator="cpu")
    server.run(host=HOST, port=port, generate_client_file=False, log_level="warning")


def serve(candidate: str, port: int) -> None:
    """Run `candidate` on 127.0.0.1:`port` until killed."""
    if candidate == "litserve":
        _serve_litserve(port)
        return
    import uvicorn

    app = _fastapi_app() if candidate == "fastapi" else _starlette_app()
    extra = {"http": "h11", "loop": "asyncio"} if candidate == "starlette-h11" else {}
    uvicorn.run(app, host=HOST, port=port, log_level="warning", access_log=False, **extra)


# --------------------------------------------------------------------------- the measurement


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _photo() -> bytes:
    """A 500 x 375 JPEG (quality 90): a crop of scikit-learn's sample photograph where it is installed,
    else a smooth seeded picture of the same size."""
    import numpy as np
    from PIL import Image

    try:
        from sklearn.datasets import load_sample_image

        img = Image.fromarray(load_sample_image("china.jpg")).resize((500, 375), Image.BICUBIC)
    except ImportError:
        rng = np.random.default_rng(0)
        yy, xx = np.mgrid[0:375, 0:500]
        base = np.stack([xx * 0.5, yy * 0.6, (xx + yy) * 0.3], -1) + rng.normal(0, 12, (375, 500, 3))
        img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _installed(candidate: str) -> str | None:
    """None where `candidate` can run here, else why not."""
    import importlib.util

    need = {
        "starlette": ["starlette", "uvicorn", "multipart", "httptools", "uvloop"],
        "starlette-h11": ["starlette", "uvicorn", "multipart"],
        "fastapi": ["fastapi", "uvicorn", "multipart"],
        "litserve": ["litserve"],
    }[candidate]
    missing = [m for m in need if importlib.util.find_spec(m) is None]
    return f"not installed: {', '.join(missing)}" if missing else None


def measure(candidates: list[str], *, seconds: float, rounds: int, clients: int = 32) -> dict:
    photo = _photo()
    body, ctype = multipart_bytes("file", "photo.jpg", photo)
    loads = {
        "hello": [request_bytes("POST", "/hello", body=b'{"x": 1}', content_type="application/json")],
        "image": [request_bytes("POST", "/image", body=body, content_type=ctype)],
    }
    best: dict[str, dict[str, dict]] = {}
    skipped = {}
    for r in range(rounds):
        for cand in candidates if r % 2 == 0 else candidates[::-1]:
            if cand in skipped or (why := _installed(cand)):
                skipped.setdefault(cand, why)
                continue
            port = _free_port()
            # a session of its own: LitServe's worker processes are stopped with it (os.killpg below)
            child = subprocess.Popen(
                [sys.executable, __file__, "--serve", cand, "--port", str(port)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            try:
                wait_ready(
                    HOST,
                    port,
                    "/docs" if cand == "fastapi" else "/health" if cand == "litserve" else "/",
                    timeout=120,
                    ok=(200, 404, 405),
                )
                for name, reqs in loads.items():
                    run_load(HOST, port, reqs, concurrency=clients, per_client=20, max_seconds=2)  # warm-up
                    res = run_load(HOST, port, reqs, concurrency=clients, per_client=100_000, max_seconds=seconds)
                    s = res.summary()
                    if s["ok"] != s["requests"]:
                        raise RuntimeError(f"{cand} {name}: {s}")
                    keep = best.setdefault(cand, {}).get(name)
                    if keep is None or s["req_per_s"] > keep["req_per_s"]:
                        best[cand][name] = s
                    print(
                        f"round {r}: {cand:14s} {name:6s} {s['req_per_s']:8.1f} req/s  p50 {s['p50_ms']} ms  "
                        f"p99 {s['p99_ms']} ms",
                        flush=True,
                    )
            finally:
                os.killpg(child.pid, signal.SIGTERM)
                try:
                    child.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(child.pid, signal.SIGKILL)
                    child.wait()
                time.sleep(1)
                try:  # workers that outlived their parent
                    os.killpg(child.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    return {
        "clients": clients,
        "seconds": seconds,
        "rounds": rounds,
        "photo_bytes": len(photo),
        "cpus": os.cpu_count(),
        "versions": _versions(),
        "results": best,
        "skipped": skipped,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for p in ("starlette", "fastapi", "uvicorn", "litserve", "httptools", "uvloop", "python-multipart"):
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            pass
    return out


def to_markdown(rec: dict) -> str:
    lines = [
        f"# HTTP framework for `swinv2 serve`: {rec['clients']} concurrent clients on loopback",
        "",
        f"{rec['date']}, {rec['cpus']} CPUs (shared), best of {rec['rounds']} rounds of {rec['seconds']} s; "
        f"image: a {rec['photo_bytes'] // 1024} KB 500x375 JPEG, multipart, decoded + resized to 256 px.",
        "",
        "| framework | hello req/s | hello p50 / p99 ms | image req/s | image p50 / p99 ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for cand, res in rec["results"].items():
        h, i = res.get("hello", {}), res.get("image", {})
        lines.append(
            f"| {cand} | {h.get('req_per_s', '-')} | {h.get('p50_ms', '-')} / {h.get('p99_ms', '-')} | "
            f"{i.get('req_per_s', '-')} | {i.get('p50_ms', '-')} / {i.get('p99_ms', '-')} |"
        )
    for cand, why in rec["skipped"].items():
        lines.append(f"| {cand} | skipped: {why} | | | |")
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in rec["versions"].items()), ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--serve", choices=CANDIDATES, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--only", default=",".join(CANDIDATES))
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    if args.serve:
        serve(args.serve, args.port)
        return 0
    rec = measure([c for c in args.only.split(",") if c], seconds=args.seconds, rounds=args.rounds)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rec, indent=1) + "\n")
    out.with_suffix(".md").write_text(to_markdown(rec))
    print(to_markdown(rec))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
