"""benchmarks/predict_folder.py: the JPEG folder it builds, and that it reads the line `swinv2 predict`
prints (so a change to that line cannot silently break the benchmark)."""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import predict_folder  # noqa: E402
from swinv2.cli import main  # noqa: E402


def test_builds_camera_sized_jpegs_once(tmp_path):
    folder = predict_folder.build_jpegs(tmp_path / "jpegs", 4)
    files = sorted(folder.glob("*.jpg"))
    for f, size in zip(files, [(500, 375), (375, 500), (500, 375), (375, 500)], strict=True):
        with Image.open(f) as img:
            assert img.size == size and img.format == "JPEG"
    stamp = [f.stat().st_mtime_ns for f in files]
    predict_folder.build_jpegs(folder, 4)  # the same count: kept as it is
    assert [f.stat().st_mtime_ns for f in files] == stamp


def test_reads_the_whole_command_line_of_swinv2_predict(tmp_path, micro_weights, capsys):
    folder = predict_folder.build_jpegs(tmp_path / "jpegs", 3)
    assert main(["predict", "--weights", str(micro_weights), "--batch-size", "2", str(folder)]) == 0
    match = predict_folder.LINE.search(capsys.readouterr().err)
    assert match is not None and int(match.group(1)) == 3
    assert float(match.group(3)) > 0 and float(match.group(4)) >= float(match.group(3))
