"""Seeded fuzzing of the weights readers (issue 35): a few hundred mutations of a real micro model's
`.safetensors` header (its JSON: dtypes, shapes, offsets, the length prefix, non-UTF-8 bytes; and our
metadata in it: the config, class names, preprocessing, model name) and of a Hugging Face folder's
config.json. Each must give a correct load (the model holds exactly the tensors the file holds, and
what the file says about itself) or one line of our error types naming the file, in under a few
seconds; never another exception, a MemoryError or a hang."""

from __future__ import annotations

import copy
import json
import random
import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import swinv2
from randomize import randomize_
from swinv2.errors import CheckpointError, InputError
from swinv2.model.transformer import SwinV2Config
from swinv2.weights.factory import load_model
from swinv2.weights.files import save_weights, write_weights

MICRO = "swinv2_micro_window4_32"
SEED = 35
CASES_SAFETENSORS = 240
CASES_HF = 120
PER_CASE_S = 3.0
ALLOWED = (CheckpointError, InputError, FileNotFoundError)

# Values a mutation puts where a number, a list or a string was: wrong types, huge, negative, non-finite.
POOL = [
    0,
    1,
    -1,
    3,
    7,
    2**31,
    2**63,
    10**30,
    -(10**9),
    0.5,
    1e308,
    float("nan"),
    float("inf"),
    "24",
    "",
    "abc",
    True,
    False,
    None,
    [],
    [2],
    [2, 2, 2, 2, 2, 2, 2, 2, 2],
    [0, 0],
    [[4, 4], [4, 4]],
    {},
    {"a": 1},
    [1.5, 2],
    "swinv2_tiny_window8_256",
    [10**12, 2],
]


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    model = randomize_(swinv2.create_model(MICRO, num_classes=4), seed=2, std=0.02).eval()
    path = root / "micro.safetensors"
    save_weights(model, path, class_names=["ant", "bee", "cat", "dog"], model_name=MICRO)
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    folder = write_weights(model, root / "hf", "hf")
    return {
        "header": json.loads(raw[8 : 8 + n]),
        "data": raw[8 + n :],
        "model": model,
        "hf_config": json.loads((folder / "config.json").read_text()),
        "hf_folder": folder,
    }


def _mutate_value(rng: random.Random, value):
    """Another value for a JSON field: from POOL, or the old one nudged (a number scaled, a list cut)."""
    if isinstance(value, list) and value and rng.random() < 0.3:
        return value[:-1] if rng.random() < 0.5 else value + value[-1:]
    if isinstance(value, (int, float)) and not isinstance(value, bool) and rng.random() < 0.3:
        return value * rng.choice([-1, 0, 2, 1000, 10**6])
    return copy.deepcopy(rng.choice(POOL))


def _mutate_object(rng: random.Random, obj: dict, extra_keys=("sharpness", "layer_norm_eps")) -> None:
    """One change to a JSON object, in place: a field's value, a field removed, or an unknown field."""
    roll = rng.random()
    if obj and roll < 0.7:
        key = rng.choice(sorted(obj))
        obj[key] = _mutate_value(rng, obj[key])
    elif obj and roll < 0.85:
        del obj[rng.choice(sorted(obj))]
    else:
        obj[rng.choice(extra_keys)] = copy.deepcopy(rng.choice(POOL))


def _mutate_metadata(rng: random.Random, meta: dict) -> None:
    """One change to our metadata: inside one of its JSON entries, or the entry as a whole."""
    key = rng.choice(["swinv2.config", "swinv2.config", "swinv2.class_names", "swinv2.preprocess", "swinv2.model_name"])
    roll = rng.random()
    try:  # an entry an earlier mutation removed, made a number or left not JSON is replaced as a whole
        value = json.loads(meta[key])
    except (KeyError, TypeError, ValueError):
        roll = 0.0
    if roll < 0.15:
        meta[key] = rng.choice(["{not json", "[1, 2]", "3", "null", '"abc"', "NaN", "[" * 5000, ""])
    elif roll < 0.2:
        meta.pop(key, None)
    elif key == "swinv2.model_name":
        meta[key] = rng.choice(["", "swinv2_tiny_window8_256", "x" * 300, "\u00e9t\u00e9"])
    else:
        if isinstance(value, dict):
            _mutate_object(rng, value)
        else:
            value = _mutate_value(rng, value)
        meta[key] = json.dumps(value)


def _mutate_header(rng: random.Random, header: dict) -> None:
    """One change to the safetensors header: a tensor's dtype, shape or offsets; a tensor removed or
    renamed; the metadata (ours, or its type)."""
    names = sorted(k for k in header if k != "__metadata__")
    roll = rng.random()
    if roll < 0.45 and isinstance(header["__metadata__"], dict):  # not after the metadata lost its type
        _mutate_metadata(rng, header["__metadata__"])
        return
    if roll < 0.5:
        header["__metadata__"] = rng.choice([[], "x", 3, {"swinv2.config": 5}])
        return
    name = rng.choice(names)
    entry = header[name]
    part = rng.choice(["dtype", "shape", "data_offsets", "remove", "rename"])
    if part == "dtype":
        # I32 and U32 keep the byte size (the file stays readable); the others do not, or are no dtype.
        entry["dtype"] = rng.choice(["I32", "U32", "I32", "F16", "BF16", "F64", "I64", "U8", "BOOL", "X", 3, None])
    elif part == "shape":
        shape = entry["shape"]
        op = rng.random()
        if op < 0.25 and shape:
            shape[rng.randrange(len(shape))] = rng.choice([0, 1, -1, 2, 2**31, 2**62, 10**30, "4", 3.5])
        elif op < 0.5:  # the same number of elements, as another shape: a readable file of the wrong shape
            entry["shape"] = shape[:-1] + [1, shape[-1]] if shape else [1]
        elif op < 0.85 and len(shape) > 1:
            entry["shape"] = rng.choice([[shape[0] * shape[1]] + shape[2:], [shape[1], shape[0]] + shape[2:]])
        else:
            entry["shape"] = _mutate_value(rng, shape)
    elif part == "data_offsets":
        a, b = entry["data_offsets"]
        entry["data_offsets"] = rng.choice(
            [[b, a], [a + 4, b + 4], [a, b - 4], [a, 2**62], [-4, b], [a], "x", [a, b, b]]
        )
    elif part == "remove":
        del header[name]
    else:
        header[name.replace("layers.", rng.choice(["layer.", "layers.9.", "encoder.layers."]), 1)] = header.pop(name)


def _safetensors_case(rng: random.Random, originals: dict) -> bytes:
    header = copy.deepcopy(originals["header"])
    for _ in range(rng.choice([1, 1, 2, 3])):
        _mutate_header(rng, header)
    text = json.dumps(header).encode()
    data = originals["data"]
    roll = rng.random()
    if roll < 0.08:  # bytes of the header replaced: broken JSON or UTF-8
        at = rng.randrange(len(text))
        text = text[:at] + bytes([rng.choice([0xFF, 0xC3, 0x00, 0x22, 0x7B])]) + text[at + 1 :]
    elif roll < 0.12:
        data = data[: rng.randrange(len(data))]
    length = len(text)
    if rng.random() < 0.06:  # the length prefix lies
        length = rng.choice([0, 1, length - 1, length + 1, 2**40, 2**64 - 1])
    return struct.pack("<Q", length) + text + data


def _check_outcome(path: Path, load) -> object:
    """`load()`: a model, or one line of our error types naming `path`, within PER_CASE_S."""
    start = time.monotonic()
    try:
        model = load()
    except ALLOWED as e:
        message = str(e)
        assert "\n" not in message and str(path) in message, message
        model = None
    elapsed = time.monotonic() - start
    assert elapsed < PER_CASE_S, (path, elapsed)
    return model


def test_mutated_safetensors_headers_load_correctly_or_fail_in_one_line(originals, tmp_path):
    rng = random.Random(SEED)
    path = tmp_path / "case.safetensors"
    loaded = 0
    for case in range(CASES_SAFETENSORS):
        path.write_bytes(_safetensors_case(rng, originals))
        model = _check_outcome(path, lambda: load_model(path))
        if model is None:
            continue
        loaded += 1
        with safe_open(path, "pt") as f:  # what the (mutated) file holds, read by safetensors itself
            meta = f.metadata()
            held = {k: f.get_tensor(k) for k in f.keys()}
        assert model.config == SwinV2Config(**json.loads(meta["swinv2.config"])), case
        names = json.loads(meta["swinv2.class_names"]) if "swinv2.class_names" in meta else None
        assert model.info.class_names == names and model.info.model_name == (meta.get("swinv2.model_name") or None)
        for k, v in model.state_dict().items():
            assert torch.equal(v, held[k].to(v.dtype)), (case, k)
    assert 0 < loaded < CASES_SAFETENSORS  # both outcomes were exercised


def _hf_case(rng: random.Random, config: dict) -> bytes:
    config = copy.deepcopy(config)
    for _ in range(rng.choice([1, 1, 2])):
        roll = rng.random()
        if roll < 0.55:
            _mutate_object(
                rng,
                config,
                (
                    "layer_norm_eps",
                    "hidden_size",
                    "num_layers",
                    "num_labels",
                    "fancy",
                    "use_absolute_embeddings",
                    "hidden_act",
                ),
            )
        elif roll < 0.75:
            config["id2label"] = rng.choice(
                [
                    ["a", "b", "c", "d"],
                    {"0": "a", "2": "b"},
                    {str(i): i for i in range(4)},
                    {str(i): "x" for i in range(6)},
                    "abc",
                    {},
                ]
            )
        elif isinstance(config.get("swinv2"), dict):
            _mutate_object(rng, config["swinv2"], ("unit_id", "preprocess", "model_name"))
    text = json.dumps(config).encode()
    roll = rng.random()
    if roll < 0.1:
        text = text[: rng.randrange(len(text))]
    elif roll < 0.15:
        text = b"\xff" + text
    elif roll < 0.2:
        text = json.dumps([config]).encode()
    return text


def test_mutated_hf_configs_load_correctly_or_fail_in_one_line(originals):
    rng = random.Random(SEED + 1)
    folder = originals["hf_folder"]
    loaded = 0
    for case in range(CASES_HF):
        (folder / "config.json").write_bytes(_hf_case(rng, originals["hf_config"]))
        model = _check_outcome(folder, lambda: load_model(folder))
        if model is None:
            continue
        loaded += 1
        for k, v in originals["model"].state_dict().items():  # the tensors are unchanged: so is every weight
            assert torch.equal(model.state_dict()[k], v), (case, k)
    assert 0 < loaded < CASES_HF
