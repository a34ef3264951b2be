"""LiveAvatar Live Session node: talk to the avatar. Once queued, it takes its speech from the
page that queued it (the microphone, or an audio file played in real time: web/js/session.js)
instead of an AUDIO input, and streams the video back to the player on the node as it is
spoken, until the page stops it (or goes quiet, or max_seconds, or cancel). The whole session,
with the speech that drove it, is the mp4 it returns the path of."""
from __future__ import annotations

import math

from ..liveavatar.live_audio import IDLE_MODES, Pacing

from . import host
from .live import LiveView
from .live_session import LivePcm, LiveSession
from .sampler import LiveAvatarSampler
from .session_route import ROUTE, registry_of
from .stream_run import StreamRun, portrait_memo
from .vae_adapter import audio_encoder as engine_audio_encoder, audio_encoder_layout, audio_encoder_patcher

SESSION_EVENT = "liveavatar.session"  # websocket messages web/js/session.js listens to
LABEL = "LiveAvatar Live Session"
IDLE = dict(zip(["keep moving on silence", "pause until speech"], IDLE_MODES))
LOOKAHEAD = {"default": 0.5, "min": 0.25, "max": 2.0, "step": 0.05}


class LiveAvatarSession:
    DESCRIPTION = ("Talk to the avatar: once queued, press Start on this node and speak (or pick an audio file to "
                   "play in real time); the video answers on the node's player as you speak. Stop (or cancel, or "
                   "closing the page) ends the session; the whole session, video with your speech, is saved to the "
                   "output folder.")
    CATEGORY = "LiveAvatar"
    RETURN_TYPES = ("STRING", "INT")
    RETURN_NAMES = ("video_path", "frames")
    FUNCTION = "run_session"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        sampler = LiveAvatarSampler.INPUT_TYPES()["required"]
        size, size_options = sampler["size"]
        return {"required": {
            **{name: sampler[name] for name in ("model", "positive", "image", "vae")},
            "audio_encoder": ("AUDIO_ENCODER", {"tooltip": "AudioEncoderLoader with wav2vec2_large_english_fp16"
                                                           ".safetensors: turns the speech into features as it comes."}),
            "size": (size, {**size_options, "default": "384*256"}),
            "width": ("INT", {**sampler["width"][1], "default": 384}),
            "height": ("INT", {**sampler["height"][1], "default": 256}),
            **{name: sampler[name] for name in ("infer_frames", "sample_steps", "seed")},
            "max_seconds": ("INT", {"default": 600, "min": 5, "max": 7200, "step": 5,
                                    "tooltip": "The session ends after this many seconds of speech and silence."}),
            "idle": (list(IDLE), {"default": "keep moving on silence",
                                  "tooltip": "When the speech comes late (nobody speaks, the page is slow): keep "
                                             "generating on silence (the avatar idles, latency stays low), or pause "
                                             "the video until speech comes."}),
            "filename_prefix": ("STRING", {"default": "LiveAvatar_session",
                                           "tooltip": "The session's mp4 (video with the speech) in the output "
                                                      "folder."}),
        }, "optional": {
            "lookahead_s": ("FLOAT", {**LOOKAHEAD,
                                      "tooltip": "Speech each block's audio features wait for after the block (wav2vec2 "
                                                 "hears a little of what follows): less is faster to answer, more is "
                                                 "closer to the offline features."}),
            "late_audio_s": ("FLOAT", {"default": 1.0, "min": 0.1, "max": 10.0, "step": 0.1,
                                       "tooltip": "Speech this late is replaced by silence (idle: keep moving)."}),
            "disconnect_s": ("FLOAT", {"default": 5.0, "min": 1.0, "max": 120.0, "step": 0.5,
                                       "tooltip": "No audio from the page for this long ends the session (tab "
                                                  "closed, connection lost)."}),
        }}

    @classmethod
    def IS_CHANGED(cls, **_):
        return float("nan")  # a session is never a cached result: every queue is a new conversation

    def run_session(self, model, positive, image, vae, audio_encoder, size, width, height, infer_frames, sample_steps,
                    seed, max_seconds, idle, filename_prefix, lookahead_s=0.5, late_audio_s=1.0, disconnect_s=5.0):
        # Everything that can be refused is refused before any long work.
        pacing = session_pacing(idle, max_seconds, late_audio_s, disconnect_s)
        check_lookahead(lookahead_s)
        check_audio_encoder(audio_encoder, model.dit.cfg)
        run = StreamRun(LABEL, model, positive, image, vae, None, size, width, height, infer_frames, 0, sample_steps,
                        seed, live=True, portraits=portrait_memo(self))
        path = host.save_path(filename_prefix, "mp4")
        registry = registry_of(host.prompt_server())
        if registry is None:
            raise RuntimeError(f"{LABEL} takes its speech from the ComfyUI page, through ComfyUI's server: run it "
                               "inside ComfyUI (from Python, drive nodes.live_session.LiveSession directly)")
        if host.client_id() is None:
            raise ValueError(f"{LABEL} needs the page that queued it (only that page is given the session's token), "
                             "and this prompt came without a client id: queue it from the ComfyUI page")
        ticket = registry.open(model.weights, LABEL)
        try:
            pcm = LivePcm()
            view = LiveView(host.executing_node_id(), path, pcm, event=SESSION_EVENT,
                            details={"session": {"id": ticket.id, "state": "starting"}})
            with view.reporting():
                run.start(decode=True, also=[audio_encoder_patcher(audio_encoder)])
                session = LiveSession(run, engine_audio_encoder(audio_encoder), ticket.intake, view, pcm, pacing,
                                      lookahead_s, ticket.id)
                host.send_to_client(SESSION_EVENT, ready_message(view.node_id, ticket, pacing))
                session.run()
        finally:
            registry.close(ticket, "the session ended")
        run.notes.add(session.summary())
        return {"ui": {"live_video": [view.file_info()], "text": [str(path), *run.notes.lines]},
                "result": (str(path), view.frames)}


def ready_message(node_id, ticket, pacing: Pacing) -> dict:
    """What the page needs to send its speech: where, the token, the format and the limits."""
    base = ROUTE.format(session=ticket.id)
    limits = ticket.intake.limits
    return {"node": node_id, "ready": {
        "session": ticket.id, "token": ticket.token, "audio_url": base + "/audio", "stop_url": base + "/stop",
        "sample_rate": 16000, "format": "s16le", "max_chunk_s": limits.max_chunk_s, "max_seconds": pacing.max_seconds,
        "disconnect_s": pacing.disconnect_s}}


def session_pacing(idle, max_seconds, late_audio_s, disconnect_s) -> Pacing:
    if idle not in IDLE:
        raise ValueError(f"idle must be one of {list(IDLE)}, got {idle!r}")
    if isinstance(max_seconds, bool) or not isinstance(max_seconds, (int, float)) or not 0 < max_seconds < math.inf:
        raise ValueError(f"max_seconds must be a number of seconds > 0, got {max_seconds!r}")
    return Pacing(late_s=late_audio_s, idle=IDLE[idle], disconnect_s=disconnect_s, max_seconds=float(max_seconds))


def check_lookahead(lookahead_s):
    low, high = LOOKAHEAD["min"], LOOKAHEAD["max"]
    if isinstance(lookahead_s, bool) or not isinstance(lookahead_s, (int, float)) or not low <= lookahead_s <= high:
        # below 0.25 s the mp4's sound would be written before the speech it holds has come
        raise ValueError(f"lookahead_s must be from {low} to {high} s, got {lookahead_s!r}")


def check_audio_encoder(encoder, cfg):
    layers, width = audio_encoder_layout(encoder)
    if (layers, width) != (cfg.audio_layers, cfg.audio_dim):
        raise ValueError(f"the audio encoder gives {layers} hidden states of width {width}, but this model takes "
                         f"{cfg.audio_layers} of width {cfg.audio_dim}: pick wav2vec2_large_english_fp16.safetensors "
                         "in AudioEncoderLoader")
