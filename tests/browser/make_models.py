"""Model files for running the shipped workflows in a real ComfyUI on CPU.

ComfyUI's core loaders only take real-size files, so the VAE, wav2vec2-large and umt5-xxl
files are real size with random weights (umt5-xxl stored in fp8, 5.7 GB, with a small
sentencepiece tokenizer trained here inside it, as ComfyUI's repackaged file carries its own);
our DiT and LoRA are the tiny test models, with the audio side sized for wav2vec2-large.
Run with ComfyUI importable (its root as the working directory): the umt5 tensor names and
shapes are taken from ComfyUI's own text encoder class, built on the meta device.
"""
from __future__ import annotations

import importlib
import importlib.util
import io
import sys
import wave
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

UMT5_FILE = "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
FILES = {  # folder -> file name, as the shipped workflows name them
    "diffusion_models": "wan2.2_s2v_14B_bf16.safetensors", "loras": "liveavatar.safetensors",
    "vae": "wan_2.1_vae.safetensors", "audio_encoders": "wav2vec2_large_english_fp16.safetensors",
    "text_encoders": UMT5_FILE,
}
WAV2VEC2_LARGE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                      conv_dim=[512] * 7, conv_kernel=[10, 3, 3, 3, 3, 2, 2], conv_stride=[5, 2, 2, 2, 2, 2, 2],
                      conv_bias=True, feat_extract_norm="layer", num_conv_pos_embeddings=128,
                      num_conv_pos_embedding_groups=16, do_stable_layer_norm=True)
TOKENIZER_TEXT = ("A person talking to the camera, natural head motion, clear lip movement, soft studio light. "
                  "A woman speaks calmly in a bright room; a man smiles and explains an idea to the viewer.")


def write_all(models: Path, inputs: Path, testing) -> None:
    """testing: the pack's liveavatar.testing module (tiny model writers)."""
    for folder, name in FILES.items():
        (models / folder).mkdir(parents=True, exist_ok=True)
        path = models / folder / name
        if path.exists():
            continue
        if folder == "diffusion_models":
            testing.write_tiny_dit(path, audio_dim=WAV2VEC2_LARGE["hidden_size"],
                                   audio_layers=WAV2VEC2_LARGE["num_hidden_layers"] + 1)
        elif folder == "loras":
            testing.write_tiny_lora(path)
        elif folder == "vae":
            testing.write_tiny_vae(path, dim=96)  # Wan2.1's real width
        elif folder == "audio_encoders":
            testing.write_tiny_wav2vec2(path, config=WAV2VEC2_LARGE)
        else:
            write_umt5_xxl(path)
    inputs.mkdir(parents=True, exist_ok=True)
    write_portrait(inputs / "portrait.png")
    write_speech(inputs / "speech.wav")


def sentencepiece_model() -> bytes:
    import sentencepiece
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(TOKENIZER_TEXT.split(". ") * 20), model_writer=model,
                                             vocab_size=48, model_type="unigram", character_coverage=1.0,
                                             pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    return model.getvalue()


def write_umt5_xxl(path: Path, seed: int = 5) -> None:
    """Every tensor of ComfyUI's umt5-xxl encoder at its real shape, random, in fp8 (so ComfyUI
    keeps it in fp8 in memory: 5.7 GB instead of 11)."""
    t5 = importlib.import_module("comfy.text_encoders.t5")
    ops = importlib.import_module("comfy.ops")
    config = __import__("json").loads((Path(t5.__file__).parent / "umt5_config_xxl.json").read_text())
    with torch.device("meta"):
        model = t5.T5(config, torch.float8_e4m3fn, "meta", ops.manual_cast)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, meta in model.state_dict().items():
        tensors[name] = random_fp8(meta.shape, "norm" in name, generator)
    tensors["spiece_model"] = torch.frombuffer(bytearray(sentencepiece_model()), dtype=torch.uint8)
    save_file(tensors, str(path))


def random_fp8(shape, is_norm: bool, generator, rows: int = 16384) -> torch.Tensor:
    out = torch.empty(shape, dtype=torch.float8_e4m3fn)
    if is_norm:
        return out.copy_(torch.ones(shape))
    scale = 1 / max(shape[-1], 1) ** 0.5
    flat = out.view(-1, shape[-1]) if len(shape) > 1 else out.view(1, -1)
    for start in range(0, flat.shape[0], rows):  # a chunk at a time: the embedding alone has 1e9 values
        chunk = flat[start:start + rows]
        chunk.copy_(torch.randn(chunk.shape, generator=generator) * scale)
    return out


def write_portrait(path: Path) -> None:
    from PIL import Image
    y, x = np.mgrid[0:240, 0:180]
    face = ((x - 90) ** 2 / 50 ** 2 + (y - 110) ** 2 / 70 ** 2) < 1
    image = np.stack([120 + 60 * face, 140 + 30 * face, 170 - 40 * face], -1).astype(np.uint8)
    Image.fromarray(image).save(path)


def write_speech(path: Path, seconds: float = 1.6, rate: int = 16000) -> None:
    t = np.arange(int(seconds * rate)) / rate
    samples = 0.3 * np.sin(2 * np.pi * 160 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t))
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes((samples * 32767).astype(np.int16).tobytes())


def import_pack_testing():
    """The pack's tiny-model writers, imported as ComfyUI imports the pack (as a package)."""
    pack = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("ComfyUI-LiveAvatar", pack / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return importlib.import_module("ComfyUI-LiveAvatar.liveavatar.testing")


if __name__ == "__main__":  # python make_models.py MODELS_DIR INPUT_DIR, from the ComfyUI root
    sys.path.insert(0, str(Path.cwd()))  # this process only: ComfyUI's modules
    import comfy.options
    comfy.options.enable_args_parsing(False)
    from comfy.cli_args import args
    args.cpu = True
    write_all(Path(sys.argv[1]), Path(sys.argv[2]), import_pack_testing())
