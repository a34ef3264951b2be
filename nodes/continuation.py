"""Continuing a video across runs: what an exact continuation needs, who keeps it, what is
checked before it is used, and the speech at the join.

A run with keep_state leaves its Streamer (attention caches, sinks, clip index, noise and
rolling-offset draws) in the KeptStreams of the loaded model that made it; its LATENT carries a
StreamHandle: a key to that state and what the state was made from (StreamKey). The state goes
when that LATENT is dropped (ComfyUI's cache no longer holds it), when a continuation uses it
(the stream moves on), when ComfyUI unloads the model (free memory), or with the model.

A continuation runs exactly only when the handle's state is still there, the same loaded model
runs it, and LoRA strength, prompt, portrait, size, clip length, steps and audio features all
match; otherwise it runs the approximate continuation (from the LATENT's last latents) and
says why. A state that did not match stays kept for a later run that does.

Speech at the join: a first part's video lacks its first 3 generated frames (LiveAvatar's
decode drops them), so it ends 3 frames (0.12 s) before its last clip, where the next part's
speech starts. Those 0.12 s of speech are carried in the LATENT (`speech_after_video`) and
played before the next part's speech (`lead_in_audio`), as one run over the whole speech plays
them.
"""
from __future__ import annotations

import hashlib
import uuid
import weakref
from dataclasses import dataclass, fields

import torch

from ..liveavatar.audio import float_pcm
from ..liveavatar.decoding import DROPPED_FIRST_FRAMES
from ..liveavatar.vae import LATENT_CHANNELS

SAMPLES = "samples"
INFO = "liveavatar"  # the LATENT's key for what LiveAvatar adds to it
EXACT, APPROXIMATE = "exact", "approximate"


def digest(tensor: torch.Tensor) -> str:
    """A short fingerprint of a tensor's values (prompt embeddings, portrait pixels)."""
    data = tensor.detach().float().cpu().contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


@dataclass(frozen=True)
class StreamKey:
    """What a streaming state was made from: an exact continuation needs all of it unchanged."""

    lora_strength: float | None
    prompt: str  # digest of the text embeddings
    portrait: str  # digest of the portrait image
    size: tuple  # (width, height) of the video
    infer_frames: int
    steps: int
    audio: tuple  # audio features (layers, width): which encoder made them

    LABELS = {"lora_strength": "LoRA strength", "prompt": "prompt", "portrait": "portrait image", "size": "size",
              "infer_frames": "infer_frames", "steps": "sample_steps", "audio": "audio features (encoder)"}
    HIDDEN = ("prompt", "portrait")  # digests: saying that they changed is enough

    def differences(self, now: "StreamKey") -> list[str]:
        out = []
        for f in fields(self):
            before, after = getattr(self, f.name), getattr(now, f.name)
            if before != after:
                label = self.LABELS[f.name]
                out.append(label if f.name in self.HIDDEN else f"{label} ({_show(before)} -> {_show(after)})")
        return out


def _show(value) -> str:
    if isinstance(value, tuple):
        return "x".join(map(str, value))
    return str(value)


class KeptStreams:
    """The streaming states one loaded model keeps for exact continuations (they hold its
    attention caches in GPU memory), by token; and why a token's state is gone."""

    def __init__(self):
        self._states: dict = {}
        self._gone: dict[str, str] = {}

    def keep(self, streamer, key: StreamKey) -> "StreamHandle":
        token = uuid.uuid4().hex
        self._states[token] = streamer
        return StreamHandle(self, token, key)

    def take(self, handle: "StreamHandle", key: StreamKey):
        """(the kept streamer, "") if the state of `handle` can continue exactly with what `key`
        describes, taken out (the continuation moves it on); else (None, why not)."""
        owner = handle.owner()
        if owner is None:
            return None, "the model that made it was unloaded or reloaded since"
        if owner is not self:
            return None, "another model (or another load of it) is connected now"
        if handle.token not in self._states:
            return None, self._gone.get(handle.token, "its kept state is gone")
        changes = handle.key.differences(key)
        if changes:
            return None, "changed since: " + ", ".join(changes)
        self._gone[handle.token] = "an earlier continuation used it (a continuation moves the stream on)"
        return self._states.pop(handle.token), ""

    def discard(self, token: str, why: str):
        streamer = self._states.pop(token, None)
        if streamer is not None:
            streamer.close()
            self._gone[token] = why

    def forget(self, token: str):
        """Its handle is gone (the LATENT was dropped): nobody can ask for it any more."""
        self.discard(token, "")
        self._gone.pop(token, None)

    def release_all(self, why: str):
        for token in list(self._states):
            self.discard(token, why)

    def __len__(self):
        return len(self._states)


class StreamHandle:
    """What a LATENT carries of a kept state: which model keeps it (weakly), its token and its
    StreamKey. When the last reference to the handle goes (ComfyUI drops the LATENT), the
    state is released. Copies of the LATENT share the handle."""

    def __init__(self, owner: KeptStreams, token: str, key: StreamKey):
        self.owner = weakref.ref(owner)
        self.token, self.key = token, key
        weakref.finalize(self, _forget, self.owner, token)

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    def __repr__(self):
        return f"LiveAvatar kept state ({self.token[:8]})"


def _forget(owner_ref, token):
    owner = owner_ref()
    if owner is not None:
        owner.forget(token)


# ---- the LATENT a continuation continues ------------------------------------------------------
def previous_part(latent) -> dict | None:
    """The `continue_from` LATENT's LiveAvatar information, with its samples, or None when
    nothing is connected; a ValueError naming the input for anything LiveAvatar did not make."""
    if latent is None:
        return None
    samples = latent.get(SAMPLES) if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor):
        raise ValueError(f"continue_from must be a LATENT, got {type(latent).__name__}")
    shape = tuple(samples.shape)
    if samples.dim() != 5 or shape[:2] != (1, LATENT_CHANNELS):
        raise ValueError(f"continue_from has latents of shape {shape}; it must be Wan video latents [1, "
                         f"{LATENT_CHANNELS}, frames, h, w] from LiveAvatar Sampler or Live Video (an image LATENT "
                         "from VAEEncode or EmptyLatentImage cannot be continued)")
    if 0 in shape:
        raise ValueError(f"continue_from is empty (latents {shape}): connect the LATENT of a LiveAvatar run that "
                         "generated frames")
    info = latent.get(INFO)
    if not isinstance(info, dict) or "fps" not in info:
        raise ValueError("continue_from is not a LATENT from LiveAvatar Sampler or Live Video (it carries no "
                         "LiveAvatar information): connect the 'latents' output of the run to continue")
    return {**info, SAMPLES: samples}


# ---- the speech at the join ------------------------------------------------------------------
def speech_after_video(speech: dict | None, generated_frames: int, fps: int) -> dict | None:
    """The part's speech under its last DROPPED_FIRST_FRAMES generated frames (past the end of
    its video; silence where the speech is shorter), as an AUDIO of its own (copied: the
    LATENT must not keep the whole waveform alive), or None without the speech."""
    if speech is None:
        return None
    wave, rate = torch.as_tensor(speech["waveform"])[:1], int(speech["sample_rate"])
    start = round((generated_frames - DROPPED_FIRST_FRAMES) * rate / fps)
    stop = round(generated_frames * rate / fps)
    tail = wave.new_zeros(*wave.shape[:2], stop - start)
    have = wave[..., start:stop]
    tail[..., :have.shape[-1]] = have
    return {"waveform": tail, "sample_rate": rate}


def with_lead_in(audio: dict | None, lead_in: dict | None, fps: int) -> tuple[dict | None, list[str]]:
    """The AUDIO to mux with a continued part: the previous part's last speech (lead_in), then
    this part's speech, at this part's rate and channels. Without the lead-in, silence of the
    same length keeps the speech in sync. Returns (audio, notes for the user)."""
    try:
        wave, rate = _float(torch.as_tensor(audio["waveform"])[:1]), int(audio["sample_rate"])
    except (KeyError, TypeError, ValueError, IndexError):  # no AUDIO: the muxer says what it is
        return audio, []
    if wave.dim() != 3 or rate <= 0:
        return audio, []
    notes = []
    if lead_in is None:
        lead = wave.new_zeros(*wave.shape[:2], round(DROPPED_FIRST_FRAMES * rate / fps))
        notes.append(f"the speech before this part ({DROPPED_FIRST_FRAMES / fps:.2f} s, the end of the part it "
                     "continues) is not known (that part's audio features carry no speech): silence there")
    else:
        lead = _matched(_float(torch.as_tensor(lead_in["waveform"])[:1]), int(lead_in["sample_rate"]), rate,
                        wave.shape[1])
    return {"waveform": torch.cat([lead.to(wave), wave], dim=-1), "sample_rate": rate}, notes


def _float(wave: torch.Tensor) -> torch.Tensor:
    return wave.float() if wave.is_floating_point() else float_pcm(wave)


def _matched(wave: torch.Tensor, rate: int, to_rate: int, channels: int) -> torch.Tensor:
    """[1, C, n] at `rate` -> [1, channels, n'] at `to_rate`."""
    if rate != to_rate:
        import librosa
        resampled = librosa.resample(wave[0].numpy(), orig_sr=rate, target_sr=to_rate)
        wave = torch.from_numpy(resampled).float()[None]
    if wave.shape[1] != channels:
        wave = wave.mean(dim=1, keepdim=True).expand(-1, channels, -1)
    return wave
