"""Image files: reading any image PIL can open into upright RGB (`load_image`, `BadImageError` naming
the file), walking folders of them (`walk_folder`: each real folder once, whatever links lead to it,
an unreadable folder an error) and the official eval pipeline (`eval_pipeline`: resize the shorter
side to img_size / crop_pct, centre-crop, normalise). Used by prediction, evaluation, the runtimes and
the training data alike, so it sits on the ground floor."""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import DataError
from .preprocess import IMAGENET_MEAN, IMAGENET_STD, EvalPreprocess, resize_size

# Transparent pixels are composited onto white: what a viewer shows for a transparent PNG, and
# independent of the (arbitrary) colour values stored under alpha 0.
ALPHA_BACKGROUND = (255, 255, 255)


class BadImageError(DataError):
    """A file that is not a readable image; the message starts with its path."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


# --------------------------------------------------------------------------- images


def open_image(path: str | os.PathLike, data: bytes | None = None) -> tuple[Image.Image, str]:
    """(RGB image, the file's original mode). Raises BadImageError naming `path`. With `data`, the image
    is decoded from those bytes (a member of a shard or a zip file) and `path` only names it."""
    im, mode, _ = _open(path, None, data)
    return im, mode


# The reductions libjpeg can decode at (DCT scaling), largest first; Pillow's `Image.draft` picks one.
JPEG_REDUCTIONS = (8, 4, 2, 1)
EXIF_ORIENTATION = 0x0112


def load_image_reduced(
    path: str | os.PathLike, pick: Callable[[int, int], int], data: bytes | None = None
) -> tuple[Image.Image, int]:
    """(RGB image, reduction r): `load_image`, except that a JPEG stored upright may be decoded at 1/r
    of its size in the DCT domain (r in 1, 2, 4, 8; libjpeg's scaled IDCT), which skips most of the
    decoding work. `pick(width, height)` is called exactly once with the full upright size, before
    decoding for such a JPEG (its header gives the size), after it for any other file, and returns
    the reduction wanted; the largest of `JPEG_REDUCTIONS` not above it is used, and only for a JPEG
    (anything else, and a JPEG with an EXIF rotation or flip, returns r = 1). Pixel (x, y) of the
    reduced image covers the full image's [r x, r (x + 1)) x [r y, r (y + 1)), so a box in full-size
    coordinates divided by r is the same region. Errors as `load_image`; `data` as in `open_image`."""
    im, _, r = _open(path, pick, data)
    return im, r


def _open(
    path: str | os.PathLike, pick: Callable[[int, int], int] | None, data: bytes | None = None
) -> tuple[Image.Image, str, int]:
    try:
        with Image.open(path if data is None else io.BytesIO(data)) as im:
            mode, reduction, picked = im.mode, 1, False
            if pick is not None and im.format == "JPEG" and im.getexif().get(EXIF_ORIENTATION, 1) == 1:
                w, h = im.size
                wanted, picked = pick(w, h), True
                r = next(r for r in JPEG_REDUCTIONS if r <= max(1, wanted))
                if r > 1:
                    drafted = im.draft(None, (w // r, h // r))  # Pillow picks r: w // (w // r) is in [r, 2r)
                    reduction = 1 if drafted is None else round(w / drafted[1][2])
            im.load()  # decode fully now: a truncated file fails here, not later in a transform
            im = ImageOps.exif_transpose(im)  # apply (and drop) the EXIF orientation
            rgb = _to_rgb(im)
    except FileNotFoundError:
        raise BadImageError(path, "file not found") from None
    except UnidentifiedImageError:
        if data is not None:
            size = len(data)
        else:
            size = os.path.getsize(path) if os.path.exists(path) else -1
        raise BadImageError(path, "empty file (0 bytes)" if size == 0 else "not an image PIL can identify") from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise BadImageError(path, f"cannot decode image ({type(e).__name__}: {e})") from None
    if pick is not None and not picked:
        pick(*rgb.size)
    return rgb, mode, reduction


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Alpha is composited on ALPHA_BACKGROUND; 16/32-bit integer grey is
    scaled from 0..65535 (PIL's own convert would clip at 255); float grey 'F' is clipped to 0..255."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im, dtype=np.float64)
        arr = np.clip(np.round(arr / 257.0), 0, 255).astype(np.uint8)  # 65535 / 255 = 257
        return Image.fromarray(arr, mode="L").convert("RGB")
    if im.mode == "F":
        arr = np.clip(np.asarray(im, dtype=np.float64), 0, 255).round().astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if im.mode in ("P", "PA") and (im.mode == "PA" or "transparency" in im.info):
        im = im.convert("RGBA")
    elif im.mode in ("LA", "La", "RGBa"):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        background = Image.new("RGBA", im.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, im).convert("RGB")
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def load_image(path: str | os.PathLike) -> Image.Image:
    """The image at `path` as a fully decoded RGB PIL image, upright (EXIF orientation applied).

    Handles every PIL mode: L, LA, P (with or without transparency), RGBA (composited on white,
    `ALPHA_BACKGROUND`), CMYK, 16-bit grey (scaled, not clipped), 1-bit. Raises `BadImageError` (a
    ValueError) naming `path` for missing, empty, truncated or non-image files.
    """
    return open_image(path)[0]


def _eval_resize_crop_steps(img_size: int, crop_pct: float, interpolation: str) -> list[Callable]:
    """The official / timm eval geometry: resize the shorter side to floor(img_size / crop_pct),
    centre-crop img_size."""
    from torchvision import transforms
    from torchvision.transforms import InterpolationMode

    return [
        transforms.Resize(resize_size(img_size, crop_pct), interpolation=InterpolationMode(interpolation)),
        transforms.CenterCrop(img_size),
    ]


def eval_transform(
    img_size: int,
    crop_pct: float,
    interpolation: str = "bicubic",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Callable:
    """PIL image -> (3, img_size, img_size) normalised float tensor, the official / timm eval way:
    resize the shorter side to floor(img_size / crop_pct), centre-crop img_size."""
    from torchvision import transforms

    return transforms.Compose(
        [
            *_eval_resize_crop_steps(img_size, crop_pct, interpolation),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )


def eval_resize_crop(img_size: int, crop_pct: float, interpolation: str = "bicubic") -> Callable:
    """PIL image -> (3, img_size, img_size) uint8 tensor: `eval_transform`'s resize and centre crop,
    before scaling; `normalize_images` finishes a batch of them with the same values."""
    from torchvision import transforms

    return transforms.Compose([*_eval_resize_crop_steps(img_size, crop_pct, interpolation), transforms.PILToTensor()])


def normalize_images(
    x: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> float32: / 255, - mean, / std, the ops of ToTensor and Normalize in their
    order (so the same values, bit for bit), once over the batch instead of image by image."""
    mean_t = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return x.to(torch.float32).div_(255).sub_(mean_t).div_(std_t)


def is_hidden(name: str) -> bool:
    return name.startswith(".") or name.startswith("__")  # .git, .ipynb_checkpoints, __MACOSX


def _unreadable_folder(e: OSError) -> DataError:
    return DataError(
        f"{e.filename}: cannot read this folder ({e.strerror}); its images would be left out: make it "
        f"readable or move it out of the data folder"
    )


def folder_key(path: str | os.PathLike) -> tuple[int, int]:
    """(device, inode) of the real folder at `path`, whatever links lead to it."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise _unreadable_folder(e) from None
    return st.st_dev, st.st_ino


def walk_folder(
    top: str | os.PathLike[str],
    *,
    seen: set[tuple[int, int]],
    skipped: list[str],
    hidden: Callable[[str], bool] = is_hidden,
) -> Iterator[tuple[str, list[str]]]:
    """(folder, its sorted file names) for `top` and every folder under it, in sorted order, hidden
    entries left out. Symlinked folders are followed (datasets are often linked in), but each real
    folder (device, inode) is read once: a folder already in `seen` or reached before, such as a loop
    `ln -s . loop` or a second link to the same images, is not entered and its path is appended to
    `skipped` (else its images would count again, 40 times for a loop). `seen` gains each folder read.

    Raises DataError naming a folder that cannot be read (os.walk would skip it in silence, and its
    images, or a whole class, would be missing from the data without a word)."""

    def fail(e: OSError) -> None:
        raise _unreadable_folder(e)

    seen.add(folder_key(top))
    for dirpath, dirnames, filenames in os.walk(top, onerror=fail, followlinks=True):
        enter = []
        for d in sorted(d for d in dirnames if not hidden(d)):
            key = folder_key(os.path.join(dirpath, d))
            if key in seen:
                skipped.append(os.path.join(dirpath, d))
            else:
                seen.add(key)  # now, not when entered: of two links to one folder, the first listed is read
                enter.append(d)
        dirnames[:] = enter
        yield dirpath, sorted(f for f in filenames if not hidden(f))


def eval_pipeline(prep: EvalPreprocess) -> Callable:
    """PIL image -> normalised (3, img_size, img_size) float tensor, as `prep` says: the one eval
    transform that prediction, evaluation and the runtimes run."""
    return eval_transform(prep.img_size, prep.crop_pct, prep.interpolation, mean=prep.mean, std=prep.std)
