"""Whole-pipeline demo on tiny random weights: portrait + speech -> frames -> mp4 + contact sheet.

Runs the pack's own ComfyUI node classes outside ComfyUI (standalone fallbacks), with tiny
random models written in the real file layouts, so a fresh install can be checked in a
minute on a CPU. The video is noise-like (random weights); what it proves is that every
stage runs: model loading + LoRA merge, audio features, streaming sampling, streaming
decode, mp4 with sound.

    python demo.py [--out demo_output] [--seconds 3]
"""
import argparse
import importlib.util
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw



def import_pack():
    """This folder as ComfyUI imports it: a package loaded from its __init__.py, whatever the
    folder is called (nothing is put on sys.path); the engine is its `liveavatar` member."""
    spec = importlib.util.spec_from_file_location("liveavatar_pack", Path(__file__).resolve().parent / "__init__.py")
    pack = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pack)
    return pack


def synthetic_portrait(size=(320, 256)) -> torch.Tensor:
    """A face-like drawing as a ComfyUI IMAGE [1, H, W, 3]."""
    h, w = size
    img = Image.new("RGB", (w, h), (70, 90, 120))
    draw = ImageDraw.Draw(img)
    draw.ellipse((w * 0.2, h * 0.15, w * 0.8, h * 0.8), fill=(225, 185, 160))
    for x in (0.38, 0.62):
        draw.ellipse((w * x - 10, h * 0.38, w * x + 10, h * 0.45), fill=(40, 40, 40))
    draw.arc((w * 0.38, h * 0.55, w * 0.62, h * 0.68), 20, 160, fill=(150, 60, 60), width=4)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255)[None]


def synthetic_speech(seconds: float, rate: int = 22050) -> dict:
    """A vowel-like buzz with syllable-rate loudness changes, as a ComfyUI AUDIO dict."""
    t = np.arange(int(seconds * rate)) / rate
    pitch = 140 + 20 * np.sin(2 * math.pi * 0.7 * t)
    phase = 2 * math.pi * np.cumsum(pitch) / rate
    voice = sum(np.sin(k * phase) / k for k in range(1, 12))
    envelope = np.clip(np.sin(2 * math.pi * 3.5 * t), 0, None) ** 0.5
    wave = (0.2 * voice * envelope).astype(np.float32)
    return {"waveform": torch.from_numpy(wave)[None, None], "sample_rate": rate}


def text_conditioning(tokens: int = 12, seed: int = 0):
    """Stands in for CLIPTextEncode (umt5-xxl): [1, 512, 4096], real tokens then zeros."""
    g = torch.Generator().manual_seed(seed)
    cond = torch.zeros(1, 512, 4096)
    cond[0, :tokens] = torch.randn(tokens, 4096, generator=g) * 0.2
    mask = torch.zeros(1, 512, dtype=torch.long)
    mask[0, :tokens] = 1
    return [[cond, {"attention_mask": mask}]]


def contact_sheet(frames: torch.Tensor, path: Path, columns: int = 8):
    """Every len/16-th frame in a grid PNG."""
    picks = frames[:: max(1, len(frames) // 16)][:16]
    rows = math.ceil(len(picks) / columns)
    h, w = picks.shape[1:3]
    sheet = np.zeros((rows * h, columns * w, 3), np.uint8)
    for i, frame in enumerate(picks):
        r, c = divmod(i, columns)
        sheet[r * h:(r + 1) * h, c * w:(c + 1) * w] = (frame.numpy() * 255).round().astype(np.uint8)
    Image.fromarray(sheet).save(path)
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_output")
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    out = Path(args.out).resolve()
    os.environ["LIVEAVATAR_MODELS"] = str(out / "models")
    os.environ["LIVEAVATAR_OUTPUT"] = str(out)

    import_pack()
    from liveavatar_pack.liveavatar.audio import Wav2Vec2Encoder
    from liveavatar_pack.liveavatar.testing import write_tiny_models
    from liveavatar_pack.liveavatar.vae import WanVAE
    from liveavatar_pack.nodes import LiveAvatarAudioEncode, LiveAvatarDecode, LiveAvatarModelLoader, LiveAvatarSampler

    files = write_tiny_models(out / "models")
    print(f"tiny random models in {out / 'models'}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    (model,) = LiveAvatarModelLoader().load(files["diffusion_models"], files["loras"], 1.0,
                                             "bf16" if device == "cuda" else "fp32", "one GPU", 0, "auto", False)
    encoder = Wav2Vec2Encoder.load(out / "models" / "audio_encoders" / files["audio_encoders"], device=device)
    vae = WanVAE.load(out / "models" / "vae" / files["vae"], device=device)
    speech = synthetic_speech(args.seconds)
    features, clips, frames = LiveAvatarAudioEncode().encode(speech, encoder, 48)
    print(f"speech: {args.seconds:.1f} s -> {frames} video frames, {clips} clip(s) of 48")
    latents = LiveAvatarSampler().sample(model, text_conditioning(), synthetic_portrait(), vae, features,
                                         "custom", 128, 160, 48, 0, 4, 42)["result"][0]
    result = LiveAvatarDecode().decode(latents, vae, True, True, "liveavatar_demo", audio=speech)
    images, fps = result["result"]
    sheet = contact_sheet(images, out / "liveavatar_demo_contact_sheet.png")
    print(f"{len(images)} frames {tuple(images.shape[1:3])} at {fps:g} fps")
    print(f"video: {result['ui']['text'][0]}\ncontact sheet: {sheet}")


if __name__ == "__main__":
    main()
