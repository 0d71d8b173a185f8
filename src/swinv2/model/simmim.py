"""SimMIM masked-image pretraining (Xie et al., arXiv 2111.09886) around our `SwinTransformerV2`.

What the official code does (microsoft/SimMIM and microsoft/Swin-Transformer `models/simmim.py`,
`data/data_simmim_pt.py`), written anew here:

* `MaskGenerator`: the image is cut into squares of `mask_patch_size` px and exactly
  ceil(mask_ratio x squares) of them are masked, chosen uniformly; the mask is returned at the model's
  patch resolution (each square covers (mask_patch_size / patch_size)^2 patch tokens). Its draws
  come from one integer seed per image, so the training loop can make them a pure function of
  (seed, epoch, sample index) and a resumed run masks exactly as the uninterrupted one.
* `SimMIM`: the encoder is a plain `SwinTransformerV2` (no head). The tokens of masked patches are
  replaced by a learned mask token right after the patch embedding (and its norm); the stages and the
  final norm then run unchanged. The one-layer decoder is a 1x1 conv from the last stage's channels
  to stride^2 x 3 channels and a PixelShuffle(stride) back to full resolution, stride = patch_size x
  2^(stages-1) (32 for the official 4-stage models). The loss is the L1 error on the masked pixels
  only: the sum over masked pixels and channels / (masked pixels + 1e-5) / in_chans. Optionally
  (the SwinV2 configs) each target pixel is first normalised by the mean and std of a window around it.
* The encoder's state dict has exactly a classifier's names (head aside), so pretrained weights load
  into `create_model(..., weights=...)` directly; our training states and the official checkpoints
  (``encoder.*``, ``encoder.mask_token``, ``decoder.*``) go through `convert` (format ``simmim``),
  which keeps the encoder and reports the rest as dropped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, InputError
from .transformer import SwinTransformerV2, SwinV2Config
from .windows import pair


def encoder_stride(cfg: SwinV2Config) -> int:
    """Pixels per token of the last stage: patch_size x 2^(stages-1) (32 for the official variants)."""
    return cfg.patch_size * 2 ** (len(cfg.depths) - 1)


def check_geometry(img_size: int, patch_size: int, stride: int, mask_patch_size: int) -> None:
    """ConfigError unless the masks tile the image and line up with the patches and the decoder:
    mask_patch_size a multiple of the model's patch size and a divisor of the image size, and the
    image size a multiple of the encoder stride (else the decoder's output would not match it)."""
    key = "simmim.mask_patch_size"
    if mask_patch_size % patch_size:
        reason = f"must be a multiple of the model's patch size {patch_size}"
        raise ConfigError(f"{key}={mask_patch_size}: {reason}", key=key, reason=reason)
    if img_size % mask_patch_size:
        reason = f"must divide the image size {img_size}"
        raise ConfigError(f"{key}={mask_patch_size}: {reason}", key=key, reason=reason)
    if img_size % stride:
        reason = (
            f"SimMIM's decoder upsamples the last stage by the encoder stride {stride}: the image size "
            f"must be a multiple of it"
        )
        raise ConfigError(f"model.img_size={img_size}: {reason}", key="model.img_size", reason=reason)


class MaskGenerator:
    """Masks of `mask_patch_size` squares at `mask_ratio` for `input_size` images, at patch resolution."""

    def __init__(
        self, input_size: int | tuple[int, int], mask_patch_size: int, model_patch_size: int, mask_ratio: float
    ) -> None:
        h, w = pair(input_size)
        if h % mask_patch_size or w % mask_patch_size or mask_patch_size % model_patch_size:
            raise InputError(
                f"mask squares of {mask_patch_size} px must tile {h}x{w} images and be a multiple "
                f"of the patch size {model_patch_size}"
            )
        if not 0 < mask_ratio < 1:
            raise InputError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        self.grid = (h // mask_patch_size, w // mask_patch_size)
        self.scale = mask_patch_size // model_patch_size
        self.squares = self.grid[0] * self.grid[1]
        self.count = math.ceil(self.squares * mask_ratio)  # SimMIM's rounding: ceil(36 x 0.6) = 22 at 192 px

    def __call__(self, seeds: Sequence[int]) -> Tensor:
        """(len(seeds), H / patch, W / patch) bool: image k's masked patches, drawn from seeds[k] alone."""
        masks = torch.zeros(len(seeds), self.squares, dtype=torch.bool)
        for k, seed in enumerate(seeds):
            g = torch.Generator().manual_seed(int(seed))
            masks[k, torch.randperm(self.squares, generator=g)[: self.count]] = True
        masks = masks.view(len(seeds), *self.grid)
        return masks.repeat_interleave(self.scale, 1).repeat_interleave(self.scale, 2)


def local_stats(x: Tensor, window: int) -> tuple[Tensor, Tensor]:
    """(mean, sqrt(unbiased variance + 1e-6)) of the `window` x `window` neighbourhood of each pixel,
    per channel; at the border only pixels inside the image count (SwinV2's SimMIM target)."""
    pad = window // 2
    mean = F.avg_pool2d(x, window, stride=1, padding=pad, count_include_pad=False)
    mean_sq = F.avg_pool2d(x * x, window, stride=1, padding=pad, count_include_pad=False)
    ones = torch.ones_like(x[:1, :1])
    count = F.avg_pool2d(ones, window, stride=1, padding=pad, count_include_pad=True) * window * window
    var = ((mean_sq - mean * mean) * count / (count - 1)).clamp(min=0.0)
    return mean, (var + 1e-6).sqrt()


def norm_targets(x: Tensor, window: int) -> Tensor:
    """Each pixel normalised by the statistics of the window around it (`local_stats`)."""
    mean, std = local_stats(x, window)
    return (x - mean) / std


def masked_l1(prediction: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """SimMIM's loss: |prediction - target| summed over the masked pixels (mask (B, 1, H, W) of 0/1)
    and the channels, / (masked pixels + 1e-5) / channels: the mean error per masked value."""
    error = F.l1_loss(target, prediction, reduction="none")
    return (error * mask).sum() / (mask.sum() + 1e-5) / target.shape[1]


class SimMIM(nn.Module):
    """`encoder` (a headless SwinTransformerV2), a learned mask token and the one-layer decoder;
    `forward(images, mask)` returns the masked-pixel L1 loss (mask: (B, H/patch, W/patch) bool)."""

    def __init__(self, encoder: SwinTransformerV2, *, norm_target_patch_size: int | None = None) -> None:
        super().__init__()
        if encoder.num_classes:
            raise InputError("SimMIM's encoder has no classifier head: build it with num_classes=0")
        cfg = encoder.config
        self.encoder = encoder
        self.stride = encoder_stride(cfg)
        self.patch_size = cfg.patch_size
        self.norm_target_patch_size = norm_target_patch_size
        # (1, 1, C) as the official `encoder.mask_token`; it broadcasts over the (B, h, w, C) tokens.
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        nn.init.trunc_normal_(self.mask_token, mean=0.0, std=0.02)
        self.decoder = nn.Sequential(
            nn.Conv2d(encoder.num_features, self.stride**2 * cfg.in_chans, kernel_size=1), nn.PixelShuffle(self.stride)
        )

    @property
    def config(self) -> SwinV2Config:
        """The encoder's architecture: what the weights files and the eval preprocessing describe."""
        return self.encoder.config

    def no_weight_decay_keywords(self) -> set[str]:
        """The encoder's no-decay names, and the mask token (official: `no_weight_decay` adds it)."""
        return set(self.encoder.no_weight_decay_keywords()) | {"mask_token"}

    def encode(self, images: Tensor, mask: Tensor) -> Tensor:
        """(B, C, H, W) images, (B, H/p, W/p) mask -> (B, num_features, H/stride, W/stride) features."""
        B, _, H, W = images.shape
        if H % self.stride or W % self.stride:
            raise InputError(
                f"SimMIM needs image sides that are multiples of the encoder stride {self.stride}, got {H}x{W}"
            )
        enc = self.encoder
        x = enc.patch_embed(images)  # (B, h, w, C), after the patch norm, as the official code masks
        if mask.shape != x.shape[:3]:
            raise InputError(f"mask {tuple(mask.shape)} does not match the {tuple(x.shape[:3])} patch grid")
        w = mask.unsqueeze(-1).to(x.dtype)
        x = x * (1.0 - w) + self.mask_token.to(x.dtype) * w
        x = enc.pos_drop(x)
        for layer in enc.layers:
            x = layer(x)
        return enc.norm(x).permute(0, 3, 1, 2)

    def reconstruct(self, images: Tensor, mask: Tensor) -> Tensor:
        """The decoder's prediction of every pixel, (B, C, H, W) (in the target's space)."""
        return self.decoder(self.encode(images, mask))

    def target(self, images: Tensor) -> Tensor:
        """What the decoder is trained to predict: the images, locally normalised if configured."""
        k = self.norm_target_patch_size
        return images if not k else norm_targets(images, k)

    def pixel_mask(self, mask: Tensor) -> Tensor:
        """(B, h, w) patch mask -> (B, 1, H, W) float pixel mask."""
        p = self.patch_size
        return mask.repeat_interleave(p, 1).repeat_interleave(p, 2).unsqueeze(1).float()

    def forward(self, images: Tensor, mask: Tensor) -> Tensor:
        prediction = self.reconstruct(images, mask)
        return masked_l1(prediction.float(), self.target(images.float()), self.pixel_mask(mask))


def encoder_of(model: nn.Module) -> nn.Module:
    """The classifier-compatible SwinTransformerV2 inside a SimMIM model (or the model itself)."""
    return model.encoder if isinstance(model, SimMIM) else model


def encoder_weights(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """A SimMIM state dict's encoder tensors under the classifier's names (no mask token, no decoder)."""
    return {k[len("encoder.") :]: v for k, v in state_dict.items() if k.startswith("encoder.")}


@torch.no_grad()
def reconstruction_loss(
    model: SimMIM,
    batches: Iterable,
    masks: Callable[[Tensor], Tensor],
    *,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
) -> Tensor:
    """(sum over images of the masked-pixel L1 loss, images) of `model` (eval mode, restored) on
    `batches` (`datasets.Batch`), as a float64 tensor to all-reduce; `masks(indices)` gives the masks of
    a batch's images. Every image has the same number of masked pixels, so a batch's loss is the mean
    of its images' losses."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    try:
        for batch in batches:
            n = len(batch.indices)
            if n == 0:
                continue
            images = batch.images.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = model(images, masks(batch.indices).to(device))
            sums += torch.tensor([loss.item() * n, n], dtype=torch.float64, device=device)
    finally:
        model.train(was_training)
    return sums


def _to_uint8(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Normalised (B, 3, H, W) -> (B, H, W, 3) uint8 pixels."""
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    pixels = (images.float().cpu() * s + m).clamp(0, 1) * 255
    return pixels.round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def reconstruction_images(
    model: SimMIM, images: Tensor, mask: Tensor, mean: Sequence[float], std: Sequence[float]
) -> dict[str, np.ndarray]:
    """Pictures of what the model sees and predicts, each (B, H, W, 3) uint8: "masked" (masked pixels
    grey), "reconstruction" (the prediction in the masked squares, the input elsewhere: the loss
    trains only the former) and "original". A locally normalised prediction is mapped back with the
    original's local statistics (the usual way to show it)."""
    was_training = model.training
    model.eval()
    try:
        prediction = model.reconstruct(images, mask).float()
    finally:
        model.train(was_training)
    images = images.float()
    if model.norm_target_patch_size:  # the prediction is of locally normalised pixels: undo that
        mean_local, std_local = local_stats(images, model.norm_target_patch_size)
        prediction = prediction * std_local + mean_local
    pixels = model.pixel_mask(mask).to(images.device)
    grey = torch.tensor([0.5 - m for m in mean]).view(1, -1, 1, 1) / torch.tensor(std).view(1, -1, 1, 1)
    masked = images * (1 - pixels) + grey.to(images.device) * pixels
    pasted = images * (1 - pixels) + prediction * pixels
    return {
        "masked": _to_uint8(masked, mean, std),
        "reconstruction": _to_uint8(pasted, mean, std),
        "original": _to_uint8(images, mean, std),
    }
