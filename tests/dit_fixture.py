"""Helpers to build the engine from a dit_streaming fixture set (manifest-driven)."""
from pathlib import Path

import torch
from safetensors.torch import save_file

from conftest import load_manifest, load_tensors
from liveavatar.dit import DiTConfig, LiveAvatarDiT
from liveavatar.sampler import StreamInputs, StreamSettings


def fixture_config(set_dir: Path) -> DiTConfig:
    manifest = load_manifest(set_dir, "dit_streaming")
    return DiTConfig.from_dict(manifest["config"], audio_layers=manifest["audio_hidden_states"])


def fixture_weights(set_dir: Path) -> dict:
    return load_tensors(set_dir, "dit_streaming", prefix="weights.")


def fixture_model(set_dir: Path) -> LiveAvatarDiT:
    model = LiveAvatarDiT(fixture_config(set_dir))
    model.load_state_dict(fixture_weights(set_dir), strict=True)
    return model.eval()


def fixture_inputs(set_dir: Path) -> StreamInputs:
    t = load_tensors(set_dir, "dit_streaming", prefix="inputs.")
    return StreamInputs(t["text_context"], t["ref_latent"], t["motion_latents"], t["audio_features"])


def fixture_settings(set_dir: Path) -> StreamSettings:
    manifest = load_manifest(set_dir, "dit_streaming")
    noise = load_tensors(set_dir, "dit_streaming", prefix="inputs.")["noise"]
    sizes, sampler = manifest["sizes"], manifest["sampler"]
    return StreamSettings(infer_frames=sizes["video_frames_per_clip"], num_clip=sizes["clips"], steps=sampler["steps"],
                          rolling_offset=sampler["rolling_offset"], noise=noise)


def write_checkpoint(weights: dict, path: Path, prefix: str = "") -> Path:
    save_file({prefix + k: v.contiguous() for k, v in weights.items()}, str(path))
    return path


def stream_clips(model, inputs, settings, **kwargs) -> torch.Tensor:
    """Run the streaming sampler; clean latents [clips, 16, F, h, w]."""
    from liveavatar.sampler import stream
    clips = {}
    for block in stream(model, inputs, settings, **kwargs):
        clips.setdefault(block.clip, []).append(block.latents)
    return torch.stack([torch.cat(clips[c], dim=1) for c in sorted(clips)])
