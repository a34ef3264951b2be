"""Speech -> per-video-frame audio features, as LiveAvatar computes them.

1. Audio to 16 kHz mono (librosa), normalised to zero mean / unit variance (the
   wav2vec2 feature extractor's rule, var + 1e-7 so silence stays finite).
2. wav2vec2 (large xlsr-53 english in the real model, via Hugging Face `transformers`):
   every hidden state, embedding output first, at 50 Hz.
3. 50 Hz -> 30 Hz by linear interpolation (align_corners), int(T50 / 50 * 30) steps.
4. One 30 Hz feature per 25 fps video frame (frame i takes index round(1.2 i)), padded with
   zero features to whole clips of `infer_frames`; the clip count is
   int(T30 / (infer_frames * 1.2)) + 1, as in the original. Result: features
   [layers + 1, hidden, clips * infer_frames] and the video frames the speech covers.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

SAMPLE_RATE = 16000
FEATURE_RATE = 50  # wav2vec2 frames per second (320-sample hop)
RESAMPLED_RATE = 30  # the original's intermediate "video_rate"
VIDEO_FPS = 25
MIN_SAMPLES = 400  # wav2vec2's receptive field: shorter input yields no feature frame


@dataclass
class AudioFeatures:
    """What flows from the audio encoder to the sampler: all wav2vec2 layers at 30 Hz,
    laid out per video frame on demand (the padding depends on the clip length)."""

    features_30hz: torch.Tensor  # [layers + 1, T30, hidden], fp32, CPU

    def per_frame(self, infer_frames: int) -> tuple[torch.Tensor, int]:
        """([layers + 1, hidden, clips * infer_frames], video frames the speech covers)."""
        return per_frame_features(self.features_30hz, infer_frames)

    def num_clips(self, infer_frames: int) -> int:
        return self.per_frame(infer_frames)[0].shape[-1] // infer_frames


# ---- audio input --------------------------------------------------------------------------
def load_audio(source) -> torch.Tensor:
    """A file librosa can read, or a ComfyUI AUDIO dict {"waveform": [B, C, T], "sample_rate"}
    -> mono float32 waveform at 16 kHz [T]."""
    import librosa
    if isinstance(source, dict):
        if "waveform" not in source or "sample_rate" not in source:
            raise ValueError("AUDIO must be a dict with 'waveform' [batch, channels, samples] and 'sample_rate'")
        wave = torch.as_tensor(source["waveform"]).float()
        if wave.dim() != 3 or wave.shape[0] == 0 or wave.shape[1] == 0:
            raise ValueError(f"AUDIO waveform must be [batch, channels, samples], got {tuple(wave.shape)}")
        if wave.shape[-1] < MIN_SAMPLES:
            _checked(wave[0, 0])
        mono = wave[0].mean(0).numpy()
        rate = int(source["sample_rate"])
        if rate != SAMPLE_RATE:
            mono = librosa.resample(mono, orig_sr=rate, target_sr=SAMPLE_RATE)
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"audio file not found: {path}")
        try:
            mono, _ = librosa.load(str(path), sr=SAMPLE_RATE, mono=True)
        except Exception as error:
            raise ValueError(f"cannot decode audio file {path}: {error}") from None
    return _checked(torch.from_numpy(np.ascontiguousarray(mono, dtype=np.float32)))


def _checked(wave: torch.Tensor) -> torch.Tensor:
    if wave.numel() < MIN_SAMPLES:
        raise ValueError(f"the audio is {wave.numel() / SAMPLE_RATE * 1000:.0f} ms long; at least "
                         f"{MIN_SAMPLES / SAMPLE_RATE * 1000:.0f} ms of sound is needed")
    if not torch.isfinite(wave).all():
        raise ValueError("the audio contains NaN or infinite samples")
    return wave


def normalise(wave: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit variance (silence stays zero)."""
    wave = wave.double()
    return ((wave - wave.mean()) / torch.sqrt(wave.var(unbiased=False) + 1e-7)).float()


# ---- wav2vec2 -----------------------------------------------------------------------------
class Wav2Vec2Encoder:
    """wav2vec2 returning all hidden states, loaded from an HF folder or a single file
    (Hugging Face naming, with or without `wav2vec2.`, as in ComfyUI's repackaged file)."""

    def __init__(self, model, device="cpu", dtype=torch.float32):
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.device, self.dtype = torch.device(device), dtype

    @classmethod
    def load(cls, path, device="cpu", dtype=torch.float32) -> "Wav2Vec2Encoder":
        path = Path(path)
        config = None
        if path.is_dir():
            if (path / "config.json").exists():
                config = json.loads((path / "config.json").read_text())
            files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin")) + sorted(path.glob("*.pth"))
            if not files:
                raise FileNotFoundError(f"no wav2vec2 weights (model.safetensors / pytorch_model.bin) in {path}")
            path = files[0]
        elif path.suffix == ".safetensors":
            config = _metadata_config(path)
        from .vae import read_state_dict
        return cls.from_state_dict(read_state_dict(path), config, device, dtype)

    @classmethod
    def from_state_dict(cls, sd: dict, config: dict | None = None, device="cpu", dtype=torch.float32):
        from transformers import Wav2Vec2Config, Wav2Vec2Model
        sd = _hf_names({k: v for k, v in sd.items() if not k.startswith("lm_head.")})
        if "encoder.layer_norm.weight" not in sd or "feature_extractor.conv_layers.0.conv.weight" not in sd:
            raise ValueError("not a wav2vec2 state dict (no feature_extractor / encoder weights); use "
                             "wav2vec2_large_english_fp16.safetensors or the wav2vec2-large-xlsr-53-english folder")
        config = dict(config) if config else infer_config(sd)
        config.update(apply_spec_augment=False, layerdrop=0.0)
        model = Wav2Vec2Model(Wav2Vec2Config(**config))
        expected = model.state_dict()
        sd = _match_weight_norm(sd, expected)
        sd.setdefault("masked_spec_embed", expected["masked_spec_embed"])  # unused at inference
        missing, unexpected = model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
        if missing or unexpected:
            raise ValueError(f"wav2vec2 weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
        return cls(model, device, dtype)

    def hidden_states(self, normalised_wave: torch.Tensor) -> torch.Tensor:
        """[T] normalised 16 kHz samples -> [layers + 1, T50, hidden] fp32."""
        with torch.no_grad():
            out = self.model(normalised_wave[None].to(self.device, self.dtype), output_hidden_states=True)
        return torch.cat(out.hidden_states).float().cpu()


def _metadata_config(path: Path) -> dict | None:
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    return json.loads(metadata["config"]) if "config" in metadata else None


def _hf_names(sd: dict) -> dict:
    return {k[len("wav2vec2."):] if k.startswith("wav2vec2.") else k: v for k, v in sd.items()}


def _match_weight_norm(sd: dict, expected: dict) -> dict:
    """Positional conv weight norm: weight_g/weight_v (older transformers, the original
    files) vs parametrizations.weight.original0/1 (newer transformers, ComfyUI)."""
    base = "encoder.pos_conv_embed.conv."
    old, new = (base + "weight_g", base + "weight_v"), (base + "parametrizations.weight.original0",
                                                      base + "parametrizations.weight.original1")
    sd = dict(sd)
    if new[0] in expected and old[0] in sd:
        sd[new[0]], sd[new[1]] = sd.pop(old[0]), sd.pop(old[1])
    elif old[0] in expected and new[0] in sd:
        sd[old[0]], sd[old[1]] = sd.pop(new[0]), sd.pop(new[1])
    return sd


def infer_config(sd: dict) -> dict:
    """A transformers Wav2Vec2Config from tensor shapes (for files without config.json)."""
    hidden = sd["encoder.layer_norm.weight"].shape[0]
    layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"encoder\.layers\.(\d+)\.", k)))
    convs = sorted({int(m.group(1)) for k in sd if (m := re.match(r"feature_extractor\.conv_layers\.(\d+)\.", k))})
    kernels = [sd[f"feature_extractor.conv_layers.{i}.conv.weight"].shape[-1] for i in convs]
    pos = next(v for k, v in sd.items() if k.startswith("encoder.pos_conv_embed.conv.") and v.dim() == 3 and v.shape[0] == hidden)
    layer_norm_convs = "feature_extractor.conv_layers.1.layer_norm.weight" in sd  # the "large" family
    return dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),  # 64-wide heads (16 in the large model)
                intermediate_size=sd["encoder.layers.0.feed_forward.intermediate_dense.weight"].shape[0],
                conv_dim=[sd[f"feature_extractor.conv_layers.{i}.conv.weight"].shape[0] for i in convs],
                conv_kernel=kernels, conv_stride=[max(2, k // 2) for k in kernels],  # wav2vec2: 10/5 then 3/2, 2/2
                conv_bias=f"feature_extractor.conv_layers.0.conv.bias" in sd,
                feat_extract_norm="layer" if layer_norm_convs else "group",
                num_conv_pos_embeddings=pos.shape[-1], num_conv_pos_embedding_groups=hidden // pos.shape[1],
                do_stable_layer_norm=layer_norm_convs, feat_extract_activation="gelu", hidden_act="gelu")


# ---- features per video frame ---------------------------------------------------------------
def resample_to_30hz(hidden_states: torch.Tensor) -> torch.Tensor:
    """[layers, T50, C] -> [layers, int(T50 / 50 * 30), C], linear, align_corners."""
    steps = int(hidden_states.shape[1] / FEATURE_RATE * RESAMPLED_RATE)
    x = F.interpolate(hidden_states.transpose(1, 2), size=steps, mode="linear", align_corners=True)
    return x.transpose(1, 2)


def per_frame_features(features_30hz: torch.Tensor, infer_frames: int, fps: int = VIDEO_FPS):
    """[layers, T30, C] -> ([layers, C, clips * infer_frames], frames covered): video frame i
    takes the 30 Hz feature nearest its time (index round(i * 30 / fps)); frames past the
    speech get zero features."""
    layers, t30, channels = features_30hz.shape
    clips = int(t30 / (infer_frames * RESAMPLED_RATE / fps)) + 1
    frames = clips * infer_frames
    index = np.round(np.arange(frames) / fps * RESAMPLED_RATE).astype(np.int64)
    covered = int((index < t30).sum())
    out = torch.zeros(layers, channels, frames)
    out[:, :, :covered] = features_30hz[:, torch.from_numpy(index[:covered])].transpose(1, 2)
    return out, covered


def encode_audio(encoder: Wav2Vec2Encoder, wave_16k: torch.Tensor) -> AudioFeatures:
    """16 kHz mono waveform -> all layers at 30 Hz (see AudioFeatures.per_frame)."""
    features = resample_to_30hz(encoder.hidden_states(normalise(_checked(wave_16k))))
    if features.shape[1] == 0:
        raise ValueError("the audio is too short to cover one video frame (40 ms)")
    return AudioFeatures(features)
