"""LiveAvatar sampler node: portrait + speech features + prompt -> streamed latent video."""
from __future__ import annotations

import torch

from .stream_run import INFER_FRAMES, SIZE_PRESETS, StreamRun, portrait_memo, run_stream  # noqa: F401 (run_stream: tests)


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
            "infer_frames": ("INT", {**INFER_FRAMES,
                                     "tooltip": "Video frames per clip (multiple of 12). The attention window "
                                                "covers one clip."}),
            "num_clip": ("INT", {"default": 0, "min": 0, "max": 100000,
                                 "tooltip": "Clips to generate; 0 = until the audio ends."}),
            "sample_steps": ("INT", {"default": 4, "min": 1, "max": 6,
                                     "tooltip": "Denoising steps per block: 4 is LiveAvatar's default, 3 is faster."}),
            "seed": ("INT", {"default": 42, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                             "tooltip": "Noise seed (also draws the rolling sink offsets)."}),
        }, "optional": CONTINUE_INPUTS}

    def sample(self, model, positive, image, vae, audio_features, size, width, height, infer_frames, num_clip,
               sample_steps, seed, continue_from=None, keep_state=False):
        run = StreamRun("LiveAvatar Sampler", model, positive, image, vae, audio_features, size, width, height,
                        infer_frames, num_clip, sample_steps, seed, continue_from, keep_state,
                        portraits=portrait_memo(self)).start()
        latents = torch.cat([block.latents for block in run.blocks(on_cpu=True)], dim=1)
        return {"ui": run.ui(), "result": (run.output(latents),)}


CONTINUE_INPUTS = {
    "continue_from": ("LATENT", {"tooltip": "The LATENT of an earlier LiveAvatar run (Sampler or Live Video): this run "
                                            "continues that video with the next part of the speech (cut at a clip "
                                            "boundary). Exact when that run kept its state and the same model, LoRA "
                                            "strength, prompt, portrait, size, infer_frames, sample_steps and audio "
                                            "encoder are used; otherwise approximate, from its last latents (the "
                                            "node says which, and why)."}),
    "keep_state": ("BOOLEAN", {"default": False,
                               "tooltip": "Keep the streaming state (attention caches, in GPU memory) after the run, so "
                                          "that a later run can continue this video exactly. It is released when this "
                                          "output is dropped, a continuation uses it, or ComfyUI frees memory."}),
}
