"""The model files and inputs of the integration tests, under the names the shipped workflows
use, in the real file layouts, small:

- diffusion_models/wan2.2_s2v_14B_bf16.safetensors: the pack's tiny DiT (3 layers, width 64),
  its audio side sized for wav2vec2-large (1024 wide, 25 hidden states);
- loras/liveavatar.safetensors: tiny LoRA, peft naming;
- audio_encoders/wav2vec2_large_english_fp16.safetensors: wav2vec2-large at its real size
  (ComfyUI's AudioEncoderLoader only takes the base or large config), random, fp16, 630 MB;
- vae/wan_2.1_vae.safetensors: Wan2.1 VAE layout at base width 4 (loaded by the test VAE
  loader; the real VAELoader with a real-size file is tested separately);
- text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors: tiny umt5 (ComfyUI's T5 tensor
  names, its sentencepiece model inside), width 4096 (loaded by the test text encoder loader);
- input/portrait.png (256 x 256), input/speech.wav (1 s), the continue workflow's two parts
  (speech_part1.wav, speech_part2.wav) and both as one (speech_whole.wav).
"""
from __future__ import annotations

import subprocess
import wave
from pathlib import Path

import numpy as np

RATE = 16000
PORTRAIT_HW = (256, 256)
SPEECH_SECONDS = 1.0
# The continue workflow cuts the speech at a clip boundary: 48 frames at 25 fps = 1.92 s.
PART1_SECONDS, PART2_SECONDS = 1.92, 1.0
WAV2VEC2_LARGE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                      conv_dim=[512] * 7, conv_kernel=[10, 3, 3, 3, 3, 2, 2], conv_stride=[5, 2, 2, 2, 2, 2, 2],
                      conv_bias=True, feat_extract_norm="layer", num_conv_pos_embeddings=128,
                      num_conv_pos_embedding_groups=16, do_stable_layer_norm=True)
TINY_VAE_WIDTH = 4


def write_models(models: Path, comfyui_root: Path, comfyui_python: str):
    from liveavatar import testing
    for folder in ("diffusion_models", "loras", "vae", "audio_encoders", "text_encoders"):
        (models / folder).mkdir(parents=True, exist_ok=True)
    testing.write_tiny_dit(models / "diffusion_models" / "wan2.2_s2v_14B_bf16.safetensors",
                           audio_dim=WAV2VEC2_LARGE["hidden_size"], audio_layers=WAV2VEC2_LARGE["num_hidden_layers"] + 1)
    testing.write_tiny_lora(models / "loras" / "liveavatar.safetensors")
    testing.write_tiny_vae(models / "vae" / "wan_2.1_vae.safetensors", dim=TINY_VAE_WIDTH)
    testing.write_tiny_wav2vec2(models / "audio_encoders" / "wav2vec2_large_english_fp16.safetensors",
                                config=WAV2VEC2_LARGE)
    maker = Path(__file__).with_name("comfyui_test_nodes") / "make_tiny_umt5.py"
    subprocess.run([comfyui_python, str(maker), str(models / "text_encoders" / "umt5_xxl_fp8_e4m3fn_scaled.safetensors")],
                   cwd=comfyui_root, check=True, capture_output=True)


def write_inputs(folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    write_portrait(folder / "portrait.png")
    write_wav(folder / "speech.wav", speech(SPEECH_SECONDS))
    whole = speech(PART1_SECONDS + PART2_SECONDS, seed=1)
    cut = int(round(PART1_SECONDS * RATE))
    write_wav(folder / "speech_part1.wav", whole[:cut])
    write_wav(folder / "speech_part2.wav", whole[cut:])
    write_wav(folder / "speech_whole.wav", whole)


def write_portrait(path: Path):
    from PIL import Image
    h, w = PORTRAIT_HW
    y, x = np.mgrid[0:h, 0:w]
    face = ((x - w / 2) ** 2 / (w / 3.5) ** 2 + (y - h / 2) ** 2 / (h / 3.2) ** 2) < 1
    image = np.stack([120 + 60 * face, 140 + 30 * face, 170 - 40 * face], -1).astype(np.uint8)
    Image.fromarray(image).save(path)


def speech(seconds: float, seed: int = 0) -> np.ndarray:
    """A voiced, syllable-modulated tone with a little noise: int16 samples at 16 kHz."""
    t = np.arange(int(round(seconds * RATE))) / RATE
    pitch = 140 + 20 * np.sin(2 * np.pi * 0.7 * t)
    voice = np.sin(2 * np.pi * np.cumsum(pitch) / RATE) * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t))
    noise = np.random.default_rng(seed).normal(0, 0.02, t.shape)
    return (np.clip(0.3 * voice + noise, -1, 1) * 32767).astype(np.int16)


def write_wav(path: Path, samples: np.ndarray):
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(RATE)
        out.writeframes(samples.tobytes())
