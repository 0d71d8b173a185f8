"""Training data: class folders, training transforms and samplers (images are read by `images`).

* `ImageFolderDataset` reads `root/<class>/**/<image>`; hidden entries are never classes or samples,
  an empty class folder stays a class (so labels never shift), stray files are recorded; symlinked
  folders are followed but each real folder is read once (`images.walk_folder`), an unreadable one is
  an error.
* `train_transform` and `build_mixup` are timm's training pipeline (RandAugment, random erasing,
  Mixup/CutMix, label smoothing); the eval pipeline is `images.eval_pipeline`.
* `ShardedSampler` + `SeededSamples` + `collate` make training data a pure function of
  (seed, epoch, sample index): each sample's augmentation RNGs are seeded from those three numbers,
  so the stream is identical whatever the worker count, and a run resumed mid-epoch from its
  position continues with exactly the samples and augmentations it would have seen. Unreadable
  files are dropped from their batch (never replaced by another sample under their label) and
  reported with the batch.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from ..errors import DataError, InputError
from ..images import BadImageError, folder_key, is_hidden, load_image_reduced, open_image, walk_folder
from ..outputs import IMG_EXTENSIONS, atomic_folder
from ..preprocess import IMAGENET_MEAN, IMAGENET_STD

if TYPE_CHECKING:
    from torch.utils.data import DataLoader

log = logging.getLogger(__name__)


def train_transform(
    img_size: int,
    *,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (0.75, 4 / 3),
    hflip: float = 0.5,
    color_jitter: float = 0.4,
    auto_augment: str | None = "rand-m9-mstd0.5-inc1",
    interpolation: str = "bicubic",
    re_prob: float = 0.25,
    re_mode: str = "pixel",
    re_count: int = 1,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> TrainPipeline:
    """timm's training pipeline (`timm.data.create_transform(is_training=True)`), as the official code.

    Official rule kept where it applies: at img_size <= 32 an image already of the model's size is
    padding-cropped, RandomCrop(img_size, padding=4) (microsoft/Swin-Transformer data/build.py, for
    CIFAR-sized inputs); any other image still gets the random-resized crop (see `SmallImageCrop`).
    """
    from timm.data import create_transform

    tf = create_transform(
        img_size,
        is_training=True,
        scale=cast("tuple[float, float]", tuple(scale)),
        ratio=cast("tuple[float, float]", tuple(ratio)),
        hflip=hflip,
        color_jitter=color_jitter,
        auto_augment=auto_augment,
        interpolation=interpolation,
        re_prob=re_prob,
        re_mode=re_mode,
        re_count=re_count,
        mean=tuple(mean),
        std=tuple(std),
    )
    if img_size <= 32:
        tf.transforms[0] = SmallImageCrop(img_size, tf.transforms[0])
    for t in tf.transforms:
        for op in getattr(t, "ops", ()):
            if getattr(op, "name", "").startswith("Posterize"):
                op.aug_fn = _posterize
    return TrainPipeline(tf.transforms)


class TrainPipeline:
    """A training pipeline (called on a PIL image, as torchvision's `Compose` it replaces) that can also read
    its sample from a file, `read(path)`, decoding a JPEG at a reduced size where the random-resized crop
    allows it (`images.load_image_reduced`, the DCT-domain downscale of libjpeg).

    The crop box is drawn first, by the crop transform's own `get_params` from the full-size
    dimensions (which a JPEG's header gives without decoding), with the RNG state the plain path draws
    it with: the same box for the same seed, and every later transform draws what it drew. The image
    is then decoded at the largest reduction r in 1, 2, 4, 8 that keeps the box at least the output
    size (h / r and w / r), and the box, divided by r, is resized from the reduced image. At r = 1, and
    for any file that is not a JPEG stored upright, `read` is the plain path step for step (the same
    pixels). At r > 1 the output differs from the plain path's by resampling only: the first 1/r of
    the downscale is libjpeg's scaled IDCT instead of the resize filter.

    `SeededSamples` calls `read` where a transform has one (a training transform), so evaluation
    (`images.eval_pipeline`) never takes this path. `reduce=False` (or a first step other than a
    random-resized crop with one interpolation) makes `read` the plain path."""

    def __init__(self, transforms: Sequence[Callable], *, reduce: bool = True) -> None:
        self.transforms = list(transforms)
        self.reduce = reduce

    def __call__(self, img: Any) -> Any:
        for t in self.transforms:
            img = t(img)
        return img

    def __repr__(self) -> str:
        steps = "".join(f"\n    {t}" for t in self.transforms)
        return f"{type(self).__name__}(reduce={self.reduce}){steps}"

    def _crop(self) -> Any:
        """The first step if `read` can take its box before decoding: timm's or torchvision's
        random-resized crop with a single interpolation."""
        from timm.data.transforms import RandomResizedCropAndInterpolation
        from torchvision import transforms

        crop = self.transforms[0] if self.transforms else None
        if not isinstance(crop, (RandomResizedCropAndInterpolation, transforms.RandomResizedCrop)):
            return None
        return None if isinstance(crop.interpolation, (tuple, list)) else crop

    def read(self, path: str | os.PathLike, data: bytes | None = None) -> Any:
        """load_image(path), then this pipeline, with a JPEG decoded at a reduced size where the crop
        allows (see the class). Draws from the RNGs exactly what `self(load_image(path))` draws. With
        `data`, the image is decoded from those bytes and `path` only names it (`images.open_image`)."""
        crop = self._crop() if self.reduce else None
        if crop is None:
            return self(open_image(path, data)[0])
        return self.apply_rest(read_crop(path, crop, data=data)[0])

    def apply_rest(self, img: Image.Image) -> Any:
        """Every step after the crop."""
        for t in self.transforms[1:]:
            img = t(img)
        return img


def _size_only(width: int, height: int) -> Tensor:
    """An image size with no pixels, for a crop's `get_params` (torchvision reads a tensor's size from
    its last two dimensions): a zero-stride view, nothing allocated."""
    return torch.empty(()).expand(1, height, width)


def read_crop(
    path: str | os.PathLike, crop: Any, *, reduce: bool = True, data: bytes | None = None
) -> tuple[Image.Image, int, tuple[int, int, int, int]]:
    """(the crop `crop` (a random-resized crop) takes of the image at `path`, the reduction the image was
    decoded at, the box (top, left, height, width) in full-size pixels): the box drawn by
    `crop.get_params` from the full size, the image decoded at the largest reduction that keeps the box
    at least `crop.size` (with `reduce`), the box resized from it."""
    from torchvision.transforms import functional as F

    out_h, out_w = crop.size
    box: tuple[int, int, int, int] = (0, 0, 0, 0)

    def pick(width: int, height: int) -> int:
        nonlocal box
        box = crop.get_params(_size_only(width, height), crop.scale, crop.ratio)
        _, _, h, w = box
        return max(1, min(h // out_h, w // out_w)) if reduce else 1

    img, r = load_image_reduced(path, pick, data)
    i, j, h, w = box
    if r == 1:  # the plain path: torchvision's crop, then its resize
        return F.resized_crop(img, i, j, h, w, [out_h, out_w], crop.interpolation), 1, box
    resample = F.pil_modes_mapping[crop.interpolation]
    return img.resize((out_w, out_h), resample, box=(j / r, i / r, (j + w) / r, (i + h) / r)), r, box


class SmallImageCrop:
    """The first step of the training pipeline at img_size <= 32, chosen per image: an image of exactly
    img_size x img_size (the digits demo, CIFAR-like data) gets the official RandomCrop(img_size,
    padding=4), drawing exactly what it always drew; any other image gets `resized_crop`, because a
    32 px patch cut out of a photograph is a patch of fur while eval resizes the whole photograph, and
    an image smaller than the crop cannot be cut at all. Per image, so a folder of mixed sizes works."""

    def __init__(self, img_size: int, resized_crop: Callable) -> None:
        from torchvision import transforms

        self.img_size = img_size
        self.pad_crop = transforms.RandomCrop(img_size, padding=4)
        self.resized_crop = resized_crop

    def __call__(self, img: Image.Image) -> Image.Image:
        if img.size == (self.img_size, self.img_size):
            return self.pad_crop(img)
        return self.resized_crop(img)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.img_size}x{self.img_size}: {self.pad_crop}, else {self.resized_crop})"


def _posterize(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's posterize for current Pillow: RandAugment's increasing posterize reaches 0 bits at
    magnitude 10 (m9 + mstd0.5 gets there ~2% of the time), which Pillow now rejects; an all-zero
    mask, i.e. a black image, is what 0 bits gave with the Pillow timm was written against."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def pretrain_transform(
    img_size: int,
    *,
    scale: Sequence[float] = (0.67, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
    interpolation: str = "bilinear",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> TrainPipeline:
    """SimMIM's pretraining transform (microsoft/Swin-Transformer data/data_simmim_pt.py): random-resized
    crop (official: scale 0.67-1, torchvision's bilinear), horizontal flip, normalisation. The masks
    are drawn by the training loop (`simmim.MaskGenerator`), not here."""
    from torchvision import transforms
    from torchvision.transforms import InterpolationMode

    return TrainPipeline(
        [
            transforms.RandomResizedCrop(
                img_size, scale=tuple(scale), ratio=tuple(ratio), interpolation=InterpolationMode(interpolation)
            ),
            transforms.RandomHorizontalFlip(hflip),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )


def build_mixup(
    num_classes: int,
    *,
    mixup: float,
    cutmix: float,
    cutmix_minmax: Sequence[float] | None = None,
    prob: float = 1.0,
    switch_prob: float = 0.5,
    mode: str = "batch",
    label_smoothing: float = 0.1,
):
    """timm's Mixup/CutMix (soft targets incl. label smoothing), or None when both alphas are 0."""
    if not (mixup > 0 or cutmix > 0 or cutmix_minmax is not None) or prob <= 0:
        return None
    from timm.data import Mixup

    return Mixup(
        mixup_alpha=mixup,
        cutmix_alpha=cutmix,
        cutmix_minmax=list(cutmix_minmax) if cutmix_minmax else None,
        prob=prob,
        switch_prob=switch_prob,
        mode=mode,
        label_smoothing=label_smoothing,
        num_classes=num_classes,
    )


# --------------------------------------------------------------------------- what training reads


class Samples(Dataset):
    """Encoded images by index, each with a label (-1: none), that training, `--check-data` and `data pack`
    read: class folders here, list files (`listfile`) and shards (`shards`). Attributes every kind has:
    `root` (what the messages name), `classes`, and the folder-hygiene lists `empty_classes`, `stray`,
    `missing_classes` and `skipped_links` (empty where the kind has no folders)."""

    root: Any
    classes: list[str]
    empty_classes: list[str]
    stray: list[str]
    missing_classes: list[str]
    skipped_links: list[str]

    def __len__(self) -> int:
        raise NotImplementedError

    def label_of(self, index: int) -> int:
        raise NotImplementedError

    def where(self, index: int) -> str:
        """The sample's place, for messages: a path, or a shard and key."""
        raise NotImplementedError

    def raw(self, index: int) -> bytes:
        """The sample's encoded image bytes (BadImageError where they cannot be read)."""
        raise NotImplementedError

    def source(self, index: int) -> tuple[str, bytes | None]:
        """(name, encoded bytes) of sample `index` for a reader that decodes it itself; bytes None: the
        name is a file to open."""
        return self.where(index), self.raw(index)

    def open(self, index: int) -> tuple[Image.Image, str]:
        """(RGB image, original mode) of sample `index`; BadImageError naming `where(index)`."""
        return open_image(self.where(index), self.raw(index))

    def read(self, index: int) -> Image.Image:
        return self.open(index)[0]

    def class_counts(self) -> list[int]:
        counts = Counter(self.label_of(i) for i in range(len(self)))
        return [counts.get(i, 0) for i in range(len(self.classes))]

    def check_storage(self) -> list[tuple[str, str]]:
        """(file, reason) for each storage file that fails its own check (none for plain files)."""
        return []

    def storage_line(self) -> str | None:
        """What `--check-data` says of the storage (shards: their count and size), or None."""
        return None

    def fingerprint(self) -> str | None:
        """What identifies the data beyond its size, checked on resume (None: nothing cheap does)."""
        return None

    def groups(self) -> list[int] | None:
        """Sample counts of the consecutive runs of samples stored together (shards), in index order, so
        that a shuffle can keep reads local (`ShardedSampler`); None: any order reads as fast."""
        return None

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self.read(index), self.label_of(index)


# --------------------------------------------------------------------------- class folders


def scan_class_folders(root: str | os.PathLike) -> list[str]:
    """Sorted names of the class folders directly under `root`; hidden folders are never classes.

    Raises FileNotFoundError if `root` is not a directory, ValueError if it holds no class folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not is_hidden(e.name))
    if not classes:
        raise DataError(f"{root}: no class folders (expected {root}/<class>/<image files>)")
    return classes


def _walk_images(
    folder: Path,
    label: int,
    samples: list[tuple[str, int]],
    stray: list[str],
    seen: set[tuple[int, int]],
    skipped: list[str],
) -> None:
    """Append (path, label) for every image file under `folder` (see `walk_folder`: any depth, sorted,
    each real folder once, hidden entries skipped) to `samples`, and every other file to `stray`."""
    for dirpath, filenames in walk_folder(folder, seen=seen, skipped=skipped):
        for fname in filenames:
            path = os.path.join(dirpath, fname)
            if fname.lower().endswith(IMG_EXTENSIONS):
                samples.append((path, label))
            else:
                stray.append(path)


class ImageFolderDataset(Samples):
    """`root/<class>/**/<image>` -> (transform(image), class index).

    `class_names` fixes the class list (e.g. the training classes for a val folder): a val class
    folder missing there is an error, a training class without a val folder is fine. Attributes:
    `classes`, `samples` [(path, label)], `empty_classes`, `stray` (files that are not images, or sit
    outside class folders), `missing_classes` (in `class_names` but with no folder), `skipped_links`
    (linked folders not followed: loops and second links to a folder already read, see `walk_folder`).
    """

    def __init__(
        self, root: str | os.PathLike, transform: Callable | None = None, class_names: Sequence[str] | None = None
    ) -> None:
        self.root = Path(root)
        found = scan_class_folders(self.root)
        if class_names is None:
            self.classes = found
        else:
            self.classes = list(class_names)
            extra = sorted(set(found) - set(self.classes))
            if extra:
                raise DataError(
                    f"{self.root}: class folders not among the {len(self.classes)} training classes: "
                    f"{', '.join(extra[:10])}{' ...' if len(extra) > 10 else ''}"
                )
        self.missing_classes = sorted(set(self.classes) - set(found))
        self.transform = transform
        self.samples: list[tuple[str, int]] = []
        self.stray: list[str] = [
            str(self.root / e.name) for e in os.scandir(self.root) if e.is_file() and not is_hidden(e.name)
        ]
        self.empty_classes: list[str] = []
        self.skipped_links: list[str] = []
        # The root and every class folder count as read from the start: a link from one class into
        # another, or up to the root, would give those images a second label.
        seen = {folder_key(self.root)} | {
            folder_key(self.root / c) for c in self.classes if c not in self.missing_classes
        }
        for label, name in enumerate(self.classes):
            if name in self.missing_classes:
                continue
            n_before = len(self.samples)
            _walk_images(self.root / name, label, self.samples, self.stray, seen, self.skipped_links)
            if len(self.samples) == n_before:
                self.empty_classes.append(name)
        if not self.samples:
            raise DataError(f"{self.root}: no image files ({', '.join(IMG_EXTENSIONS)}) in its class folders")

    def __len__(self) -> int:
        return len(self.samples)

    def label_of(self, index: int) -> int:
        return self.samples[index][1]

    def where(self, index: int) -> str:
        return self.samples[index][0]

    def raw(self, index: int) -> bytes:
        path = self.samples[index][0]
        try:
            return Path(path).read_bytes()
        except OSError as e:
            raise BadImageError(path, f"cannot read ({e.strerror or type(e).__name__})") from None

    def open(self, index: int) -> tuple[Image.Image, str]:
        return open_image(self.samples[index][0])

    def source(self, index: int) -> tuple[str, bytes | None]:
        return self.samples[index][0], None

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = self.read(index)
        return (self.transform(img) if self.transform is not None else img), self.label_of(index)

    def class_counts(self) -> list[int]:
        counts = Counter(label for _, label in self.samples)
        return [counts.get(i, 0) for i in range(len(self.classes))]


class ImageFilesDataset(ImageFolderDataset):
    """Every image file under `root`, at any depth, without labels (label -1): pretraining data
    (`train.task: simmim`). Class folders may be there, their names are not used; hidden entries are
    skipped. The same attributes as `ImageFolderDataset` (no classes), so the same checks apply."""

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        self.transform = transform
        self.classes: list[str] = []
        self.empty_classes: list[str] = []
        self.missing_classes: list[str] = []
        self.samples: list[tuple[str, int]] = []
        self.stray: list[str] = []
        self.skipped_links: list[str] = []
        _walk_images(self.root, -1, self.samples, self.stray, set(), self.skipped_links)
        if not self.samples:
            raise DataError(f"{self.root}: no image files ({', '.join(IMG_EXTENSIONS)}) at any depth")

    def class_counts(self) -> list[int]:
        return []


def _listed(names: Sequence[str], limit: int = 10) -> str:
    return ", ".join(names[:limit]) + (f" ... (+{len(names) - limit})" if len(names) > limit else "")


def folder_warnings(ds: Samples, *, training: bool) -> list[str]:
    """One line per problem of one class folder: empty class folders (for a training folder: the
    model gets an output that no image teaches, and may still predict it), ignored files, linked
    folders not followed, and classes of a fixed class list without a folder. Training and `swinv2 eval`
    report the same."""
    out = []
    if ds.empty_classes:
        empty = f"{ds.root}: empty class folders: {_listed(ds.empty_classes)}"
        if training:
            out.append(
                f"{empty}; each stays a class (so labels do not shift), so the model gets an output that no "
                f"image teaches and may still predict it for any image: add images or remove the folder"
            )
        else:
            out.append(f"{empty}; kept as classes, as in training, with no images to evaluate")
    if ds.stray:
        out.append(
            f"{ds.root}: {len(ds.stray)} files ignored (not images, or outside class folders): {_listed(ds.stray, 5)}"
        )
    if ds.skipped_links:
        out.append(
            f"{ds.root}: {len(ds.skipped_links)} linked folders not followed, each leads to a folder already "
            f"read (a symlink loop, or a second link to the same images): {_listed(ds.skipped_links, 5)}"
        )
    if ds.missing_classes:
        out.append(
            f"{ds.root}: no folder for training classes {_listed(ds.missing_classes)} (they are never evaluated)"
        )
    return out


def hygiene_warnings(train: Samples, val: Samples | None = None) -> list[str]:
    """One line per class-folder problem worth a warning before training (see `folder_warnings`)."""
    return folder_warnings(train, training=True) + ([] if val is None else folder_warnings(val, training=False))


# --------------------------------------------------------------------------- dataset check


@dataclass
class DataReport:
    """What `check_dataset` found: per split, class counts, image modes and unreadable files."""

    splits: dict[str, Samples] = field(default_factory=dict)
    bad: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # split -> [(path, reason)]
    modes: dict[str, Counter] = field(default_factory=dict)  # split -> Counter(mode)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(self.bad.values())

    def format(self) -> str:
        lines = []
        for split, ds in self.splits.items():
            counts = ds.class_counts()
            if not counts:  # images without labels (pretraining)
                lines.append(f"{split}: {ds.root}: {len(ds)} images (no labels: class folders, if any, are ignored)")
            else:
                lines += self._classes(split, ds, counts)
            storage = ds.storage_line()
            if storage is not None:
                lines.append(f"  {storage}")
            modes = ", ".join(f"{m}: {n}" for m, n in self.modes[split].most_common())
            lines.append(f"  image modes: {modes or '-'}")
            for path, reason in self.bad.get(split, []):
                lines.append(f"  BAD {path}: {reason}")
        lines += [f"warning: {w}" for w in self.warnings]
        n_bad = sum(len(b) for b in self.bad.values())
        lines.append("OK: every image decodes" if self.ok else f"{n_bad} unreadable image files")
        return "\n".join(lines)

    @staticmethod
    def _classes(split: str, ds: Samples, counts: list[int]) -> list[str]:
        """The lines of a labelled split: its size, then a bar per class."""
        lines = [
            f"{split}: {ds.root}: {len(ds)} images, {len(ds.classes)} classes "
            f"(per class min {min(counts)}, max {max(counts)}, mean {sum(counts) / len(counts):.1f})"
        ]
        width = max(len(c) for c in ds.classes)
        for name, n in zip(ds.classes, counts):
            lines.append(f"  {name:<{width}}  {n:>7}  {'#' * round(40 * n / max(max(counts), 1))}")
        return lines


def check_dataset(
    train_root: str | os.PathLike,
    val_root: str | os.PathLike | None = None,
    *,
    decode: bool = True,
    workers: int = 4,
    labels: bool = True,
) -> DataReport:
    """Scan the class folders (and, with `decode`, decode every image) and report what is wrong.
    Without `labels` (pretraining) the folders are read as `ImageFilesDataset`s."""
    train = ImageFolderDataset(train_root) if labels else ImageFilesDataset(train_root)
    val = None
    if val_root is not None and Path(val_root).exists():
        val = ImageFolderDataset(val_root, class_names=train.classes) if labels else ImageFilesDataset(val_root)
    return check_samples(train, val, decode=decode, workers=workers)


def check_samples(train: Samples, val: Samples | None = None, *, decode: bool = True, workers: int = 4) -> DataReport:
    """The report of `check_dataset` for any kind of samples: hygiene, the storage's own check (shards:
    each file against its manifest), and with `decode` every image decoded."""
    report = DataReport()
    report.splits["train"] = train
    if val is not None:
        report.splits["val"] = val
    report.warnings = hygiene_warnings(train, val)

    def probe(ds: Samples, index: int) -> tuple[str, str | None]:
        try:
            return ds.open(index)[1], None
        except BadImageError as e:
            return "unreadable", e.reason

    for split, ds in report.splits.items():
        report.bad[split], report.modes[split] = list(ds.check_storage()), Counter()
        if not decode or report.bad[split]:
            continue
        with ThreadPoolExecutor(max(1, workers)) as pool:  # PIL decoders release the GIL
            results = pool.map(functools.partial(probe, ds), range(len(ds)))
            for index, (mode, reason) in enumerate(results):
                report.modes[split][mode] += 1
                if reason is not None:
                    report.bad[split].append((ds.where(index), reason))
    return report


# --------------------------------------------------------------------------- seeded sampling


def sample_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from integers (splitmix64 chain), e.g. (seed, epoch, index)."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x = (x ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) & 0xFFFFFFFFFFFFFFFF
        x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x >> 1


def seed_everything(seed: int) -> None:
    """Seed python's `random`, numpy's global RNG and torch (CPU and CUDA) from one integer."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def block_order(groups: Sequence[int], block: int, seed: int) -> list[int]:
    """A permutation of the `sum(groups)` sample indices that reads `block` groups at a time: the groups
    (consecutive runs of indices, e.g. shards) in a seeded order, and the samples of each `block` of them
    permuted among themselves."""
    g = torch.Generator().manual_seed(seed)
    sizes = np.asarray(groups, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    shards = torch.randperm(len(sizes), generator=g).numpy()
    taken = sizes[shards]
    # the samples of the shards in their new order: each shard's run of indices, one after the other
    offsets = np.concatenate([[0], np.cumsum(taken)[:-1]])
    order = np.arange(int(taken.sum()), dtype=np.int64) - np.repeat(offsets - starts[shards], taken)
    bounds = np.concatenate([[0], np.cumsum(taken)])[:: max(1, block)].tolist() + [int(taken.sum())]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if hi > lo:
            order[lo:hi] = order[lo:hi][torch.randperm(hi - lo, generator=g).numpy()]
    return order.tolist()


class ShardedSampler(Sampler):
    """Yields (sample index, sample seed) keys for one rank, resumable mid-epoch.

    Epoch `e`'s order is a permutation seeded by (seed, e) (or 0..n-1 without `shuffle`). With
    `drop_last`, the order is cut to whole global batches (`batch_size * num_replicas`), so every
    rank takes the same number of batches; rank r takes positions r, r + R, r + 2R, ... (R = replicas),
    which makes each global batch the same set of samples whatever R is. `start` skips this rank's
    first samples of the epoch: the position of a resumed run. Without `drop_last` (evaluation, and
    training with `data.drop_last: false`) every sample goes to exactly one rank once per epoch and
    nothing is padded: the last global batch is short.

    With `groups` (the sample counts of consecutive shards, `Samples.groups`), the shuffle keeps reads
    local: the shards are permuted, taken `block` at a time, and the samples of each block permuted
    among themselves, so a stretch of the epoch reads `block` shards, not all of them.
    """

    def __init__(
        self,
        num_samples: int,
        *,
        batch_size: int = 1,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        groups: Sequence[int] | None = None,
        block: int = 8,
    ) -> None:
        if groups is not None and sum(groups) != num_samples:
            raise ValueError(f"groups hold {sum(groups)} samples, not {num_samples}")
        self.groups, self.block = (list(groups) if groups is not None else None), max(1, block)
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} not in [0, {num_replicas})")
        self.num_samples, self.batch_size = num_samples, batch_size
        self.num_replicas, self.rank, self.seed = num_replicas, rank, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self.epoch, self.start = 0, 0
        self._order: tuple[tuple[int, int, int], list[int]] | None = None
        if drop_last and self.batches_per_epoch == 0:
            raise InputError(f"{num_samples} samples make no full global batch of {batch_size} x {num_replicas}")

    @property
    def batches_per_epoch(self) -> int:
        """Steps per epoch, the same on every rank: whole global batches with drop_last; without, one more
        for the samples left over (split r::R, so a rank's last batch may be short, or empty)."""
        if self.drop_last:
            return self.num_samples // (self.batch_size * self.num_replicas)
        return math.ceil(self.num_samples / (self.batch_size * self.num_replicas))

    def _local_order(self) -> list[int]:
        """This rank's order of epoch `self.epoch` (computed once per epoch: the DataLoader asks for the
        sampler's length and its iterator, and at a million samples each order takes a second)."""
        key = (self.epoch, self.seed, self.num_samples)
        if self._order is None or self._order[0] != key:
            self._order = (key, self._compute_order())
        return self._order[1]

    def _compute_order(self) -> list[int]:
        if self.shuffle and self.groups is not None:
            order = self._block_order()
        elif self.shuffle:
            g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch))
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = list(range(self.num_samples))
        if self.drop_last:
            order = order[: self.batches_per_epoch * self.batch_size * self.num_replicas]
        return order[self.rank :: self.num_replicas]

    def _block_order(self) -> list[int]:
        assert self.groups is not None
        return block_order(self.groups, self.block, sample_seed(self.seed, self.epoch))

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index in self._local_order()[self.start :]:
            yield index, sample_seed(self.seed, self.epoch, index)

    def __len__(self) -> int:
        return max(0, len(self._local_order()) - self.start)

    def state_dict(self, consumed: int | None = None) -> dict[str, int]:
        """The position as global samples into the epoch (the same on every rank, and meaningful for
        another number of ranks at the same global batch). `consumed`: this rank's samples of the
        epoch taken so far, when iteration has moved past `start`."""
        local = self.start if consumed is None else consumed
        return {
            "epoch": self.epoch,
            "position": local * self.num_replicas,
            "seed": self.seed,
            "num_samples": self.num_samples,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["num_samples"] != self.num_samples:
            raise InputError(
                f"the checkpoint's sampler covered {state['num_samples']} samples; the dataset now has "
                f"{self.num_samples}: the data changed, an exact resume is impossible"
            )
        if state["position"] % self.num_replicas:
            raise InputError(f"sampler position {state['position']} is not a multiple of {self.num_replicas} ranks")
        self.epoch, self.start, self.seed = state["epoch"], state["position"] // self.num_replicas, state["seed"]


class Sample(NamedTuple):
    image: Tensor | None
    label: int
    index: int  # type: ignore[assignment]  # a field named as tuple.index (mypy: NamedTuple field shadowing)
    error: tuple[str, str] | None  # (path, reason) of an unreadable file
    fatal: str | None = None  # a fault of the storage (a shard missing, changed, unreachable): stops the run


class Batch(NamedTuple):
    images: Tensor  # (B, 3, H, W); B may be smaller than the batch size (bad files dropped)
    labels: Tensor  # (B,) int64
    indices: Tensor  # (B,) int64, dataset indices
    bad: list[tuple[str, str]]  # (path, reason) of the files dropped from this batch
    fatal: str | None = None  # the first storage fault met: the reader raises it (`checked`)


def empty_batch(fatal: str | None = None) -> Batch:
    """A batch of no images: a rank's share of a short last step, or the carrier of a storage fault."""
    return Batch(torch.empty(0), torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64), [], fatal)


def checked(batch: Batch) -> Batch:
    """`batch`, or the storage fault it carries raised as a DataError: a fault met in a loader worker
    reaches the training process as one line, never as the worker's wrapped traceback."""
    if batch.fatal is not None:
        raise DataError(batch.fatal)
    return batch


class SeededSamples(Dataset):
    """`dataset[(index, seed)]` -> Sample: python/numpy/torch RNGs seeded with `seed` before the
    transform, so the augmentation of a sample depends on its key alone. Unreadable files give a
    Sample with `image=None` and the error, never another image."""

    def __init__(self, dataset: Samples, transform: Callable) -> None:
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int] | int) -> Sample:
        index, seed = key if isinstance(key, tuple) else (key, 0)
        read = getattr(self.transform, "read", None)
        try:
            label = self.dataset.label_of(index)
            if read is not None:  # a training pipeline that reads the image itself (TrainPipeline)
                name, data = self.dataset.source(index)
                seed_everything(seed)  # reading draws nothing before the crop, which draws from this state
                return Sample(read(name, data), label, index, None)
            img = self.dataset.read(index)
        except BadImageError as e:
            return Sample(None, self.dataset.label_of(index), index, (e.path, e.reason))
        except DataError as e:  # the storage itself: no sample of it can be trusted
            return Sample(None, -1, index, None, str(e))
        seed_everything(seed)
        return Sample(self.transform(img), label, index, None)


def collate(samples: list[Sample]) -> Batch:
    fatal = next((s.fatal for s in samples if s.fatal is not None), None)
    if fatal is not None:
        return empty_batch(fatal)
    good = [s for s in samples if s.error is None]
    bad = [s.error for s in samples if s.error is not None]
    images = torch.stack([cast(Tensor, s.image) for s in good]) if good else torch.empty(0)  # no error: an image
    labels = torch.tensor([s.label for s in good], dtype=torch.int64)
    indices = torch.tensor([s.index for s in good], dtype=torch.int64)
    return Batch(images, labels, indices, bad)


def _worker_signals(worker_id: int) -> None:
    """Stop signals are the trainer's to handle. Ctrl-C and `kill -TERM -PGID` (systemd, Slurm,
    `timeout`) reach the whole process group: the trainer saves a checkpoint at the next step boundary,
    for which it still needs its workers, and then stops them itself. So a worker ignores SIGINT, and
    SIGTERM while its trainer lives; once the trainer is gone a SIGTERM ends it (torch's own watchdog
    also ends orphaned workers within seconds)."""
    import signal

    trainer = os.getppid()

    def on_sigterm(signum: int, frame: Any) -> None:
        if os.getppid() != trainer:
            os._exit(0)

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, on_sigterm)


def make_loader(
    samples: SeededSamples,
    sampler: ShardedSampler,
    *,
    batch_size: int,
    workers: int,
    pin_memory: bool = False,
    persistent_workers: bool = True,
    drop_last: bool = False,
) -> DataLoader[Sample]:
    """A DataLoader over `samples` in `sampler`'s order, batched by `collate`.

    It gets its own generator so that starting an epoch never draws from the global torch RNG
    (the training trajectory stays independent of how often loaders are iterated).
    """
    from torch.utils.data import DataLoader

    return DataLoader(
        samples,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        drop_last=drop_last,
        persistent_workers=persistent_workers and workers > 0,
        worker_init_fn=_worker_signals if workers > 0 else None,
        generator=torch.Generator(),
    )


# --------------------------------------------------------------------------- the demo data


def build_digits_folder(
    root: str | os.PathLike, *, img_size: int = 32, val_fraction: float = 0.2, seed: int = 0
) -> Path:
    """scikit-learn's handwritten digits (1797 real 8x8 scans, shipped inside scikit-learn) as an
    image folder `root/{train,val}/<digit>/<n>.png`, upscaled to `img_size` (bicubic), split
    stratified and deterministically. Built once: an existing complete folder is reused; the build
    goes to a temp folder renamed into place, so a killed build never leaves half a dataset."""
    root = Path(root)
    if (root / ".complete").exists():
        return root
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().clip(0, 255).astype(np.uint8)  # values 0..16
    idx = np.arange(len(images))
    train_idx, val_idx = train_test_split(idx, test_size=val_fraction, random_state=seed, stratify=digits.target)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(
            f"{root} exists but is not a complete digits folder (no .complete marker); "
            f"remove it or point data.root elsewhere"
        )
    try:
        with atomic_folder(root) as tmp:
            for split, ids in (("train", train_idx), ("val", val_idx)):
                for i in sorted(ids):
                    d = tmp / split / str(digits.target[i])
                    d.mkdir(parents=True, exist_ok=True)
                    image = Image.fromarray(images[i], mode="L").resize((img_size, img_size), Image.Resampling.BICUBIC)
                    image.save(d / f"{i:04d}.png")
            (tmp / ".complete").write_text(
                f"sklearn.datasets.load_digits, {img_size}px, val_fraction {val_fraction}, seed {seed}\n"
            )
    except OSError:  # another process finished first: keep theirs
        if not (root / ".complete").exists():
            raise
    log.info("built the digits image folder at %s (%d train, %d val)", root, len(train_idx), len(val_idx))
    return root
