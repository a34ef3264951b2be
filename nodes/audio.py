"""LiveAvatar audio encode node: ComfyUI AUDIO -> wav2vec2 features per video frame."""
from __future__ import annotations

from dataclasses import replace

from ..liveavatar.audio import encode_audio, load_audio

from . import host
from .stream_run import INFER_FRAMES
from .vae_adapter import audio_encoder as engine_audio_encoder


class LiveAvatarAudioEncode:
    DESCRIPTION = ("Turns speech into LiveAvatar's audio features (all wav2vec2 layers, one per 25 fps video "
                   "frame). Also tells how many clips the speech covers.")
    CATEGORY = "LiveAvatar"
    RETURN_TYPES = ("LIVEAVATAR_AUDIO", "INT", "INT")
    RETURN_NAMES = ("audio_features", "clips", "video_frames")
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "audio": ("AUDIO", {"tooltip": "Speech, e.g. from LoadAudio. Any sample rate; stereo is mixed to mono."}),
            "audio_encoder": ("AUDIO_ENCODER", {"tooltip": "AudioEncoderLoader with "
                                                           "wav2vec2_large_english_fp16.safetensors."}),
            "infer_frames": ("INT", {**INFER_FRAMES,
                                     "tooltip": "Frames per clip, as set on the sampler (only used for the clip "
                                                "count output)."}),
        }}

    def encode(self, audio, audio_encoder, infer_frames):
        notes = []
        wave = load_audio(audio, notes)  # input checks before the encoder is loaded
        host.NodeNotes().add(*notes)
        encoder = engine_audio_encoder(audio_encoder)
        # the speech itself goes along (not copied): a continued video takes the speech at the join from it
        features = replace(encode_audio(encoder, wave), speech=audio)
        _, frames = features.per_frame(infer_frames)
        return features, features.num_clips(infer_frames), frames
