"""The engine's VAE / audio encoder on what ComfyUI's core loaders give us, without a copy.

ComfyUI's VAELoader returns comfy.sd.VAE (its network in `first_stage_model`, same parameter
names as Wan2.1_VAE.pth, managed by its `patcher`); AudioEncoderLoader returns an object whose
`model` is wav2vec2 in Hugging Face naming (managed by its `patcher`). ComfyUI loads them
(load_models, with the DiT when both run) and our streaming engines are built around their very
parameters each time (cheap: built on the meta device, then bound), so there is one copy of
each, which ComfyUI loads, offloads and frees. Engine objects passed directly (tests, demo)
are used as they are.
"""
from __future__ import annotations

import torch

from ..liveavatar.audio import Wav2Vec2Encoder, hf_state_dict, infer_config
from ..liveavatar.vae import PORTRAIT_ENCODE_STEPS, WanVAE

from . import host


def vae_patcher(vae):
    """ComfyUI's handle on a core VAE (None for an engine VAE)."""
    return None if isinstance(vae, WanVAE) else getattr(vae, "patcher", None)


def streaming_vae(vae) -> WanVAE:
    """Our streaming VAE on the core VAE's parameters, where ComfyUI holds them now (call
    host.load_models with vae_patcher(vae) first)."""
    if isinstance(vae, WanVAE):
        return vae
    network = getattr(vae, "first_stage_model", None)
    if not isinstance(network, torch.nn.Module):
        raise ValueError("the VAE input must come from VAELoader (wan_2.1_vae.safetensors)")
    return WanVAE.sharing(dict(network.named_parameters()))


def loaded_vae(vae) -> WanVAE:
    """streaming_vae after ComfyUI loaded the core VAE fully on its device."""
    host.load_models([vae_patcher(vae)])
    return streaming_vae(vae)


def audio_encoder(encoder) -> Wav2Vec2Encoder:
    """Our wav2vec2 on the core audio encoder's parameters, loaded by ComfyUI first."""
    if isinstance(encoder, Wav2Vec2Encoder):
        return encoder
    model = getattr(encoder, "model", None)
    if not isinstance(model, torch.nn.Module):
        raise ValueError("the audio encoder input must come from AudioEncoderLoader "
                         "(wav2vec2_large_english_fp16.safetensors)")
    host.load_models([getattr(encoder, "patcher", None)])
    return Wav2Vec2Encoder.sharing(dict(model.named_parameters()), attention_heads(model))


def audio_encoder_patcher(encoder):
    """ComfyUI's handle on a core audio encoder (None for an engine one)."""
    return None if isinstance(encoder, Wav2Vec2Encoder) else getattr(encoder, "patcher", None)


def audio_encoder_layout(encoder) -> tuple[int, int]:
    """(hidden states, width) an audio encoder gives, read from its configuration or its
    parameters' shapes, without loading it."""
    if isinstance(encoder, Wav2Vec2Encoder):
        config = encoder.model.config
        return config.num_hidden_layers + 1, config.hidden_size
    model = getattr(encoder, "model", None)
    if not isinstance(model, torch.nn.Module):
        raise ValueError("the audio encoder input must come from AudioEncoderLoader "
                         "(wav2vec2_large_english_fp16.safetensors)")
    config = infer_config(hf_state_dict(dict(model.named_parameters())))
    return config["num_hidden_layers"] + 1, config["hidden_size"]


def attention_heads(model: torch.nn.Module) -> dict:
    """The head count, which tensor shapes do not tell (64-wide heads are assumed without
    it): a transformers model's config, or the `num_heads` of ComfyUI's attention modules."""
    heads = getattr(getattr(model, "config", None), "num_attention_heads", None)
    if heads is None:
        heads = next((m.num_heads for m in model.modules() if isinstance(getattr(m, "num_heads", None), int)), None)
    return {} if heads is None else {"num_attention_heads": heads}


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
