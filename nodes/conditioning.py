"""Turning ComfyUI's types into what the engine takes (no model math here)."""
from __future__ import annotations

import logging

import torch

from . import host

log = logging.getLogger("LiveAvatar")


def text_embeddings(conditioning, max_tokens: int) -> torch.Tensor:
    """CONDITIONING from CLIPTextEncode (umt5-xxl, CLIPLoader type 'wan') -> real tokens [L, 4096].

    ComfyUI pads the umt5 output to at least 512 tokens and zeroes the padded rows
    (attention mask + zero_out_masked); the original feeds the DiT the real tokens (EOS
    included) and zero-pads them itself. So: the rows up to the mask's length (or up to the
    last non-zero row when no mask is attached), cut to the model's text_len (512), as the
    original tokenizer truncates long prompts."""
    if not conditioning:
        raise ValueError("empty CONDITIONING: connect a CLIPTextEncode (umt5-xxl, CLIPLoader type 'wan')")
    if len(conditioning) > 1:
        # ComfyUI samples each entry of a combined CONDITIONING separately and mixes the
        # results; LiveAvatar's distilled 4-step model takes one text: refuse rather than drop.
        raise ValueError(f"the positive CONDITIONING has {len(conditioning)} entries (e.g. from ConditioningCombine); "
                         "LiveAvatar takes one prompt: write everything in one CLIPTextEncode")
    tensor, extras = conditioning[0][0], conditioning[0][1] if len(conditioning[0]) > 1 else {}
    if tensor.dim() != 3 or tensor.shape[-1] != 4096:
        raise ValueError(f"CONDITIONING has shape {tuple(tensor.shape)}; LiveAvatar needs umt5-xxl text embeddings "
                         f"[1, tokens, 4096] (CLIPLoader with type 'wan' and umt5_xxl_fp8_e4m3fn_scaled.safetensors)")
    rows = tensor[0]
    mask = extras.get("attention_mask") if isinstance(extras, dict) else None
    if mask is not None:
        length = int(mask.reshape(-1).sum())
    else:
        nonzero = rows.abs().amax(dim=-1) > 0
        length = int(nonzero.nonzero().max()) + 1 if nonzero.any() else 1
    if length > max_tokens:
        log.warning("LiveAvatar: the prompt is %d tokens; the model reads the first %d", length, max_tokens)
    return rows[:min(length, max_tokens)].float()


def image_tensor(image, notes: host.NodeNotes | None = None) -> torch.Tensor:
    """IMAGE [B, H, W, 3] float 0..1 -> the first image, [H, W, 3] in 0..1. Pixels in 0..255 or
    -1..1 (from a script or a node of another convention) are brought to 0..1 with a note,
    rather than clamped into a flat white or washed-out picture."""
    if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[-1] not in (1, 3, 4):
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        hint = (": it looks channels-first [batch, channels, height, width]; move the channels last"
                if isinstance(image, torch.Tensor) and image.dim() == 4 and image.shape[1] in (1, 3, 4) else "")
        raise ValueError(f"the image input (portrait) must be a ComfyUI IMAGE [batch, height, width, 3], got "
                         f"{shape}{hint}")
    if image.shape[0] == 0:
        raise ValueError(f"the image input (portrait) is an empty batch {tuple(image.shape)}: connect a LoadImage "
                         "with the portrait, or check the node that filters the batch")
    first = image[0]
    first = first.expand(*first.shape[:2], 3) if first.shape[-1] == 1 else first[..., :3]  # grey -> RGB
    return unit_range(first, notes or host.NodeNotes())


UNIT_SLACK = 0.5  # past 0..1 by more than this, the pixels follow another convention


def unit_range(pixels: torch.Tensor, notes: host.NodeNotes) -> torch.Tensor:
    """Pixels -> float in 0..1: uint8 and 0..255 floats divided by 255, -1..1 mapped to 0..1
    (both noted); small overshoots (resampling ringing) are left for the clamp downstream."""
    if pixels.dtype == torch.uint8:
        notes.add("the image input (portrait) holds 8-bit values (0..255); ComfyUI images are floats in 0..1, so "
                  "it was divided by 255")
        return pixels.float() / 255
    if not pixels.is_floating_point():
        raise ValueError(f"the image input (portrait) holds {pixels.dtype} values; a ComfyUI IMAGE holds floats in 0..1")
    pixels = pixels.float()
    if not torch.isfinite(pixels).all():
        raise ValueError("the image input (portrait) has NaN or infinite pixels: check the node that made it")
    low, high = float(pixels.min()), float(pixels.max())
    if high > 1 + UNIT_SLACK and low > -UNIT_SLACK and high <= 255 + UNIT_SLACK:
        notes.add(f"the image input (portrait) has pixel values up to {high:g}, as 0..255 images do; ComfyUI "
                  "images are 0..1, so it was divided by 255")
        return pixels / 255
    if low < -UNIT_SLACK and low >= -1 - UNIT_SLACK / 10 and high <= 1 + UNIT_SLACK / 10:
        notes.add(f"the image input (portrait) has pixel values down to {low:g}, as -1..1 images do; ComfyUI "
                  "images are 0..1, so it was mapped to 0..1")
        return (pixels + 1) / 2
    if high > 1 + UNIT_SLACK or low < -UNIT_SLACK:
        raise ValueError(f"the image input (portrait) has pixel values from {low:g} to {high:g}; a ComfyUI IMAGE "
                         "holds 0..1 (0..255 and -1..1 are converted): check the node that made it")
    return pixels
