"""The engine's VAE / audio encoder from what ComfyUI's core loaders give us.

ComfyUI's VAELoader returns comfy.sd.VAE (its network in `first_stage_model`, same parameter
names as Wan2.1_VAE.pth); AudioEncoderLoader returns an object whose get_sd() holds wav2vec2
in Hugging Face naming. We build our streaming engine objects from those weights once per
loaded object. Engine objects passed directly (tests, demo) are used as they are.
"""
from __future__ import annotations

import weakref

import torch

from ..liveavatar.audio import Wav2Vec2Encoder
from ..liveavatar.vae import PORTRAIT_ENCODE_STEPS, WanVAE

from . import host

_built: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _compute_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def streaming_vae(vae, device) -> WanVAE:
    if isinstance(vae, WanVAE):
        return vae
    network = getattr(vae, "first_stage_model", None)
    if network is None:
        raise ValueError("the VAE input must come from VAELoader (wan_2.1_vae.safetensors)")
    if vae not in _built:
        _built[vae] = WanVAE.from_state_dict(network.state_dict(), torch.device(device), _compute_dtype(torch.device(device)))
    return _built[vae]


def audio_encoder(encoder, device) -> Wav2Vec2Encoder:
    if isinstance(encoder, Wav2Vec2Encoder):
        return encoder
    if not hasattr(encoder, "get_sd"):
        raise ValueError("the audio encoder input must come from AudioEncoderLoader "
                         "(wav2vec2_large_english_fp16.safetensors)")
    if encoder not in _built:
        _built[encoder] = Wav2Vec2Encoder.from_state_dict(encoder.get_sd(), device=torch.device(device))
    return _built[encoder]


def encode_portrait(vae: WanVAE, portrait: torch.Tensor):
    """vae.encode_portrait with progress and cancel after every chunk: the 73 still frames
    behind the motion latents take minutes on a CPU or a slow GPU."""
    def on_step():
        host.check_interrupted()
        progress.step()

    progress = host.Progress(PORTRAIT_ENCODE_STEPS, "LiveAvatar portrait encode")
    try:
        return vae.encode_portrait(portrait, on_step)
    finally:
        progress.close()
