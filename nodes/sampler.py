"""LiveAvatar sampler node: portrait + speech features + prompt -> streamed latent video."""
from __future__ import annotations

import uuid

import torch

from ..liveavatar import StreamInputs, StreamSettings, Streamer
from ..liveavatar.decoding import PRIMING_LATENTS
from ..liveavatar.portrait import parse_area, prepare_portrait
from ..liveavatar.dit import MOTION_VIDEO_FRAMES
from ..liveavatar.vae import normalised_to_raw, raw_to_normalised

from . import host
from .conditioning import image_tensor, text_embeddings
from .vae_adapter import encode_portrait, streaming_vae

SIZE_PRESETS = ["384*256", "688*368", "704*384", "720*400", "custom"]
FPS = 25
MOTION_LATENTS = (MOTION_VIDEO_FRAMES + 3) // 4  # 19


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
        }, "optional": {
            "continue_from": ("LATENT", {"tooltip": "A previous LiveAvatar Sampler output: this run continues that "
                                                    "video with the next part of the speech (cut at a clip "
                                                    "boundary). Exact when that run kept its state and the model "
                                                    "stayed loaded; otherwise approximate, from its last latents."}),
            "keep_state": ("BOOLEAN", {"default": False,
                                       "tooltip": "Keep the streaming state (attention caches, in GPU memory) after "
                                                  "the run, so that a later run can continue this video exactly."}),
        }}

    def sample(self, model, positive, image, vae, audio_features, size, width, height, infer_frames, num_clip,
               sample_steps, seed, continue_from=None, keep_state=False):
        text = text_embeddings(positive, model.dit.cfg.text_len)  # input checks before the long work
        features, speech_frames = audio_features.per_frame(infer_frames)
        model.prepare()  # our DiT on the GPU via ComfyUI's model management, at this LoRA strength
        previous = (continue_from or {}).get("liveavatar", {})
        settings = StreamSettings(infer_frames=infer_frames, num_clip=num_clip, steps=sample_steps, seed=seed,
                                  kv_fp8=model.kv_fp8)
        streamer = resume(previous.get("state"), model.dit, settings, features)
        if streamer is None:
            if continue_from is not None:
                ref_latent, motion_latents = approximate_history(continue_from)
            else:
                _, ref_latent, motion_latents = portrait_latents(vae, image, size, width, height)
            inputs = StreamInputs(text, ref_latent, motion_latents, features)
            streamer = Streamer(model.dit, inputs, settings)
        latents = run_stream(streamer, keep=keep_state)
        info = {"video_frames": speech_frames, "fps": FPS, "reference": streamer.first_clean_frame.float().cpu(),
                # what the decoder is primed with: the portrait, or the end of the video this one continues
                "motion_latents": streamer.inputs.motion_latents.cpu() if continue_from is None
                else raw_to_normalised(continue_from["samples"][0, :, -PRIMING_LATENTS:].float()),
                "continues": continue_from is not None}
        if keep_state:
            info["state"] = keep(streamer)
        # ComfyUI's LATENT holds raw VAE means (its Wan latent format normalises inside the
        # model); the DiT works in normalised space, so convert at the boundary.
        return ({"samples": normalised_to_raw(latents).unsqueeze(0), "liveavatar": info},)


def portrait_latents(vae, image, size: str, width: int, height: int, notes: host.NodeNotes | None = None):
    """(engine VAE, reference latent, 19 motion latents) of the portrait IMAGE at the size the
    node's size inputs ask for (encoding shows progress and can be cancelled); what was
    adjusted in the image goes to `notes`."""
    area = width * height if size == "custom" else parse_area(size)
    vae_engine = streaming_vae(vae, host.torch_device())
    return (vae_engine, *encode_portrait(vae_engine, prepare_portrait(image_tensor(image, notes), area)))


# Streaming states kept for an exact continuation (keep_state): at most one, as it holds the
# attention caches in GPU memory; a new kept state, or a continuation, releases the old one.
_kept: dict[str, Streamer] = {}


def keep(streamer: Streamer) -> str:
    release_kept()
    token = uuid.uuid4().hex
    _kept[token] = streamer
    return token


def release_kept():
    for streamer in _kept.values():
        streamer.close()
    _kept.clear()


def resume(token, dit, settings: StreamSettings, features) -> Streamer | None:
    """The kept streamer of `token` extended with the new speech, if it can go on exactly: same
    loaded model, same clip length and steps; None otherwise (its state is then released)."""
    streamer = _kept.pop(token, None) if token else None
    release_kept()
    if streamer is None:
        return None
    same = (streamer.model is dit and streamer.settings.infer_frames == settings.infer_frames
            and streamer.settings.steps == settings.steps)
    if not same:
        streamer.close()
        return None
    streamer.extend(features, settings.num_clip)
    return streamer


def approximate_history(previous: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference and motion latents for a continuation without the kept state: the previous
    run's reference (its first generated frame, as LiveAvatar's sink refresh uses) and its
    last 19 latents as motion history, as LiveAvatar carries them between clips."""
    latents = raw_to_normalised(previous["samples"][0].float())
    reference = previous.get("liveavatar", {}).get("reference")
    if reference is None:
        reference = latents[:, :1]
    return reference, latents[:, -MOTION_LATENTS:]


def run_stream(streamer: Streamer, keep: bool = False) -> torch.Tensor:
    """The clean latent blocks a run of `streamer.blocks()` gives, concatenated in time on the
    CPU: [16, frames, h, w]. Ticks the progress bar every block-step, stops cleanly on cancel,
    frees the caches either way (unless kept for a continuation after a complete run)."""
    progress = host.Progress(streamer.total_block_steps - streamer.block_steps_done, "LiveAvatar sampling")
    preview = host.latent_previewer()
    blocks = []

    def on_step():
        host.check_interrupted()
        progress.step()

    done = False
    try:
        for block in streamer.blocks(on_step):
            blocks.append(block.latents.float().cpu())
            if preview is not None:
                progress.show(preview(block.latents))
        done = True
    finally:
        if not (keep and done):
            streamer.close()
        host.release_memory()
    return torch.cat(blocks, dim=1)
