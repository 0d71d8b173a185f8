"""Seeded fuzzing of the recipe loader: mutated copies of the shipped recipes, and hostile overrides, each
either load as they mean or fail with one ConfigError line; none raises anything else, none takes more
than a few seconds, and together they stay within memory (a few hundred bytes of YAML once took 2.4 GB)."""

from __future__ import annotations

import random
import resource
import time
from pathlib import Path

import pytest
import yaml

from swinv2.config import Config, ConfigError, load_config, schema_keys

REPO = Path(__file__).resolve().parents[1]
SEED = 35  # the number: change it to explore, keep it fixed to replay

# Values a hostile or careless recipe puts where a setting goes.
HOSTILE = [
    "1" + "0" * 400,
    "-" + "9" * 400,
    "9" * 5000,
    "1e400",
    "-1e400",
    "1.0e+400",
    ".inf",
    "-.inf",
    ".nan",
    "inf",
    "nan",
    "18446744073709551616",
    "-1",
    "0",
    "-0.0",
    "1e-400",
    "2147483648",
    "1000000000",
    "abc",
    "''",
    '""',
    "auto",
    "null",
    "~",
    "[]",
    "{}",
    "[1, 2, 3]",
    "[.inf, .inf, .inf]",
    "[.nan, 1]",
    "{a: 1}",
    "yes",
    "2024-13-45",
    "2024-01-01",
    "1:30",
    "0x7fffffffffffffff",
    "0o777",
    "!!binary aGVsbG8=",
    "!!set {a, b}",
    "!!python/object:os.system",
    "!!float abc",
    "&a x",
    "*a",
    "[&a x, *a]",
    "'\udcff'",
    '"\\x00"',
    "|\n  text",
    "[" * 50,
    "{a: " * 40,
    "[" * 3000 + "]" * 3000,
    "x" * 20000,
]


def _mutate(text: str, rng: random.Random) -> bytes:
    """`text` with one to three random faults: bytes changed, lines deleted, duplicated, truncated or
    re-indented, a value replaced by a hostile one, brackets nested, an anchor and its aliases."""
    lines = text.split("\n")
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(lines))
        kind = rng.randrange(8)
        if kind == 0:  # delete a line
            del lines[i]
        elif kind == 1:  # duplicate a line: duplicate keys, mostly
            lines.insert(i, lines[i])
        elif kind == 2 and ":" in lines[i]:  # a hostile value
            key = lines[i].split(":", 1)[0]
            lines[i] = f"{key}: {rng.choice(HOSTILE)}"
        elif kind == 3:  # nested brackets (to 1000 deep; a file's size stops more)
            n = rng.choice([2, 33, 200, 1000])
            lines[i] = lines[i] + " " + ("[" * n + "]" * n if rng.random() < 0.5 else "{a: " * n)
        elif kind == 4:  # an anchor and aliases to it
            lines.insert(i, "x: &x [a, b, c]")
            lines.insert(i + 1, "y: [*x, *x, *x]")
        elif kind == 5:  # re-indent
            lines[i] = " " * rng.choice([1, 3, 8]) + lines[i]
        elif kind == 6:  # truncate
            lines = lines[: i + 1]
            lines[-1] = lines[-1][: rng.randrange(len(lines[-1]) + 1)]
        if not lines:
            lines = [""]
    data = bytearray("\n".join(lines).encode("utf-8", "surrogateescape"))  # '\udcff' is the byte 0xff
    if rng.random() < 0.3 and data:  # raw bytes: invalid UTF-8, NUL, tabs, YAML punctuation
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.choice(
                [0x00, 0x09, 0x3A, 0x5B, 0x7B, 0x26, 0x2A, 0x21, 0x80, 0xC3, 0xE9, 0xFF, rng.randrange(256)]
            )
    return bytes(data)


def _check(load, *, names: str) -> str:
    """Run `load`; 'ok' for a Config, 'refused' for one ConfigError line naming `names` or a key."""
    t0 = time.perf_counter()
    try:
        cfg = load()
    except ConfigError as e:
        outcome = "refused"
        msg = str(e)
        assert "\n" not in msg and len(msg) < 600, msg[:2000]
        assert msg.startswith(names) or e.key is not None, msg
    else:
        outcome = "ok"
        assert isinstance(cfg, Config)
    assert time.perf_counter() - t0 < 5, "took more than 5 s"
    return outcome


def test_mutated_recipes_load_correctly_or_fail_in_one_line(tmp_path):
    rng = random.Random(SEED)
    recipes = [p.read_text() for p in sorted((REPO / "configs").glob("*.yaml"))]
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    outcomes = {"ok": 0, "refused": 0}
    for n in range(300):
        data = _mutate(rng.choice(recipes), rng)
        p = tmp_path / f"m{n}.yaml"
        p.write_bytes(data)
        outcome = _check(lambda p=p: load_config(p), names=f"{p}: ")
        outcomes[outcome] += 1
        if outcome == "ok":
            # A correct load: what PyYAML itself reads from the file (safe now: no aliases, no duplicate
            # keys that it would resolve silently), built into a Config, is the same config.
            assert Config.from_dict(yaml.safe_load(data.decode("utf-8"))) == load_config(p), p
    assert time.perf_counter() - t0 < 20
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 1024 * 1024  # KiB: under 1 GiB more
    # Both kinds happen, so the mutations neither break everything nor nothing.
    assert outcomes["ok"] >= 20 and outcomes["refused"] >= 100, outcomes


def test_hostile_overrides_load_correctly_or_fail_in_one_line():
    rng = random.Random(SEED)
    keys = schema_keys() + ["stages.0.train.epochs", "model.freeze.0", "data..root", "", "=", "a" * 5000]
    demo = REPO / "configs" / "demo_digits_progressive.yaml"
    outcomes = {"ok": 0, "refused": 0}
    t0 = time.perf_counter()
    for _ in range(300):
        key, value = rng.choice(keys), rng.choice(HOSTILE)
        override = f"{key}={value}"
        path = demo if key.startswith("stages") else None
        outcomes[_check(lambda path=path, override=override: load_config(path, [override]), names="override ")] += 1
    assert time.perf_counter() - t0 < 20
    assert outcomes["ok"] >= 10 and outcomes["refused"] >= 100, outcomes


@pytest.mark.parametrize("value", ["[&a x, *a]", "{a: 1, a: 2}", "[" * 40 + "]" * 40])
def test_each_kind_of_hostile_override_is_covered(value):
    """The fuzz draws these; here each is checked on its own so that a regression names its kind."""
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"model.freeze={value}"])
    assert str(e.value).startswith("override model.freeze=") and "\n" not in str(e.value)
