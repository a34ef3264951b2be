"""The portrait as LiveAvatar sees it: size rule, resize and centre crop, [-1, 1] pixels.

LiveAvatar treats a size such as "704*384" as a pixel-area budget: the output keeps the
image's aspect ratio, is scaled as large as fits the budget once both sides are padded up
to multiples of 64, then the image is resized (shorter side = the shorter target side,
bilinear) and centre-cropped to that size (torchvision Resize + CenterCrop semantics, as
the original's causal_s2v_pipeline / speech2video `get_size_less_than_area`).

Public API:
    target_size(height, width, size="704*384") -> (H, W)    size: "A*B" string or pixel area
    prepare_portrait(image, size="704*384") -> Tensor [3, 1, H, W] in [-1, 1]
        image: PIL image, uint8 array [H, W, 3] (or [H, W]), ComfyUI IMAGE [B, H, W, 3] float
        0..1 (first of the batch), or an image file path
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

DIVISOR = 64
# Smallest side accepted: 16 pixels fill one DiT token (2x2 latent pixels of 8x8); a smaller
# image (a 1x1 placeholder, a mask) holds no face to animate and would become a flat video.
MIN_IMAGE_SIDE = 16
SCALE_TRIES = 100


def parse_area(size) -> int:
    """'704*384' (or 704x384, or an int) -> pixel area (at least one 64x64 tile)."""
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        area = int(size)
    else:
        parts = str(size).replace("x", "*").split("*")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"size must look like 704*384 (an area budget: height*width), got {size!r}")
        area = int(parts[0]) * int(parts[1])
    if area < DIVISOR * DIVISOR:
        raise ValueError(f"size {size!r} is below one {DIVISOR}x{DIVISOR} tile; use e.g. 704*384")
    return area


def target_size(height: int, width: int, size="704*384") -> tuple[int, int]:
    """(H, W), multiples of 64, for an image of height x width under the area budget `size`
    (LiveAvatar's rule: the largest of 100 scales, from no padding down to worst-case
    padding, whose padded size fits; a plain aspect-ratio fit if none does)."""
    area = parse_area(size)
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if height * width <= area:
        min_scale, max_scale = 0.1, 1.0
    else:
        d = DIVISOR - 1
        b, a, c = d * (height + width), height * width, d ** 2 - area
        min_scale = (-b + math.sqrt(b ** 2 - 2 * a * c)) / (2 * a)  # scale if padding were maximal
        max_scale = math.sqrt(area / (height * width))  # scale if no padding were needed
    for i in range(SCALE_TRIES):
        scale = max_scale - (max_scale - min_scale) * i / SCALE_TRIES
        new_h, new_w = int(height * scale), int(width * scale)
        padded_h, padded_w = new_h + (-new_h) % DIVISOR, new_w + (-new_w) % DIVISOR
        if padded_h * padded_w <= area:
            return padded_h, padded_w
    aspect = width / height  # no scale fitted: aspect-preserving multiples of 64
    out_w, out_h = int((area * aspect) ** 0.5 // DIVISOR * DIVISOR), int((area / aspect) ** 0.5 // DIVISOR * DIVISOR)
    if out_w >= width or out_h >= height:
        out_w, out_h = int(width // DIVISOR * DIVISOR), int(height // DIVISOR * DIVISOR)
    if not out_w or not out_h:
        raise ValueError(f"the image ({height}x{width}) is too small: LiveAvatar needs at least {DIVISOR} pixels a side")
    return out_h, out_w


def to_pil(image) -> Image.Image:
    """A path, PIL image, uint8 HWC array, or float tensor [H, W, 3] / [B, H, W, 3] in 0..1."""
    if isinstance(image, (str, Path)):
        try:
            return Image.open(image).convert("RGB")
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot read the image {image}: {error}") from None
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        if image.dim() == 4 and image.shape[0] > 0:
            image = image[0]  # ComfyUI IMAGE batch: the first image
        if image.dim() != 3 or image.shape[-1] not in (3, 4) or image.shape[0] == 0:
            raise ValueError(f"image tensor must be a ComfyUI IMAGE [B, H, W, 3] (or [H, W, 3]) in 0..1, "
                             f"got {tuple(image.shape)}")
        image = (image[..., :3].detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    array = np.asarray(image)
    if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (1, 3, 4))):
        raise ValueError(f"image array must be uint8 [H, W, 3] (or [H, W] grey), got {array.dtype} {array.shape}")
    if array.ndim == 3:
        array = array[..., 0] if array.shape[-1] == 1 else array[..., :3]  # grey or RGB(A) -> drop alpha
    return Image.fromarray(array).convert("RGB")


def resize_and_crop(image: Image.Image, height: int, width: int) -> np.ndarray:
    """Shorter side to min(height, width) (bilinear), then the centred height x width window,
    zero-padded (left/top half rounded down) where the resized image is smaller, as
    torchvision's Resize + CenterCrop do it. Returns uint8 [height, width, 3]."""
    short = min(height, width)
    w, h = image.size
    new_w, new_h = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    array = np.asarray(image.resize((new_w, new_h), Image.BILINEAR))
    pad_h, pad_w = max(0, height - new_h), max(0, width - new_w)
    array = np.pad(array, ((pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2), (0, 0)))
    top, left = int(round((array.shape[0] - height) / 2.0)), int(round((array.shape[1] - width) / 2.0))
    return array[top:top + height, left:left + width]


def prepare_portrait(image, size="704*384") -> torch.Tensor:
    """Any image + area budget -> pixels [3, 1, H, W] in [-1, 1] for the VAE."""
    pil = to_pil(image)
    if min(pil.height, pil.width) < MIN_IMAGE_SIDE:
        raise ValueError(f"the portrait image is {pil.width}x{pil.height} pixels: too small to hold a face (at least "
                         f"{MIN_IMAGE_SIDE} pixels a side; a few hundred give good results). Load the portrait photo.")
    height, width = target_size(pil.height, pil.width, size)
    cropped = resize_and_crop(pil, height, width).astype(np.float32) / 255.0
    return torch.from_numpy(cropped).permute(2, 0, 1).unsqueeze(1) * 2 - 1
