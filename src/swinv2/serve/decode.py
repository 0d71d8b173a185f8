"""Uploaded bytes -> an upright RGB image, or why they are not one, with the HTTP status that says so.

The server reads images from strangers, so before anything is decoded the header is read and checked:
only the common photograph formats are opened (`FORMATS`: PIL would otherwise try every plugin it has,
EPS among them, which runs Ghostscript), and an image whose header promises more than `max_pixels`
pixels is refused unread: a decompression bomb (a small PNG of a huge blank canvas) would otherwise be
expanded into gigabytes. Then the bytes are decoded by `images.load_image`, the very function
`swinv2 predict` reads files with (every PIL mode, EXIF rotation, alpha on white), so a served image
gives the numbers the command line gives.

  * 415: the bytes are not an image of an accepted format;
  * 422: an image that cannot be used: empty, truncated or corrupt, or larger than `max_pixels`.
"""

from __future__ import annotations

import io

from PIL import Image, UnidentifiedImageError

from ..errors import InputError
from ..images import BadImageError, load_image

# The formats a photograph or a screenshot comes in; PIL's names (`Image.open(..., formats=)`).
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # a camera's MPO opens as JPEG
# 40 megapixels: a 7300 x 5500 photograph, 120 MB decoded as RGB; each decoding worker holds one.
DEFAULT_MAX_PIXELS = 40_000_000


class UploadError(InputError):
    """An upload that is not a usable image: `status` (415 or 422) and a one-line `reason`."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def decode_upload(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """`data` as a fully decoded, upright RGB image; `UploadError` (415 / 422, one line) if it is not one."""
    if not data:
        raise UploadError(422, "empty upload: the request carries no image bytes")
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as im:  # reads the header only
            width, height, fmt = im.width, im.height, im.format
    except UnidentifiedImageError:
        raise UploadError(415, f"not an image of an accepted format ({', '.join(FORMATS)})") from None
    except Image.DecompressionBombError as e:
        raise UploadError(422, f"image refused as a decompression bomb: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise UploadError(422, f"cannot read the image header ({type(e).__name__}: {e})") from None
    if width * height > max_pixels:
        raise UploadError(
            422,
            f"image refused as a decompression bomb: its {fmt} header says {width} x {height} "
            f"= {width * height:,} pixels, over the limit of {max_pixels:,}",
        )
    try:
        # PIL opens a file object as it opens a path; the header was identified above, so load_image's
        # one path-only branch (naming the size of a file it cannot identify) is not taken.
        return load_image(io.BytesIO(data))  # type: ignore[arg-type]
    except BadImageError as e:  # truncated or corrupt past the header
        raise UploadError(422, f"{fmt}: {e.reason}") from None
