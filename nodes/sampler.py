"""LiveAvatar sampler node: portrait + speech features + prompt -> streamed latent video."""
from __future__ import annotations

import torch

from ..liveavatar import StreamInputs, StreamSettings, Streamer
from ..liveavatar.portrait import parse_area, prepare_portrait
from ..liveavatar.vae import normalised_to_raw

from . import host
from .conditioning import image_tensor, text_embeddings
from .vae_adapter import encode_portrait, streaming_vae

SIZE_PRESETS = ["384*256", "688*368", "704*384", "720*400", "custom"]
FPS = 25


class LiveAvatarSampler:
    DESCRIPTION = ("Generates LiveAvatar's latent video block by block (3 latent frames = 12 video frames each), "
                   "driven by the audio features, anchored to the portrait, steered by the prompt.")
    CATEGORY = "LiveAvatar"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latents",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("LIVEAVATAR_MODEL", {"tooltip": "From LiveAvatar Model Loader."}),
            "positive": ("CONDITIONING", {"tooltip": "CLIPTextEncode with CLIPLoader (type 'wan', umt5_xxl). "
                                                     "Describe the person and the scene; no negative prompt is used."}),
            "image": ("IMAGE", {"tooltip": "The portrait to animate (first image of the batch)."}),
            "vae": ("VAE", {"tooltip": "wan_2.1_vae.safetensors from VAELoader."}),
            "audio_features": ("LIVEAVATAR_AUDIO", {"tooltip": "From LiveAvatar Audio Encode."}),
            "size": (SIZE_PRESETS, {"default": "704*384",
                                    "tooltip": "Pixel-area budget; the aspect ratio follows the image and sides are "
                                               "multiples of 64. 'custom' uses width*height as the budget."}),
            "width": ("INT", {"default": 704, "min": 128, "max": 2048, "step": 16,
                              "tooltip": "With size 'custom': width of the area budget."}),
            "height": ("INT", {"default": 384, "min": 128, "max": 2048, "step": 16,
                               "tooltip": "With size 'custom': height of the area budget."}),
            "infer_frames": ("INT", {"default": 48, "min": 12, "max": 240, "step": 12,
                                     "tooltip": "Video frames per clip (multiple of 12). The attention window "
                                                "covers one clip."}),
            "num_clip": ("INT", {"default": 0, "min": 0, "max": 100000,
                                 "tooltip": "Clips to generate; 0 = until the audio ends."}),
            "sample_steps": ("INT", {"default": 4, "min": 1, "max": 6,
                                     "tooltip": "Denoising steps per block: 4 is LiveAvatar's default, 3 is faster."}),
            "seed": ("INT", {"default": 42, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                             "tooltip": "Noise seed (also draws the rolling sink offsets)."}),
        }}

    def sample(self, model, positive, image, vae, audio_features, size, width, height, infer_frames, num_clip,
               sample_steps, seed):
        area = width * height if size == "custom" else parse_area(size)
        text = text_embeddings(positive, model.dit.cfg.text_len)  # input checks before the portrait encode
        portrait = prepare_portrait(image_tensor(image), area)
        vae_engine = streaming_vae(vae, host.torch_device())
        ref_latent, motion_latents = encode_portrait(vae_engine, portrait)
        features, speech_frames = audio_features.per_frame(infer_frames)
        inputs = StreamInputs(text, ref_latent, motion_latents, features)
        settings = StreamSettings(infer_frames=infer_frames, num_clip=num_clip, steps=sample_steps, seed=seed,
                                  kv_fp8=model.kv_fp8)
        latents = run_stream(model.dit, inputs, settings)
        # ComfyUI's LATENT holds raw VAE means (its Wan latent format normalises inside the
        # model); the DiT works in normalised space, so convert at the boundary.
        return ({"samples": normalised_to_raw(latents).unsqueeze(0),
                 "liveavatar": {"motion_latents": motion_latents.cpu(), "video_frames": speech_frames, "fps": FPS}},)


def run_stream(dit, inputs: StreamInputs, settings: StreamSettings) -> torch.Tensor:
    """All clean latent blocks, concatenated in time on the CPU: [16, frames, h, w]. Ticks the
    progress bar every block-step, stops cleanly on cancel, frees the caches either way."""
    streamer = Streamer(dit, inputs, settings)
    progress = host.Progress(streamer.total_block_steps, "LiveAvatar sampling")
    preview = host.latent_previewer()
    blocks = []

    def on_step():
        host.check_interrupted()
        progress.step()

    try:
        for block in streamer.blocks(on_step):
            blocks.append(block.latents.float().cpu())
            if preview is not None:
                progress.show(preview(block.latents))
    finally:
        streamer.close()
        host.release_memory()
    return torch.cat(blocks, dim=1)
