"""Tiny random models in the real file layouts, for the demo and the tests.

The DiT, LoRA, VAE and wav2vec2 files written here have the official key names and the
layouts ComfyUI users have (single safetensors, LoRA in peft naming, VAE in .pth naming,
wav2vec2 in ComfyUI's repackaged naming); only the sizes are tiny and the weights random.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .dit import DiTConfig, LiveAvatarDiT
from .vae import VideoVAE

TEXT_DIM = 4096  # umt5-xxl width: ComfyUI's text encoder output feeds the tiny DiT unchanged
WAV2VEC2_TINY = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                     conv_dim=[16] * 7, conv_kernel=[10, 3, 3, 3, 3, 2, 2], conv_stride=[5, 2, 2, 2, 2, 2, 2],
                     conv_bias=True, feat_extract_norm="layer", num_conv_pos_embeddings=16,
                     num_conv_pos_embedding_groups=2, do_stable_layer_norm=True)


def tiny_dit_config(audio_dim: int = WAV2VEC2_TINY["hidden_size"],
                    audio_layers: int = WAV2VEC2_TINY["num_hidden_layers"] + 1) -> DiTConfig:
    """3 layers of width 64; the audio side matches the wav2vec2 it will be fed (every
    hidden state: layers + 1)."""
    return DiTConfig(dim=64, ffn_dim=96, num_heads=2, num_layers=3, text_dim=TEXT_DIM, text_len=512,
                     audio_dim=audio_dim, audio_layers=audio_layers, audio_inject_layers=(0, 2))


def _randomise(module: torch.nn.Module, seed: int) -> dict:
    """State dict with random values of sensible scale (norm gains near 1)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, tensor in module.state_dict().items():
        if tensor.dim() >= 2:
            fan_in = tensor[0].numel()
            out[name] = torch.randn(tensor.shape, generator=g) / fan_in ** 0.5
        elif "norm" in name or "gamma" in name:
            out[name] = 1 + 0.1 * torch.randn(tensor.shape, generator=g)
        else:
            out[name] = 0.1 * torch.randn(tensor.shape, generator=g)
    return out


def write_tiny_dit(path: Path, seed: int = 0, **audio) -> Path:
    cfg = tiny_dit_config(**audio)
    weights = _randomise(LiveAvatarDiT(cfg), seed)
    config = {f: getattr(cfg, f) for f in ("dim", "ffn_dim", "num_heads", "num_layers", "text_dim", "text_len",
                                           "audio_dim", "num_audio_token", "cond_dim", "in_dim", "out_dim", "freq_dim")}
    config["audio_inject_layers"] = list(cfg.audio_inject_layers)
    save_file({k: v.to(torch.bfloat16) for k, v in weights.items()}, str(path), metadata={"config": json.dumps(config)})
    return path


def write_tiny_lora(path: Path, rank: int = 4, seed: int = 1) -> Path:
    """peft naming (`<module>.lora_A.default.weight`) on q/k/v/o/ffn of blocks and injectors."""
    g = torch.Generator().manual_seed(seed)
    model = LiveAvatarDiT(tiny_dit_config())
    lora = {}
    for name, tensor in model.state_dict().items():
        module = name[:-len(".weight")]
        if _lora_target(name):
            out_dim, in_dim = tensor.shape
            lora[f"{module}.lora_A.default.weight"] = torch.randn(rank, in_dim, generator=g) / in_dim ** 0.5
            lora[f"{module}.lora_B.default.weight"] = 0.01 * torch.randn(out_dim, rank, generator=g)
    save_file(lora, str(path))
    return path


def _lora_target(name: str) -> bool:
    """LiveAvatar's LoRA targets: q/k/v/o and ffn.0/ffn.2 (peft's suffix match also hits the
    audio injectors' q/k/v/o)."""
    if not name.endswith(".weight"):
        return False
    module = name[:-len(".weight")]
    attention = module.rsplit(".", 1)[-1] in ("q", "k", "v", "o") and module.startswith(("blocks.", "audio_injector.injector."))
    return attention or (module.startswith("blocks.") and module.endswith((".ffn.0", ".ffn.2")))


def write_tiny_vae(path: Path, seed: int = 2, dim: int = 4) -> Path:
    """Wan2.1 VAE (.pth naming, safetensors file) at base width `dim` (the real one: 96,
    which ComfyUI's VAELoader requires)."""
    save_file({k: v.half() for k, v in _randomise(VideoVAE(dim=dim), seed).items()}, str(path))
    return path


def write_tiny_wav2vec2(path: Path, seed: int = 3, config: dict = WAV2VEC2_TINY) -> Path:
    """ComfyUI's repackaged layout: Hugging Face names without `wav2vec2.`, fp16."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model
    weights = _randomise(Wav2Vec2Model(Wav2Vec2Config(**config)), seed)
    save_file({k: v.half() for k, v in weights.items()}, str(path), metadata={"config": json.dumps(config)})
    return path


def write_tiny_models(root: Path) -> dict:
    """ComfyUI-style model folders under root; returns {folder: file name}."""
    files = {"diffusion_models": ("liveavatar_tiny_dit.safetensors", write_tiny_dit),
             "loras": ("liveavatar_tiny_lora.safetensors", write_tiny_lora),
             "vae": ("wan_2.1_vae_tiny.safetensors", write_tiny_vae),
             "audio_encoders": ("wav2vec2_tiny_fp16.safetensors", write_tiny_wav2vec2)}
    for folder, (name, write) in files.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        write(root / folder / name)
    return {folder: name for folder, (name, _) in files.items()}


def speech_like(seconds: float, seed: int = 0, sample_rate: int = 16000):
    """A speech-like float32 waveform (numpy): syllables of a glottal pulse train (f0 wandering
    around 100-200 Hz) through three formant resonators, with noisy consonant onsets, a
    syllabic envelope and pauses between phrases; peak 0.5. For tests and benchmarks that need
    speech's structure (loudness that comes and goes, silences) without a recording."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = np.zeros(int(seconds * sample_rate))
    t = int(rng.uniform(0.1, 0.3) * sample_rate)
    while t < out.size:
        for _ in range(rng.integers(3, 12)):  # a phrase of syllables
            n = min(int(rng.uniform(0.12, 0.32) * sample_rate), out.size - t)
            if n <= 0:
                break
            out[t:t + n] = _syllable(n, rng, sample_rate)
            t += n + int(rng.uniform(0.0, 0.06) * sample_rate)
        t += int(rng.uniform(0.2, 0.8) * sample_rate)  # pause
    return (0.5 * out / max(np.abs(out).max(), 1e-9)).astype(np.float32)


def _syllable(n: int, rng, sample_rate: int):
    import numpy as np
    from scipy.signal import lfilter

    f0 = rng.uniform(100, 200) * np.linspace(1, rng.uniform(0.8, 1.2), n)
    phase = np.cumsum(f0 / sample_rate)
    source = np.diff(np.floor(phase), prepend=0.0)  # one pulse per period
    voice = np.zeros(n)
    for formant, width in ((rng.uniform(300, 850), 80), (rng.uniform(850, 2300), 120), (rng.uniform(2300, 3200), 160)):
        r = np.exp(-np.pi * width / sample_rate)
        voice += lfilter([1.0], [1, -2 * r * np.cos(2 * np.pi * formant / sample_rate), r * r], source)
    onset = min(int(rng.uniform(0.02, 0.08) * sample_rate), n)
    noise = np.zeros(n)
    noise[:onset] = np.diff(rng.standard_normal(onset + 1)) * 0.3 * np.abs(voice).max()  # a fricative, roughly
    envelope = np.sin(np.linspace(0, np.pi, n)) ** 0.5
    return (voice + noise) * envelope * rng.uniform(0.3, 1.0)
