"""Turning ComfyUI's types into what the engine takes (no model math here)."""
from __future__ import annotations

import torch

import logging

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


def image_tensor(image) -> torch.Tensor:
    """IMAGE [B, H, W, 3] float 0..1 -> the first image, [H, W, 3]."""
    if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[-1] not in (3, 4):
        raise ValueError("the image input (portrait) must be a ComfyUI IMAGE [batch, height, width, 3]")
    if image.shape[0] == 0:
        raise ValueError(f"the image input (portrait) is an empty batch {tuple(image.shape)}: connect a LoadImage "
                         "with the portrait, or check the node that filters the batch")
    return image[0, ..., :3]
