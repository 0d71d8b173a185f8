"""`swinv2 serve` under load on loopback: images/s and latency at 1, 8 and 32 concurrent clients, the
served rate against the same runtime's model alone, a soak, and the answers against `swinv2 predict`.

For each model (SwinV2-T window 8 at 256 px, and the demo's micro model at 32 px; drawn weights,
`swinv2.tools.bench.randomize_weights_`, saved self-describing) and each runtime (OpenVINO, PyTorch; fp32):

  * the server: `swinv2 serve --weights W --runtime R --max-batch 32 --max-wait-ms 5 --queue 128` in its
    own process on 127.0.0.1 (a free port), its export cache warmed first;
  * load: C clients (C = 1, 8, 32), each on its own keep-alive connection, POST camera-sized JPEGs
    (500 x 375 and 375 x 500, crops of scikit-learn's sample photographs, `predict_folder.build_jpegs`)
    as multipart uploads back to back for `--seconds` (after a short warm-up); images/s is answered
    requests per second, p50 / p99 their latency as the client sees it; the mean batch the server
    ran comes from its /metrics;
  * the model alone: the same runtime (`runtime.load_runtime`, the same cached graph) in this process,
    right after the 32 clients while the server idles (a shared machine's speed drifts), called from a
    thread as the server's model thread calls it, on a batch of the size the server ran at 32 clients
    (its mean, rounded), already in memory: median of timed calls;
  * a soak: 32 clients for `--soak-s`; errors, and the server's resident memory (VmRSS) after the
    warm-up and at the end;
  * the answers: 8 of the JPEGs through `swinv2 predict --runtime R --json` and through the server:
    the same top-1, fp32 probabilities within 1e-5.

The load generator is `http_load.py` (asyncio, raw HTTP/1.1, loopback only), in this process: on a
2-core machine it takes CPU from the server, as any client on the same machine would.

    python benchmarks/serve_load.py [--seconds 20] [--soak-s 120] [--models tiny,micro]
                                    [--runtimes openvino,torch]

Writes benchmarks/results/serve.{md,json}. Work goes to runs/serve_load/ (JPEGs, weights, export cache).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from http_load import get, multipart_bytes, request_bytes, run_load, wait_ready
from predict_folder import build_jpegs

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "runs" / "serve_load"
RESULTS = ROOT / "benchmarks" / "results" / "serve"
HOST = "127.0.0.1"
MODELS = {"tiny": "swinv2_tiny_window8_256", "micro": "swinv2_micro_window4_32"}
CLIENTS = (1, 8, 32)
MAX_BATCH = 32
_URL = re.compile(r"swinv2 serve: http://127\.0\.0\.1:(\d+)/")


def build_weights(name: str, path: Path) -> Path:
    """`name` with drawn weights, saved self-describing (kept when present)."""
    import swinv2
    from swinv2.tools.bench import randomize_weights_

    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        swinv2.save_weights(randomize_weights_(swinv2.create_model(name)), path, model_name=name)
    return path


class Server:
    """`swinv2 serve` in its own process on a free port of 127.0.0.1."""

    def __init__(self, weights: Path, runtime: str, cache: Path, log: Path, threads: int | None) -> None:
        self.cmd = [
            sys.executable,
            "-m",
            "swinv2",
            "serve",
            "--weights",
            str(weights),
            "--runtime",
            runtime,
            "--cache-dir",
            str(cache),
            "--host",
            HOST,
            "--port",
            "0",
            "--max-batch",
            str(MAX_BATCH),
            "--max-wait-ms",
            "5",
            "--queue",
            "128",
            *(["--threads", str(threads)] if threads else []),
        ]
        self.log_path = log
        self._log = open(log, "wb")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        end = time.monotonic() + 600
        while (m := _URL.search(log.read_text(errors="replace"))) is None:
            if self.proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"swinv2 serve did not start:\n{log.read_text(errors='replace')}")
            time.sleep(0.1)
        self.port = int(m.group(1))
        wait_ready(HOST, self.port, "/health", timeout=900)

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def metric(self, name: str) -> float:
        for line in get(HOST, self.port, "/metrics")[1].decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise KeyError(name)

    def stop(self) -> int:
        os.kill(self.proc.pid, signal.SIGTERM)
        code = self.proc.wait(120)
        self._log.close()
        return code


def _load(server: Server, bodies: list[bytes], clients: int, seconds: float) -> dict:
    """One load level: warm-up, then `seconds` of load; its summary with the mean batch the server ran."""
    run_load(HOST, server.port, bodies, concurrency=clients, per_client=3, max_seconds=min(10.0, seconds))
    sizes, batches = server.metric("swinv2_batch_size_sum"), server.metric("swinv2_batch_size_count")
    res = run_load(HOST, server.port, bodies, concurrency=clients, per_client=100_000, max_seconds=seconds)
    out = res.summary()
    n_batches = server.metric("swinv2_batch_size_count") - batches
    out["mean_batch"] = round((server.metric("swinv2_batch_size_sum") - sizes) / n_batches, 2) if n_batches else None
    out["errors"] = out["requests"] - out["ok"] + out["connect_errors"]
    return out


def _soak(server: Server, bodies: list[bytes], seconds: float) -> dict:
    """32 clients for `seconds`: errors and resident memory, after a warm-up of a tenth of the time (at
    least 10 s) and then every 10 s."""
    warm = max(10.0, seconds / 10)
    run_load(HOST, server.port, bodies, concurrency=32, per_client=100_000, max_seconds=warm)
    rss = [server.rss_mb()]
    results = []
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0.5:
        res = run_load(HOST, server.port, bodies, concurrency=32, per_client=100_000, max_seconds=min(10.0, left))
        results.append(res.summary())
        rss.append(server.rss_mb())
    requests = sum(r["requests"] for r in results)
    errors = sum(r["requests"] - r["ok"] + r["connect_errors"] for r in results)
    return {
        "seconds": round(seconds, 1),
        "warmup_s": warm,
        "requests": requests,
        "errors": errors,
        "rss_after_warmup_mb": round(rss[0], 1),
        "rss_end_mb": round(rss[-1], 1),
        "rss_max_mb": round(max(rss), 1),
        "rss_growth_mb": round(rss[-1] - rss[0], 1),
        "rss_samples_mb": [round(r, 1) for r in rss],
    }


def _parity(server: Server, weights: Path, runtime: str, cache: Path, images: list[Path]) -> dict:
    """The served answers of `images` against `swinv2 predict --json` on the same files and runtime."""
    import http.client

    out = WORK / f"predict-{weights.stem}-{runtime}.json"
    cmd = [
        sys.executable,
        "-m",
        "swinv2",
        "predict",
        "--weights",
        str(weights),
        "--runtime",
        runtime,
        "--cache-dir",
        str(cache),
        "--topk",
        "5",
        "--json",
        str(out),
        *map(str, images),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"swinv2 predict failed: {done.stderr[-1000:]}")
    reference = {r["path"]: r["top"] for r in json.loads(out.read_text())["results"]}
    same_top1, max_diff = 0, 0.0
    for path in images:
        body, ctype = multipart_bytes("file", path.name, path.read_bytes())
        conn = http.client.HTTPConnection(HOST, server.port, timeout=120)
        conn.request("POST", "/v1/predict?topk=5", body=body, headers={"Content-Type": ctype})
        answer = json.loads(conn.getresponse().read())
        conn.close()
        ref = reference[str(path)]
        same_top1 += answer["top"][0]["index"] == ref[0]["index"]
        by_index = {t["index"]: t["prob"] for t in ref}
        max_diff = max(
            [max_diff] + [abs(t["prob"] - by_index[t["index"]]) for t in answer["top"] if t["index"] in by_index]
        )
    return {
        "images": len(images),
        "same_top1": same_top1,
        "max_abs_prob_diff": max_diff,
        "within_1e-5": max_diff <= 1e-5 and same_top1 == len(images),
    }


def _model_alone(weights: Path, runtime: str, cache: Path, batch: int, threads: int | None) -> float:
    """img/s of the runtime alone on a batch of `batch` images in memory (median of timed calls), with the
    server's threads, called from a thread of its own as the server's model thread calls it."""
    import threading

    out: list[float] = []
    worker = threading.Thread(target=lambda: out.append(_time_runtime(weights, runtime, cache, batch, threads)))
    worker.start()
    worker.join()
    return out[0]


def _time_runtime(weights: Path, runtime: str, cache: Path, batch: int, threads: int | None) -> float:
    import torch

    import swinv2
    from swinv2.serve.runtime import load_runtime
    from swinv2.timing import median_seconds

    if threads:
        torch.set_num_threads(threads)
    rt = load_runtime(swinv2.load_model(weights), runtime, "fp32", weights=weights, cache_dir=cache, threads=threads)
    x = torch.randn(batch, 3, rt.img_size, rt.img_size, generator=torch.Generator().manual_seed(0))
    calls = max(3, min(10, int(20 / max(0.05, median_seconds(lambda: rt(x), calls=1, warmup=1)))))
    return batch / median_seconds(lambda: rt(x), calls=calls, warmup=1)


def measure(
    models: list[str], runtimes: list[str], *, seconds: float, soak_s: float, threads: int | None = None
) -> dict:
    folder = build_jpegs(WORK / "jpegs64", 64)
    images = sorted(folder.glob("*.jpg"))
    bodies = []
    for p in images:
        body, ctype = multipart_bytes("file", p.name, p.read_bytes())
        bodies.append(request_bytes("POST", "/v1/predict?topk=5", body=body, content_type=ctype))
    cache = WORK / "cache"
    runs = []
    for key in models:
        name = MODELS[key]
        weights = build_weights(name, WORK / f"{name}.safetensors")
        for runtime in runtimes:
            print(f"== {name} on {runtime}", flush=True)
            started = time.monotonic()
            server = Server(weights, runtime, cache, WORK / f"server-{key}-{runtime}.log", threads)
            record: dict = {
                "model": name,
                "runtime": runtime,
                "precision": "fp32",
                "start_s": round(time.monotonic() - started, 1),
                "levels": {},
            }
            try:
                record["parity"] = _parity(server, weights, runtime, cache, images[:8])
                print(f"   parity {record['parity']}", flush=True)
                for c in CLIENTS:
                    record["levels"][str(c)] = lvl = _load(server, bodies, c, seconds)
                    print(
                        f"   {c:2d} clients: {lvl['req_per_s']:7.2f} img/s  p50 {lvl['p50_ms']} ms  p99 "
                        f"{lvl['p99_ms']} ms  errors {lvl['errors']}  mean batch {lvl['mean_batch']}",
                        flush=True,
                    )
                # the model alone right after the 32 clients, the server idle: the same minute of a shared machine
                batch = max(1, round(record["levels"]["32"]["mean_batch"] or 1))
                alone = _model_alone(weights, runtime, cache, batch, threads)
                record["model_alone"] = {"batch": batch, "img_per_s": round(alone, 2)}
                record["served_over_alone"] = round(record["levels"]["32"]["req_per_s"] / alone, 3)
                print(
                    f"   model alone at batch {batch}: {alone:.2f} img/s; served / alone {record['served_over_alone']}",
                    flush=True,
                )
                if soak_s > 0:
                    record["soak"] = _soak(server, bodies, soak_s)
                    print(f"   soak {record['soak']}", flush=True)
            finally:
                record["exit_code"] = server.stop()
            runs.append(record)
    from swinv2.hardware import cpu_name

    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cpu": cpu_name(),
        "cpus": os.cpu_count(),
        "seconds_per_level": seconds,
        "soak_s": soak_s,
        "max_batch": MAX_BATCH,
        "images": len(images),
        "threads": threads,
        "command": " ".join(["python", "benchmarks/serve_load.py", *sys.argv[1:]]),
        "runs": runs,
        "load_avg_after": os.getloadavg(),
    }


def markdown(rec: dict) -> str:
    lines = [
        "# `swinv2 serve` under load on loopback",
        "",
        f"`{rec['command']}` on {rec['date']} ({rec['cpu']}, {rec['cpus']} CPUs, shared with other work: "
        f"load average {rec['load_avg_after'][0]:.1f} at the end). Server: `swinv2 serve --runtime R "
        f"--max-batch {rec['max_batch']} --max-wait-ms 5 --queue 128"
        f"{' --threads ' + str(rec['threads']) if rec.get('threads') else ''}`, fp32, drawn weights; clients: "
        f"keep-alive connections on 127.0.0.1 posting {rec['images']} camera-sized JPEGs (500x375, multipart) "
        f"back to back, {rec['seconds_per_level']:g} s per level after a warm-up, in the same machine.",
        "",
        "| model | runtime | clients | img/s | p50 ms | p99 ms | errors | mean batch |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rec["runs"]:
        for c, lvl in r["levels"].items():
            lines.append(
                f"| {r['model']} | {r['runtime']} | {c} | {lvl['req_per_s']:.2f} | {lvl['p50_ms']} | "
                f"{lvl['p99_ms']} | {lvl['errors']} | {lvl['mean_batch']} |"
            )
    lines += [
        "",
        "At 32 clients, served against the same runtime alone on a batch of the size the server ran "
        "(images already in memory, no HTTP, no decoding):",
        "",
        "| model | runtime | served img/s | model alone img/s (batch) | served / alone |",
        "|---|---|---:|---:|---:|",
    ]
    for r in rec["runs"]:
        alone = r["model_alone"]
        lines.append(
            f"| {r['model']} | {r['runtime']} | {r['levels']['32']['req_per_s']:.2f} | "
            f"{alone['img_per_s']:.2f} ({alone['batch']}) | {r['served_over_alone']:.2f} |"
        )
    if any("soak" in r for r in rec["runs"]):
        lines += [
            "",
            f"Soak at 32 clients ({rec['soak_s']:g} s after a warm-up):",
            "",
            "| model | runtime | requests | errors | RSS after warm-up MB | RSS end MB | growth MB |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for r in rec["runs"]:
            if "soak" in r:
                s = r["soak"]
                lines.append(
                    f"| {r['model']} | {r['runtime']} | {s['requests']} | {s['errors']} | "
                    f"{s['rss_after_warmup_mb']} | {s['rss_end_mb']} | {s['rss_growth_mb']:+.1f} |"
                )
    lines += [
        "",
        "The served answers against `swinv2 predict --json` on the same 8 JPEGs and runtime:",
        "",
        "| model | runtime | same top-1 | max abs prob diff | within 1e-5 | exit code after SIGTERM |",
        "|---|---|---:|---:|---|---:|",
    ]
    for r in rec["runs"]:
        p = r["parity"]
        lines.append(
            f"| {r['model']} | {r['runtime']} | {p['same_top1']}/{p['images']} | {p['max_abs_prob_diff']:.2e} "
            f"| {'yes' if p['within_1e-5'] else 'NO'} | {r['exit_code']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=20.0, help="load per concurrency level (default 20)")
    ap.add_argument("--soak-s", type=float, default=120.0, help="soak length at 32 clients, 0 for none (default 120)")
    ap.add_argument("--models", default="tiny,micro")
    ap.add_argument("--runtimes", default="openvino,torch")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="the server's --threads, and the model alone's (default: the runtime's own, every core)",
    )
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    rec = measure(
        args.models.split(","), args.runtimes.split(","), seconds=args.seconds, soak_s=args.soak_s, threads=args.threads
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rec, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(rec))
    print(markdown(rec))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
