"""The training tasks (`swinv2.train.tasks`): one interface, classification and SimMIM pretraining behind it;
the engine asks its task and never tests which one it has."""

from __future__ import annotations

import re
import typing
from pathlib import Path

import pytest
import torch

from image_folders import make_image_folder
from swinv2 import create_model
from swinv2.config import Config, ConfigError, TrainConfig, load_config
from swinv2.model.simmim import SimMIM
from swinv2.train import distributed as D
from swinv2.train.tasks import TASKS, Classification, SimMIMPretraining, task_for

MICRO = "swinv2_micro_window4_32"
ENGINE = Path(__file__).resolve().parents[1] / "src" / "swinv2" / "train" / "engine.py"


def cfg_of(*overrides: str) -> Config:
    return load_config(None, [f"model.name={MICRO}", *overrides])


def test_every_value_of_train_task_has_its_task():
    assert set(TASKS) == set(typing.get_args(typing.get_type_hints(TrainConfig)["task"]))
    assert isinstance(task_for(cfg_of()), Classification)
    assert isinstance(task_for(cfg_of("train.task=simmim", "train.best_metric=val_loss")), SimMIMPretraining)


def test_the_engine_asks_its_task_and_never_tests_which_it_is():
    code = "\n".join(line.split("#")[0] for line in ENGINE.read_text().splitlines())  # comments may name tasks
    assert not re.search(r"task\s*[!=]=|simmim|masks is None|\.masks\b|isinstance\([^)]*Task", code)


# --------------------------------------------------------------------------- before the model


def test_classification_reads_class_folders_and_sizes_the_head_to_them(tmp_path):
    root = make_image_folder(tmp_path / "data", classes=("a", "b", "c"))
    task = task_for(cfg_of())
    train_root, val_root = task.data_roots(root)
    assert (train_root, val_root) == (root / "train", root / "val")
    train, val = task.datasets(train_root, val_root)
    assert train.classes == val.classes == ["a", "b", "c"] and len(train) == 24
    cfg, n = task.resolve(cfg_of(), train.classes)
    assert n == 3 and cfg.model.num_classes == 3
    assert task.resolve(cfg_of("model.num_classes=5"), train.classes)[1] == 5  # more outputs than classes: allowed
    with pytest.raises(ConfigError, match="model.num_classes=2 but the training folder has 3 classes"):
        task.resolve(cfg_of("model.num_classes=2"), train.classes)
    assert task.datasets(train_root, tmp_path / "nothere")[1] is None
    with pytest.raises(FileNotFoundError, match="training folder not found"):
        task.data_roots(tmp_path / "data" / "train")  # no train/ inside: a flat folder is no classification data


def test_simmim_pretrains_on_a_flat_folder_without_labels(tmp_path, caplog):
    root = make_image_folder(tmp_path / "data")
    cfg = cfg_of("train.task=simmim", "train.best_metric=val_loss")
    task = task_for(cfg)
    assert task.data_roots(root) == (root / "train", root / "val")  # class folders are read too, labels ignored
    flat = root / "train"
    with caplog.at_level("INFO", logger="swinv2.train.tasks"):
        assert task.data_roots(flat) == (flat, None)
    assert "pretraining on every image under it (no validation set" in caplog.text
    train, val = task.datasets(flat, None)
    assert val is None and len(train) == 16 and train.classes == []
    assert task.resolve(cfg, train.classes) == (cfg, 0)  # no head, the config as it is
    assert not task.labelled and task_for(cfg_of()).labelled


def test_simmim_refuses_fsdp_and_masks_that_do_not_tile_the_model():
    simmim, classify = task_for(cfg_of("train.task=simmim", "train.best_metric=val_loss")), task_for(cfg_of())
    with pytest.raises(ConfigError, match="train.task=simmim is not supported with train.parallel=fsdp"):
        simmim.check_parallel("fsdp", True)
    simmim.check_parallel("fsdp", False)  # one process: nothing is sharded
    classify.check_parallel("fsdp", True)
    arch = create_model(MICRO, num_classes=0).config
    simmim.check_model(arch)
    classify.check_model(arch)
    odd = task_for(cfg_of("train.task=simmim", "train.best_metric=val_loss", "simmim.mask_patch_size=12"))
    with pytest.raises(ValueError, match="mask"):  # 12 px squares do not tile 32 px images
        odd.check_model(arch)


# --------------------------------------------------------------------------- the run


def bound(task, num_classes: int = 0):
    torch.manual_seed(0)
    model = task.wrap(create_model(MICRO, num_classes=num_classes, drop_path_rate=0.0))
    task.bind(model.config, num_classes, D.DistEnv(0, 1, 0, torch.device("cpu")), None)
    return model


def test_classification_trains_the_classifier_and_pairs_images_for_mixup():
    task = task_for(cfg_of("data.aug.mixup=0.8", "data.aug.cutmix=0"))
    model = bound(task, 2)
    assert task.wrap(model) is model and task.weights_model(model) is model
    x, y = torch.randn(5, 3, 32, 32), torch.tensor([0, 1, 0, 1, 0])
    x4, y4 = task.even_out(x, y)
    assert len(x4) == len(y4) == 4 and torch.equal(x4, x[:4])
    before = x4.clone()
    mixed, soft = task.mix(x4, y4)
    assert soft.shape == (4, 2) and not torch.equal(mixed, before)  # soft targets of the mixed pairs
    loss = task.loss(model, mixed, soft, torch.arange(4), False, 0)
    assert loss.ndim == 0 and loss > 0
    assert task.loss(model, x[:1], y[:0], torch.arange(0), True, 0).item() == 0.0  # an empty micro-batch weighs 0
    plain = task_for(cfg_of("data.aug.mixup=0", "data.aug.cutmix=0"))
    bound(plain, 2)
    assert all(a is b for a, b in zip((*plain.even_out(x, y), *plain.mix(x, y)), (x, y, x, y)))
    assert plain.describe(["a", "b"]) == "2 classes"
    assert plain.picture(model, None, None, {}, Path("nowhere")) is None


def test_simmim_trains_its_wrapper_with_seeded_masks_and_keeps_the_encoder():
    cfg = cfg_of("train.task=simmim", "train.best_metric=val_loss", "simmim.mask_patch_size=8", "train.seed=3")
    task = task_for(cfg)
    model = bound(task)
    assert isinstance(model, SimMIM)
    assert task.describe([]) == "SimMIM pretraining without labels: 10 of 16 squares masked"
    idx = torch.tensor([0, 5, 9])
    a, b = task.train_masks(idx, 0), task.train_masks(idx, 0)
    assert torch.equal(a, b) and a.shape == (3, 8, 8)  # a function of (seed, epoch, index) alone
    assert not torch.equal(a, task.train_masks(idx, 1))
    assert not torch.equal(task.val_masks(idx), a) and torch.equal(task.val_masks(idx), task.val_masks(idx))
    other = task_for(cfg_of("train.task=simmim", "train.best_metric=val_loss", "simmim.mask_patch_size=8"))
    bound(other)
    assert torch.equal(other.val_masks(idx), task.val_masks(idx))  # validation masks: the same in every run
    x = torch.randn(3, 3, 32, 32)
    loss = task.loss(model, x, torch.full((3,), -1), idx, False, 0)
    assert torch.equal(loss, model(x, task.train_masks(idx, 0)))
    assert task.loss(model, x[:1], torch.full((0,), -1), idx[:0], True, 0).item() == 0.0
    encoder = task.weights_model(model)
    assert encoder is model.encoder
    saved = task.weights_of(model.state_dict())
    assert saved.keys() == encoder.state_dict().keys()
    assert all(torch.equal(v, encoder.state_dict()[k]) for k, v in saved.items())


def test_each_task_validates_on_its_own_metric(tmp_path):
    from swinv2.images import eval_pipeline
    from swinv2.preprocess import EvalPreprocess
    from swinv2.train.datasets import SeededSamples, ShardedSampler, make_loader

    root = make_image_folder(tmp_path / "data")
    pre = EvalPreprocess(32, 1.0, "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

    def loader(ds):
        return make_loader(
            SeededSamples(ds, eval_pipeline(pre)),
            ShardedSampler(len(ds), shuffle=False, drop_last=False),
            batch_size=4,
            workers=0,
            pin_memory=False,
            persistent_workers=False,
        )

    classify = task_for(cfg_of())
    model = bound(classify, 2)
    _, val = classify.datasets(root / "train", root / "val")
    m = classify.validate(model, loader(val), "val")
    assert set(m) == {"val_loss", "val_top1", "val_top5", "val_n"} and m["val_n"] == 8
    simmim = task_for(
        cfg_of(
            "train.task=simmim", "train.best_metric=val_loss", "simmim.mask_patch_size=8", "simmim.reconstructions=2"
        )
    )
    model = bound(simmim)
    _, val = simmim.datasets(root / "train", root / "val")
    m = simmim.validate(model, loader(val), "val_ema")
    assert set(m) == {"val_ema_loss", "val_ema_n"} and m["val_ema_n"] == 8 and m["val_ema_loss"] > 0
    assert simmim.validate(model, loader(val), "val") == {"val_loss": m["val_ema_loss"], "val_n": 8}  # fixed masks
    (tmp_path / "run").mkdir()
    path = simmim.picture(model, val, pre, {"epoch": 3, "val_loss": m["val_ema_loss"]}, tmp_path / "run")
    assert path == tmp_path / "run" / "reconstructions" / "epoch0003.png" and path.stat().st_size > 0
