"""The training and validation data a config names (`data.source`), as `datasets.Samples`:

* `folder` (and `digits`, built first): class folders `data.root/<train_dir>/`, `<val_dir>/` (`datasets`);
* `list`: the official list files, `data.root/<train_dir>_map.txt` with the images in
  `data.root/<train_dir>.zip` or the folder `data.root/<train_dir>/` (`listfile`);
* `hf`: Hugging Face's image / label layout, `data.root/<train_dir>` and `<val_dir>` each a parquet
  file, a folder of them, a glob (`data/train-*.parquet`) or a `save_to_disk` folder (`hf_layout`);
* `shards`: shard sets `data.root/<train_dir>/` and `<val_dir>/`, where `data.root` may be
  `s3://bucket/prefix` (`shards`, written by `swinv2 data pack`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import ConfigError
from .datasets import Samples
from .hf_layout import HFDataset, is_hf_layout
from .listfile import ListFileDataset, images_for
from .shards import ShardDataset
from .store import NotInStore
from .tasks import Task

log = logging.getLogger(__name__)


def _join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}" if "://" in root else str(Path(root) / name)


def shard_sets(cfg_data, task: Task) -> tuple[Samples, Samples | None]:
    d = cfg_data
    train_root = _join(d.root, d.train_dir)
    val_root = d.val_root or _join(d.root, d.val_dir)
    options = {
        "cache_dir": d.cache_dir,
        "cache_limit": round(d.cache_limit_gb * 2**30) if d.cache_limit_gb else None,
        "retries": d.retries,
        "timeout": d.timeout,
    }
    train = ShardDataset(train_root, **options)
    if task.labelled and not train.labelled:
        raise ConfigError(f"{train_root}: packed without labels (--unlabelled); classification needs labelled shards")
    try:
        val: Samples | None = ShardDataset(val_root, class_names=train.classes if task.labelled else None, **options)
    except (FileNotFoundError, NotInStore):
        val = None
    return train, val


def list_files(cfg_data, task: Task) -> tuple[Samples, Samples | None]:
    d = cfg_data
    root = Path(d.root)
    if not task.labelled:
        raise ConfigError(
            "data.source=list reads labelled lists; pretraining (train.task=simmim) reads folders or shards"
        )
    train = ListFileDataset(root / (d.train_list or f"{d.train_dir}_map.txt"), images_for(root, d.train_dir))
    val_list = root / (d.val_list or f"{d.val_dir}_map.txt")
    if not val_list.is_file():
        return train, None
    return train, ListFileDataset(val_list, images_for(root, d.val_dir), class_names=train.classes)


def hf_files(cfg_data, task: Task) -> tuple[Samples, Samples | None]:
    d = cfg_data
    root = Path(d.root)
    train = HFDataset(root / d.train_dir)
    if task.labelled and not train.labelled:
        raise ConfigError(f"{root / d.train_dir}: no label column; classification needs labels")
    val_path = Path(d.val_root) if d.val_root else root / d.val_dir
    if not is_hf_layout(val_path):
        return train, None
    return train, HFDataset(val_path, class_names=train.classes if task.labelled else None)
