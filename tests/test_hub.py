"""Weights by name (`swinv2.weights.hub`): records, the real huggingface_hub download path against a local
stand-in for the hub, parity with the reference models holding the served weights, every failure.

Nothing here reaches the network: `FakeHub` is an HTTP server on 127.0.0.1 that answers the hub's
resolve endpoint (`/{repo}/resolve/{revision}/{file}`, HEAD and GET, with the ETag / X-Linked-Etag /
X-Linked-Size / X-Repo-Commit / Content-Length headers and HTTP ranges that `hf_hub_download` uses)
and its file listing (`POST /api/models/{repo}/paths-info/{revision}`, what `HfApi.get_paths_info`
reads), and huggingface_hub's endpoint, cache folder and offline flag are pointed at it / at tmp_path
for each test.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs

import numpy as np
import pytest
import torch
from huggingface_hub import constants
from safetensors.torch import save as safetensors_bytes

import swinv2
from randomize import randomize_
from swinv2 import cli
from swinv2.config import load_config
from swinv2.errors import ConfigError
from swinv2.train.engine import build_model
from swinv2.weights import hub
from swinv2.weights.convert import convert_state_dict
from swinv2.weights.factory import create_model, load_model, load_weights
from swinv2.weights.registry import get_variant, list_models

TOL = 1e-5
TINY = "swinv2_tiny_window8_256"
MICRO = "swinv2_micro_window4_32"


# --------------------------------------------------------------------------- the stand-in hub


def git_blob_id(data: bytes) -> str:
    """git's id of a blob: what the hub publishes (ETag, listing) for a file kept in git."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(data: bytes) -> bytes:
    """The pointer file git keeps in place of an LFS file."""
    return (
        f"version https://git-lfs.github.com/spec/v1\noid sha256:{hashlib.sha256(data).hexdigest()}\nsize {len(data)}\n"
    ).encode()


class FakeHub:
    """Serves {(repo, filename): bytes} as the hub does: .safetensors / .bin as LFS files (ETag the git
    id of the pointer, X-Linked-Etag the SHA-256, X-Linked-Size), others kept in git (ETag the git blob
    id), and lists them (LFS SHA-256 and size, git blob id). Faults: `cut[key]` = byte counts after
    which successive GETs drop the connection, `corrupt` = keys served with flipped bytes under the
    true ETag and listing, `opaque` = keys whose ETag is no hash (as some mirrors send) and no
    X-Linked-Etag, `listing = False`: no file listing (404)."""

    def __init__(self) -> None:
        self.files: dict[tuple[str, str], bytes] = {}
        self.cut: dict[tuple[str, str], list[int]] = {}
        self.corrupt: set[tuple[str, str]] = set()
        self.opaque: set[tuple[str, str]] = set()
        self.listing = True
        self.log: list[tuple[str, str, str | None]] = []  # (method, repo/file, Range header)
        hub_ = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                self._answer(body=False)

            def do_GET(self) -> None:
                self._answer(body=True)

            def do_POST(self) -> None:  # the file listing: /api/models/{repo}/paths-info/{revision}
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
                head, sep, _ = self.path.partition("/paths-info/")
                repo = head.removeprefix("/api/models/")
                hub_.log.append(("POST", f"{repo}/paths-info", None))
                if not (sep and hub_.listing and any(r == repo for r, _ in hub_.files)):
                    return self._error(404, "RepoNotFound", commit=None)
                entries = []
                for path in parse_qs(body).get("paths", []):
                    data = hub_.files.get((repo, path))
                    if data is None:
                        continue
                    entry = {"type": "file", "path": path, "size": len(data), "oid": git_blob_id(data)}
                    if path.endswith((".safetensors", ".bin")):
                        pointer = lfs_pointer(data)
                        entry |= {
                            "oid": git_blob_id(pointer),
                            "lfs": {
                                "oid": hashlib.sha256(data).hexdigest(),
                                "size": len(data),
                                "pointerSize": len(pointer),
                            },
                        }
                    entries.append(entry)
                raw = json.dumps(entries).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def _answer(self, body: bool) -> None:
                repo, sep, rest = self.path.lstrip("/").partition("/resolve/")
                if not sep:  # e.g. huggingface_hub's own /api/agent-harnesses look-up (best-effort telemetry)
                    return self._error(404, "RepoNotFound", commit=None)
                filename = rest.split("/", 1)[1] if "/" in rest else ""
                key = (repo, filename)
                hub_.log.append((self.command, f"{repo}/{filename}", self.headers.get("Range")))
                commit = hashlib.sha1(repo.encode()).hexdigest()
                if not any(r == repo for r, _ in hub_.files):
                    return self._error(404, "RepoNotFound", commit=None)
                if key not in hub_.files:
                    return self._error(404, "EntryNotFound", commit=commit)
                data = hub_.files[key]
                lfs = filename.endswith((".safetensors", ".bin"))
                start = 0
                rng = self.headers.get("Range")
                if body and rng:
                    start = int(rng.split("=")[1].split("-")[0])
                self.send_response(206 if start else 200)
                if key in hub_.opaque:
                    self.send_header("ETag", f'"mirror-{len(data):x}-{zlib.crc32(data):08x}"')
                elif lfs:
                    self.send_header("ETag", f'"{git_blob_id(lfs_pointer(data))}"')
                    self.send_header("X-Linked-Etag", f'"{hashlib.sha256(data).hexdigest()}"')
                    self.send_header("X-Linked-Size", str(len(data)))
                else:
                    self.send_header("ETag", f'"{git_blob_id(data)}"')
                self.send_header("X-Repo-Commit", commit)
                self.send_header("Content-Length", str(len(data) - start))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if not body:
                    return
                payload = bytes(b ^ 0xFF for b in data) if key in hub_.corrupt else data
                payload = payload[start:]
                cuts = hub_.cut.get(key)
                if cuts:
                    n = cuts.pop(0)
                    self.wfile.write(payload[:n])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                self.wfile.write(payload)

            def _error(self, status: int, code: str, commit: str | None) -> None:
                self.send_response(status)
                self.send_header("X-Error-Code", code)
                if commit:
                    self.send_header("X-Repo-Commit", commit)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def add(self, repo: str, filename: str, data: bytes) -> None:
        self.files[(repo, filename)] = data

    def gets(self) -> list[tuple[str, str | None]]:
        return [(f, r) for m, f, r in self.log if m == "GET"]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _point_hub_at(monkeypatch: pytest.MonkeyPatch, endpoint: str, cache: Path, offline: bool = False) -> None:
    """huggingface_hub reads HF_ENDPOINT / HF_HOME / HF_HUB_OFFLINE at import: set its constants."""
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(cache.parent / ".agent_harnesses.json"), raising=False)


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    server = FakeHub()
    _point_hub_at(monkeypatch, server.url, tmp_path / "hf" / "hub")
    yield server
    server.close()


def _cache_files(cache: Path) -> list[str]:
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file() and ".locks" not in p.parts)


# --------------------------------------------------------------------------- weights in each source format


def _st(sd: dict[str, torch.Tensor]) -> bytes:
    return safetensors_bytes({k: v.contiguous() for k, v in sd.items()}, metadata={"format": "pt"})


def _pt(sd: dict[str, torch.Tensor]) -> bytes:
    buf = io.BytesIO()
    torch.save(dict(sd), buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def tiny_timm() -> tuple[torch.nn.Module, bytes]:
    """timm's SwinV2-T with random weights, and those weights as the hub's model.safetensors (timm keys)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ref = randomize_(timm.create_model(TINY, pretrained=False), seed=1).eval()
    return ref, _st(ref.state_dict())


def _logits(model, x):
    with torch.no_grad():
        return model(x)


def _close(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert ref.abs().max() > 0.1  # the bound is orders of magnitude below the signal
    assert (out - ref).abs().max().item() <= TOL


# A micro-sized record, so that transfer and fault tests move kilobytes, not hundreds of megabytes.
@pytest.fixture
def micro_record(monkeypatch):
    def make(tag: str, files: tuple[hub.HubFile, ...], num_classes: int = 10) -> hub.WeightsRecord:
        rec = hub.WeightsRecord(
            variant=MICRO,
            tag=tag,
            arch=MICRO,
            classes="test",
            num_classes=num_classes,
            top1=None,
            files=files,
            official_url="https://example.invalid/micro.pth",
        )
        monkeypatch.setitem(hub.RECORDS, MICRO, hub.RECORDS.get(MICRO, ()) + (rec,))
        return rec

    return make


def _micro_weights(num_classes: int = 10, seed: int = 0, **kw) -> swinv2.SwinTransformerV2:
    return randomize_(create_model(MICRO, num_classes=num_classes, **kw), seed).eval()


# --------------------------------------------------------------------------- records


def test_every_official_variant_has_a_record_read_from_timm():
    """The timm keys and official URLs are timm's own `default_cfgs` (the installed reference)."""
    from timm.models import get_pretrained_cfg

    assert set(hub.RECORDS) == set(list_models())
    for rec in hub.all_records():
        assert rec.spec == f"{rec.variant}.{rec.tag}" and rec.tag in {"ms_in1k", "ms_in22k", "ms_in22k_ft_in1k"}
        timm_key = f"{rec.arch}.{rec.tag}"
        cfg = get_pretrained_cfg(timm_key)
        assert cfg is not None, timm_key
        assert [str(f) for f in rec.files[:2]] == [
            f"timm/{timm_key}/model.safetensors",
            f"timm/{timm_key}/pytorch_model.bin",
        ]
        assert rec.official_url == cfg.url
        assert cfg.num_classes == rec.num_classes == get_variant(rec.arch).config.num_classes
        alias = get_variant(rec.arch).aliases[0]
        assert rec.files[2] == hub.HubFile("microsoft/" + alias.replace("_", "-"), "pytorch_model.bin", "hf")
        assert rec.official_url.endswith(f"/v2.0.0/{alias}.pth")
        assert rec.top1 == (get_variant(rec.variant).top1 if rec.arch == rec.variant else None)
        assert all(f.sha256 is None and f.size is None for f in rec.files)  # none published


def test_resolution_of_names_tags_and_errors():
    assert hub.lookup(TINY).tag == "ms_in1k"
    assert hub.lookup("swinv2_tiny_patch4_window8_256.ms_in1k").variant == TINY  # official alias
    ft = "swinv2_base_window12to16_192to256"
    assert [r.tag for r in hub.records(ft)] == ["ms_in22k_ft_in1k", "ms_in22k"]
    start = hub.resolve_pretrained(ft, "ms_in22k")
    assert start.arch == "swinv2_base_window12_192" and start.num_classes == 21841 and start.top1 is None
    assert hub.resolve_pretrained(ft, True).tag == "ms_in22k_ft_in1k"
    assert hub.resolve_pretrained(ft, "swinv2_base_window12_192.ms_in22k").variant == "swinv2_base_window12_192"
    with pytest.raises(KeyError, match=r"unknown weights tag 'ms_in21k' for swinv2_tiny_window8_256; valid: ms_in1k"):
        hub.lookup("swinv2_tiny_window8_256.ms_in21k")
    with pytest.raises(KeyError, match="swinv2_micro_window4_32 has no pretrained weights"):
        hub.resolve_pretrained(MICRO, True)
    with pytest.raises(KeyError, match="did you mean 'swinv2_tiny_window8_256'"):
        hub.lookup("swinv2_tiny_windw8_256.ms_in1k")
    assert hub.looks_like_name("swinv2_tiny_windw8_256.ms_in1k")
    assert not hub.looks_like_name("runs/x/best.safetensors") and not hub.looks_like_name("swinv2_t.pth")


# --------------------------------------------------------------------------- parity in each source format


@pytest.mark.slow  # about 30 s; the CLI by-name test covers the path in `make test`
def test_timm_safetensors_by_name_gives_timm_logits(fake_hub, tmp_path, tiny_timm):
    ref, data = tiny_timm
    sd = ref.state_dict()
    fake_hub.add(f"timm/{TINY}.ms_in1k", "model.safetensors", data)
    x = torch.randn(1, 3, 256, 256)
    expected = _logits(ref, x)

    model = swinv2.create_model(TINY, pretrained=True).eval()
    _close(_logits(model, x), expected)
    assert fake_hub.gets() == [(f"timm/{TINY}.ms_in1k/model.safetensors", None)]  # safetensors first, one GET

    loaded = load_model(f"{TINY}.ms_in1k")  # the CLI's --weights path: no second download
    assert loaded.info.model_name == TINY and loaded.info.load_report.src == "timm"
    assert loaded.info.preprocess == get_variant(TINY).preprocess
    _close(_logits(loaded, x), expected)
    assert len(fake_hub.gets()) == 1

    # The manual alternative the offline error names: the official .pth, passed with --model.
    official = tmp_path / "swinv2_tiny_patch4_window8_256.pth"
    torch.save({"model": convert_state_dict(sd, src="timm", dst="official")}, official)
    _close(_logits(load_model(official, name=TINY), x), expected)


def test_torch_file_when_the_repo_has_no_safetensors(fake_hub, micro_record):
    model = _micro_weights(seed=2)
    sd = convert_state_dict(model.state_dict(), dst="timm")
    repo = "timm/micro.test"
    fake_hub.add(repo, "pytorch_model.bin", _pt(sd))
    rec = micro_record(
        "bin", (hub.HubFile(repo, "model.safetensors", "timm"), hub.HubFile(repo, "pytorch_model.bin", "timm"))
    )
    path = hub.fetch(rec)
    assert path.name == "pytorch_model.bin"
    x = torch.randn(2, 3, 32, 32)
    _close(_logits(create_model(MICRO, num_classes=10, pretrained="bin").eval(), x), _logits(model, x))


@pytest.mark.slow  # about 25 s
def test_microsoft_transformers_repo_when_timm_has_none(fake_hub):
    """The transformers weights (the microsoft/ repo) give transformers' own logits."""
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.Swinv2Config(
        image_size=256,
        embed_dim=96,
        depths=[2, 2, 6, 2],
        num_heads=[3, 6, 12, 24],
        window_size=8,
        num_labels=1000,
        drop_path_rate=0.0,
    )
    ref = randomize_(transformers.Swinv2ForImageClassification(hf_cfg), seed=3).eval()
    ms = "microsoft/swinv2-tiny-patch4-window8-256"
    fake_hub.add(ms, "config.json", json.dumps(hf_cfg.to_dict()).encode())
    fake_hub.add(ms, "pytorch_model.bin", _pt(ref.state_dict()))
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        expected = ref(pixel_values=x).logits

    model = load_model(f"{TINY}.ms_in1k")
    assert model.info.load_report.src == "hf"
    _close(_logits(model, x), expected)
    tried = [f for f, _ in fake_hub.gets()]  # timm's repo missing: the microsoft one is used
    assert tried == [f"{ms}/pytorch_model.bin"]
    heads = [f for m, f, _ in fake_hub.log if m == "HEAD"]
    assert heads[:2] == [f"timm/{TINY}.ms_in1k/model.safetensors", f"timm/{TINY}.ms_in1k/pytorch_model.bin"]


def test_22k_start_point_into_a_finetune_architecture_maps_head_and_windows(fake_hub, micro_record):
    """A `ms_in22k`-like record (21841 classes, window 4) into a 1000-class window-8 model: the same
    model as loading the file directly (official 22k->1k map, window transfer)."""
    src = _micro_weights(num_classes=21841, seed=4)
    repo = "timm/micro22k.test"
    fake_hub.add(repo, "model.safetensors", _st(convert_state_dict(src.state_dict(), dst="timm")))
    rec = micro_record("in22k", (hub.HubFile(repo, "model.safetensors", "timm"),), num_classes=21841)
    model = create_model(MICRO, num_classes=1000, window_size=8, pretrained_window_sizes=4, pretrained="in22k").eval()
    direct = create_model(MICRO, num_classes=1000, window_size=8, pretrained_window_sizes=4).eval()
    report = load_weights(direct, hub.fetch(rec))
    assert any("21841 -> 1000" in r for r in report.reshaped)
    for k, v in direct.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    # By name on the command line: the named variant (1000 classes) with the head mapped, as above.
    by_name = load_model(f"{MICRO}.in22k", window_size=8, pretrained_window_sizes=4)
    assert by_name.config.num_classes == 1000 and by_name.info.model_name == MICRO
    assert torch.equal(by_name.head.weight, direct.head.weight)


@pytest.mark.slow
@pytest.mark.parametrize("spec", [r.spec for r in hub.all_records()])
def test_every_record_builds_its_variant_from_the_stand_in(fake_hub, spec):
    """Every record, from timm-format random weights served by the stand-in, into its variant:
    the same logits as timm's model of that architecture holding those weights (for a 22k start
    point: as loading the file directly)."""
    timm = pytest.importorskip("timm")
    rec = hub.lookup(spec)
    ref = randomize_(timm.create_model(rec.arch, pretrained=False), seed=5).eval()
    fake_hub.add(rec.files[0].repo, rec.files[0].filename, _st(ref.state_dict()))
    model = create_model(rec.variant, pretrained=rec.tag).eval()
    x = torch.randn(1, 3, *get_variant(rec.variant).config.img_size)
    if rec.arch == rec.variant:
        _close(_logits(model, x), _logits(ref, x))
    else:
        direct = create_model(rec.variant, weights=hub.fetch(rec)).eval()
        assert torch.equal(_logits(model, x), _logits(direct, x))


# --------------------------------------------------------------------------- CLI


def test_cli_eval_predict_download_models_by_name(fake_hub, tmp_path, capsys, tiny_timm):
    from PIL import Image

    fake_hub.add(f"timm/{TINY}.ms_in1k", "model.safetensors", tiny_timm[1])
    spec = f"{TINY}.ms_in1k"
    assert cli.main(["models"]) == 0
    row = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(TINY + " "))
    assert row.endswith("ms_in1k")  # not cached yet

    assert cli.main(["download", spec]) == 0
    out = capsys.readouterr().out
    path = hub.fetch(spec)
    assert f"{spec}: {path}" in out and str(hub.cache_dir()) in out and path.is_relative_to(tmp_path)
    assert cli.main(["models"]) == 0
    row = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(TINY + " "))
    assert row.endswith("ms_in1k*")

    # eval: 1000 unnamed classes = the sorted class folders; one 32 px image each, evaluated at 32 px.
    data = tmp_path / "val"
    g = torch.Generator().manual_seed(0)
    for i in range(1000):
        (data / f"c{i:04d}").mkdir(parents=True)
        pixels = (torch.rand(8, 8, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(data / f"c{i:04d}" / "x.png")
    rc = cli.main(
        [
            "eval",
            "--weights",
            spec,
            "--data",
            str(data),
            "--img-size",
            "32",
            "--crop-pct",
            "1",
            "--batch-size",
            "250",
            "--json",
            str(tmp_path / "eval.json"),
        ]
    )
    assert rc == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["weights"] == spec and report["n"] == 1000
    capsys.readouterr()
    rc = cli.main(["predict", "--weights", spec, "--json", "--topk", "3", str(data / "c0007" / "x.png")])
    assert rc == 0
    preds = json.loads(capsys.readouterr().out)
    assert len(preds["results"][0]["top"]) == 3 and preds["class_names_from"] == "imagenet-1k (torchvision)"
    assert len(fake_hub.gets()) == 1  # downloaded once, then always the cache


def test_convert_takes_a_name_too(fake_hub, micro_record, tmp_path, capsys):
    src = _micro_weights(seed=8)
    repo = "timm/micro.convert"
    fake_hub.add(repo, "model.safetensors", _st(convert_state_dict(src.state_dict(), dst="timm")))
    micro_record("conv", (hub.HubFile(repo, "model.safetensors", "timm"),))
    out = tmp_path / "micro.safetensors"
    assert cli.main(["convert", f"{MICRO}.conv", str(out)]) == 0
    assert f"wrote {out} (native)" in capsys.readouterr().out
    back = load_model(out)  # self-describing now: architecture, model name
    assert back.info.model_name == MICRO
    for k, v in src.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


# --------------------------------------------------------------------------- failures


def _one_line_error(capsys, argv: list[str]) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"swinv2 {argv[0]}: error: ")
    return err


def test_offline_and_not_cached_names_repo_file_and_manual_alternative(fake_hub, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    err = _one_line_error(capsys, ["eval", "--weights", f"{TINY}.ms_in1k", "--data", str(tmp_path)])
    assert f"timm/{TINY}.ms_in1k/model.safetensors" in err and "HF_HUB_OFFLINE" in err
    assert f"swinv2 download {TINY}.ms_in1k" in err
    assert hub.OFFICIAL_RELEASE + "swinv2_tiny_patch4_window8_256.pth" in err
    assert f"--model {TINY}" in err
    assert fake_hub.log == [] and not (tmp_path / "hf" / "hub").exists()  # nothing asked, nothing written
    with pytest.raises(hub.WeightsUnavailableError):
        swinv2.create_model(TINY, pretrained=True)


def test_hub_unreachable_is_one_line_too(tmp_path, monkeypatch, capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _point_hub_at(monkeypatch, f"http://127.0.0.1:{port}", tmp_path / "hub")

    def no_backoff(seconds):
        raise AssertionError("no network must fail at once, not after huggingface_hub's back-off")

    monkeypatch.setattr(time, "sleep", no_backoff)
    err = _one_line_error(capsys, ["download", f"{TINY}.ms_in1k"])
    assert f"cannot reach http://127.0.0.1:{port}" in err and f"swinv2 download {TINY}.ms_in1k" in err


def test_offline_uses_the_cache_without_asking(fake_hub, monkeypatch, micro_record):
    repo = "timm/micro.cache"
    fake_hub.add(repo, "model.safetensors", _st(convert_state_dict(_micro_weights().state_dict(), dst="timm")))
    rec = micro_record("cache", (hub.HubFile(repo, "model.safetensors", "timm"),))
    first = hub.fetch(rec)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    n = len(fake_hub.log)
    assert hub.fetch(rec) == first and hub.is_cached(rec)
    fake_hub.close()  # not even a server
    assert hub.fetch(rec) == first and len(fake_hub.log) == n


def test_unknown_tag_lists_the_valid_ones(capsys, tmp_path):
    err = _one_line_error(capsys, ["predict", "--weights", "swinv2_base_window12to16_192to256.in22k", str(tmp_path)])
    assert "valid: ms_in22k_ft_in1k, ms_in22k" in err
    with pytest.raises(KeyError, match="valid: ms_in1k"):
        swinv2.create_model(TINY, pretrained="ms_in22k")


# What catches a download corrupted in transit, per what the hub publishes for the file: (served as,
# ETag no hash, file listing) -> the words naming the digest that caught it.
CORRUPTIONS = {
    "lfs": ("model.safetensors", False, True, "SHA-256 {got} is not the hub's file listing (LFS SHA-256)"),
    "lfs-no-listing": ("model.safetensors", False, False, "SHA-256 {got} is not the hub's (its ETag)"),
    "lfs-opaque-etag": ("model.safetensors", True, True, "SHA-256 {got} is not the hub's file listing (LFS SHA-256)"),
    "git": ("model.pt", False, True, "git blob id {got} is not the hub's file listing (git blob id)"),
    "git-no-listing": ("model.pt", False, False, "git blob id {got} is not the hub's (its ETag)"),
    "git-opaque-etag": ("model.pt", True, True, "git blob id {got} is not the hub's file listing (git blob id)"),
}


@pytest.mark.parametrize("case", CORRUPTIONS)
def test_a_corrupted_download_is_refused_and_removed(fake_hub, micro_record, capsys, case):
    """Bytes flipped in transit under the true ETag and listing, whatever the ETag is: an LFS SHA-256,
    a git blob id, or no hash at all (the file listing then catches it): one line, nothing kept; the
    next download, whole, is used."""
    filename, opaque, listing, says = CORRUPTIONS[case]
    repo = f"timm/{case}.micro"
    data = _st(convert_state_dict(_micro_weights().state_dict(), dst="timm"))
    key = (repo, filename)
    fake_hub.add(*key, data)
    fake_hub.corrupt.add(key)
    if opaque:
        fake_hub.opaque.add(key)
    fake_hub.listing = listing
    rec = micro_record(case.replace("-", "_"), (hub.HubFile(repo, filename, "timm"),))
    cache = Path(constants.HF_HUB_CACHE)
    err = _one_line_error(capsys, ["download", rec.spec])
    corrupted = bytes(b ^ 0xFF for b in data)
    got = (hashlib.sha256(corrupted).hexdigest() if "SHA-256" in says else git_blob_id(corrupted))[:16] + "..."
    assert f"{repo}/{filename}: the download was corrupted: its {says.format(got=got)}" in err
    assert f"removed from the cache {cache}: run the command again" in err
    assert not hub.is_cached(rec) and [f for f in _cache_files(cache) if "/blobs/" in f or "/snapshots/" in f] == []
    assert ("POST", f"{repo}/paths-info", None) in fake_hub.log  # the listing was asked for, answered or not
    fake_hub.corrupt.clear()
    assert hub.fetch(rec).read_bytes() == data


def test_a_download_nothing_published_names_is_used_with_a_warning(fake_hub, micro_record, caplog):
    """A mirror whose ETag is no hash and which has no file listing: nothing to check the file against;
    it is used, and a warning says it was not verified."""
    repo = "timm/micro.mirror"
    data = _st(convert_state_dict(_micro_weights().state_dict(), dst="timm"))
    fake_hub.add(repo, "model.safetensors", data)
    fake_hub.opaque.add((repo, "model.safetensors"))
    fake_hub.listing = False
    rec = micro_record("mirror", (hub.HubFile(repo, "model.safetensors", "timm"),))
    with caplog.at_level(logging.WARNING, logger="swinv2.weights.hub"):
        assert hub.fetch(rec).read_bytes() == data
    (warning,) = [r.getMessage() for r in caplog.records]
    assert f"{repo}/model.safetensors: downloaded but not verified" in warning


def test_a_corrupted_file_in_the_cache_is_refused_before_its_first_use(
    fake_hub, micro_record, monkeypatch, capsys, tmp_path
):
    """A cached blob whose bytes changed on disk (size and mtime kept, as bit rot does), in a new
    process: `predict`, and `train` before it builds anything, refuse it in one line and remove it;
    the next run downloads it afresh. Within a process a file is hashed once while its size and mtime
    hold."""
    from PIL import Image

    repo = "timm/micro.rot"
    data = _st(convert_state_dict(_micro_weights().state_dict(), dst="timm"))
    fake_hub.add(repo, "model.safetensors", data)
    rec = micro_record("rot", (hub.HubFile(repo, "model.safetensors", "timm"),))
    hashed = []
    digests = hub._digests
    monkeypatch.setattr(hub, "_digests", lambda path, *a: hashed.append(path) or digests(path, *a))
    snapshot = hub.fetch(rec)
    blob = snapshot.resolve()
    assert hashed == [blob] and hub.fetch(rec) == snapshot and hashed == [blob]  # verified once, then remembered
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    out = tmp_path / "run"
    for argv in (
        ["predict", "--weights", rec.spec, str(image)],
        ["train", "--out", str(out), f"model.name={MICRO}", "model.pretrained=rot", f"data.root={tmp_path}"],
    ):
        st = blob.stat()
        raw = bytearray(blob.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        blob.write_bytes(bytes(raw))
        os.utime(blob, ns=(st.st_atime_ns, st.st_mtime_ns))
        monkeypatch.setattr(hub, "_verified", set())  # a new process
        err = _one_line_error(capsys, argv)
        assert f"{repo}/model.safetensors: the cached file {blob} is corrupted: its SHA-256" in err
        assert "not the hub's (its ETag)" in err and "run the command again" in err
        assert not blob.exists() and not snapshot.exists() and not hub.is_cached(rec) and not out.exists()
        assert hub.fetch(rec).read_bytes() == data


def test_a_records_own_sha256_is_checked_on_a_cached_file(fake_hub, micro_record):
    """A record that publishes a SHA-256 the (cached, hub-verified) file does not have: refused, removed."""
    repo = "timm/micro.pinned"
    fake_hub.add(repo, "model.safetensors", _st(convert_state_dict(_micro_weights().state_dict(), dst="timm")))
    rec = micro_record("hub", (hub.HubFile(repo, "model.safetensors", "timm"),))
    hub.fetch(rec)
    micro_record("pinned", (hub.HubFile(repo, "model.safetensors", "timm", sha256="0" * 64),))
    with pytest.raises(hub.WeightsHashError, match="its SHA-256 [0-9a-f]{16}... is not the record's 0000000000000000"):
        create_model(MICRO, pretrained="pinned")
    assert not hub.is_cached(rec)


def test_a_cut_download_resumes_with_a_range_request(fake_hub, micro_record, monkeypatch):
    repo = "timm/micro.cut"
    data = _st(convert_state_dict(_micro_weights().state_dict(), dst="timm"))
    fake_hub.add(repo, "model.safetensors", data)
    cut = len(data) // 3
    fake_hub.cut[(repo, "model.safetensors")] = [cut]
    # huggingface_hub resumes from the last chunk it wrote (10 MB chunks): smaller ones for a small file.
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 16384)
    rec = micro_record("cut", (hub.HubFile(repo, "model.safetensors", "timm"),))
    path = hub.fetch(rec)
    assert path.read_bytes() == data
    (first, r1), (second, r2) = fake_hub.gets()
    assert first == second == f"{repo}/model.safetensors" and r1 is None
    assert r2.startswith("bytes=") and 0 < int(r2[6:].rstrip("-")) <= cut  # resumed, not restarted


def test_a_download_that_gives_up_keeps_nothing_and_the_next_call_succeeds(fake_hub, micro_record, monkeypatch, capsys):
    repo = "timm/micro.dead"
    data = _st(convert_state_dict(_micro_weights().state_dict(), dst="timm"))
    fake_hub.add(repo, "model.safetensors", data)
    fake_hub.cut[(repo, "model.safetensors")] = [1000] + [0] * 10  # then no progress: huggingface_hub gives up
    monkeypatch.setattr(time, "sleep", lambda s: None)
    rec = micro_record("dead", (hub.HubFile(repo, "model.safetensors", "timm"),))
    err = _one_line_error(capsys, ["download", rec.spec])
    assert f"download of {repo}/model.safetensors failed" in err and "nothing partial" in err
    cache = Path(constants.HF_HUB_CACHE)
    assert not [f for f in _cache_files(cache) if "/blobs/" in f or "/snapshots/" in f]
    fake_hub.cut.clear()
    assert hub.fetch(rec).read_bytes() == data


def test_cli_with_the_real_environment_variables(tmp_path):
    """HF_HOME / HF_HUB_OFFLINE as a user sets them (read by huggingface_hub at import): one line, exit 2."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    res = subprocess.run(
        [sys.executable, "-m", "swinv2", "export", "--weights", f"{TINY}.ms_in1k", "--onnx", str(tmp_path / "m.onnx")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.count("\n") == 1 and str(tmp_path / "hf" / "hub") in res.stderr
    assert not (tmp_path / "m.onnx").exists()


# --------------------------------------------------------------------------- recipes


def test_model_pretrained_in_a_recipe_gives_a_new_head_on_the_pretrained_backbone(fake_hub, micro_record):
    src = _micro_weights(num_classes=10, seed=7)
    repo = "timm/micro.recipe"
    fake_hub.add(repo, "model.safetensors", _st(convert_state_dict(src.state_dict(), dst="timm")))
    micro_record("recipe", (hub.HubFile(repo, "model.safetensors", "timm"),))
    cfg = load_config(None, [f"model.name={MICRO}", "model.pretrained=recipe"])
    model = build_model(cfg, num_classes=3)
    assert model.head.weight.shape == (3, 48)
    for k, v in src.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(model.state_dict()[k], v), k
    with pytest.raises(ConfigError, match="model.weights='x.pt' .* and model.pretrained=recipe .*two start points"):
        load_config(None, [f"model.name={MICRO}", "model.pretrained=recipe", "model.weights=x.pt"])


FINETUNE = Path(__file__).resolve().parents[1] / "configs" / "finetune.yaml"


@pytest.mark.parametrize("hub_state", ["offline", "unreachable"])
def test_train_without_the_hub_says_it_in_config_keys_before_any_work(tmp_path, monkeypatch, capsys, hub_state):
    """`swinv2 train --config configs/finetune.yaml` (model.pretrained: true) with the weights not in the
    cache and no hub: one line at once, advising the config keys and naming the recipe that set
    model.pretrained, never eval's `--weights` / `--model`; no run folder made. Set by an override
    instead, the override is named."""
    if hub_state == "offline":
        _point_hub_at(monkeypatch, "http://127.0.0.1:9", tmp_path / "hf" / "hub", offline=True)
    else:
        with socket.socket() as s:  # a port nobody listens on
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        _point_hub_at(monkeypatch, f"http://127.0.0.1:{port}", tmp_path / "hf" / "hub")
    out = tmp_path / "run"
    start = time.monotonic()
    err = _one_line_error(
        capsys,
        ["train", "--config", str(FINETUNE), "--out", str(out), f"model.name={TINY}", f"data.root={tmp_path / 'data'}"],
    )
    assert time.monotonic() - start < 10 and not out.exists()
    assert f"{TINY}.ms_in1k" in err and ("HF_HUB_OFFLINE is set" if hub_state == "offline" else "cannot reach") in err
    assert (
        f"fetch {hub.OFFICIAL_RELEASE}swinv2_tiny_patch4_window8_256.pth yourself and train from it with "
        f"model.pretrained=false model.weights=FILE.pth (model.pretrained was set by {FINETUNE})"
    ) in err
    assert "--weights" not in err and "--model" not in err

    err = _one_line_error(
        capsys,
        ["train", "--out", str(out), f"model.name={TINY}", "model.pretrained=true", f"data.root={tmp_path / 'data'}"],
    )
    assert "(model.pretrained was set by override model.pretrained=true)" in err and not out.exists()


def test_weights_and_pretrained_together_name_both_keys_and_where_each_was_set(tmp_path, capsys):
    """The recipe sets model.pretrained, an override model.weights: refused at config time, in one line
    naming both keys and their sources, before the data or model is built (the run folder not made);
    the same for a multi-stage recipe's first stage."""
    out = tmp_path / "run"
    start = time.monotonic()
    err = _one_line_error(
        capsys,
        [
            "train",
            "--config",
            str(FINETUNE),
            "--out",
            str(out),
            f"model.name={MICRO}",
            "model.weights=w.pt",
            f"data.root={tmp_path}",
        ],
    )
    assert time.monotonic() - start < 10 and not out.exists()
    assert (
        f"model.weights='w.pt' (set by override model.weights=w.pt) and model.pretrained=true (set by "
        f"{FINETUNE}): two start points; keep one: model.pretrained=false"
    ) in err
    cfg = load_config(FINETUNE, ["model.weights=w.pt", "model.pretrained=false"])  # what the message advises
    assert (cfg.model.weights, cfg.model.pretrained) == ("w.pt", False)

    recipe = tmp_path / "stages.yaml"
    recipe.write_text(
        f"model: {{name: {MICRO}, pretrained: true}}\n"
        "stages:\n  - {name: a, model: {freeze: [], weights: w.pt}}\n  - {name: b, model: {freeze: []}}\n"
    )
    with pytest.raises(
        ConfigError,
        match=re.escape(f"stages.0.model.weights='w.pt' (set by {recipe}) and model.pretrained=true (set by {recipe})"),
    ):
        load_config(recipe)
    assert load_config(recipe, ["stages.0.model.pretrained=false"]).stages[0].model.pretrained is False
