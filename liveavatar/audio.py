"""Speech -> per-video-frame audio features, as LiveAvatar computes them.

The path (shapes for the real model: 25 hidden states of width 1024):
1. `load_audio`: a file or a ComfyUI AUDIO dict -> mono float32 at 16 kHz (as the
   original's `librosa.load(path, sr=16000)`: libsndfile, PyAV for what it cannot read).
2. `Wav2Vec2Encoder.hidden_states`: zero mean / unit variance (the Hugging Face feature
   extractor's rule, sqrt(var + 1e-7) so silence stays finite), then wav2vec2 (large
   xlsr-53 english, `transformers.Wav2Vec2Model`): every hidden state, embedding output
   first, the last after the final layer norm (transformers 4.x semantics, whatever
   transformers is installed) -> [layers + 1, T50, hidden] at 50 Hz.
3. `resample_to_30hz`: linear, align_corners, int(T50 / 50 * 30) steps (F.interpolate's
   float32 positions, `positions_30hz`).
4. `per_frame_features`: video frame i (25 fps) takes the 30 Hz feature nearest its time,
   index round(i * 30 / 25); frames past the speech get zeros; padded to whole clips of
   `infer_frames`, int(T30 / (infer_frames * 30 / 25)) + 1 clips as in the original
   -> [layers + 1, hidden, clips * infer_frames].

Public API:
    load_audio(path_or_comfy_audio) -> Tensor[T]                      16 kHz mono float32
    float_pcm(samples) -> float32 in [-1, 1] (int PCM by full scale, loud float by its peak)
    Wav2Vec2Encoder.load(path, device="cpu", dtype=torch.float32, config=None)
        path: the Hugging Face folder (config.json + model.safetensors / pytorch_model.bin)
        or one safetensors file (ComfyUI's wav2vec2_large_english_fp16.safetensors)
    Wav2Vec2Encoder.from_state_dict(sd, config=None, device="cpu", dtype=torch.float32)
    Wav2Vec2Encoder.sharing(named_parameters, config=None)   around another owner's weights (no
        copy), e.g. ComfyUI's AudioEncoderLoader model; fp16 on a GPU, fp32 on the CPU
    encoder.hidden_states(waveform_16k) -> Tensor[layers + 1, T50, hidden]  (fp32, CPU)
    encode_audio(encoder, waveform_16k, window_s=CHUNK_WINDOW_S, context_s=CHUNK_CONTEXT_S,
                 on_chunk=None) -> AudioFeatures      (window_s=None: one pass at any length)
    AudioFeatures.per_frame(infer_frames) -> (Tensor[layers + 1, hidden, clips * infer_frames],
                                              video frames carrying speech)
    AudioFeatures.num_clips(infer_frames) -> int
    AudioFeatures.from_hidden_states(hidden_states, num_samples)  e.g. from ComfyUI's
        AudioEncoderEncode output: torch.cat(out["encoded_audio_all_layers"]), out["audio_samples"]
    audio_coverage(num_samples, infer_frames, fps=25) -> (video frames, clips) by duration

`encode_audio` returns the 30 Hz features rather than the per-frame layout because the
clip length (`infer_frames`) is a sampler setting, chosen after the audio is encoded.

Long audio: wav2vec2's memory grows with the length it is given (its convolutions hold
512 channels at 3.2 kHz), so `encode_audio` runs clips longer than CHUNK_WINDOW_S + 2
CHUNK_CONTEXT_S seconds window by window (`hidden_state_chunks`: windows cut at the 320-sample
hop, the whole clip's normalisation, `Resampler30Hz` stitching the 30 Hz features across
windows): memory stays that of one window. wav2vec2 attends over the whole clip, so the
windowed features differ from one pass by an amount that shrinks with the context; live
streams are `audio_stream.StreamingAudioEncoder`. docs/audio.md has the measurements.
"""
from __future__ import annotations

import json
import math
import re
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .shared_weights import bind_parameters, computing_in, placement_of
from .weights import read_state_dict, safetensors_config

SAMPLE_RATE = 16000
FEATURE_RATE = 50  # wav2vec2 features per second (320-sample hop)
RESAMPLED_RATE = 30  # the original's intermediate "video_rate"
VIDEO_FPS = 25
RECEPTIVE_FIELD, HOP = 400, 320  # samples under the first wav2vec2 feature, and between features
# Two 50 Hz features are the least that give one 30 Hz feature (int(2 * 0.6) = 1), which is
# what the first video frame needs: 400 + 320 samples = 45 ms.
MIN_SAMPLES = RECEPTIVE_FIELD + HOP
NORM_EPS = 1e-7  # the Hugging Face feature extractor's variance epsilon
HEAD_WIDTH = 64  # wav2vec2 attention head width (base: 12 heads of 64, large: 16 of 64)
IGNORED_PREFIXES = ("lm_head.", "quantizer.", "project_q.", "project_hid.")  # CTC / pretraining heads
POS_CONV = "encoder.pos_conv_embed.conv."
WEIGHT_NORM_NAMES = {  # positional conv weight norm: transformers 4.x (old torch) vs 5.x / ComfyUI
    "old": (POS_CONV + "weight_g", POS_CONV + "weight_v"),
    "new": (POS_CONV + "parametrizations.weight.original0", POS_CONV + "parametrizations.weight.original1"),
}


# ---- audio input --------------------------------------------------------------------------
def load_audio(source, notes: list | None = None) -> torch.Tensor:
    """A file librosa can read, or a ComfyUI AUDIO dict {"waveform": [B, C, T], "sample_rate"}
    (first item of the batch) -> mono float32 waveform at 16 kHz [T]. What was adjusted on the
    way (a batch cut to its first item, channels that cancel in the mono mix) is appended to
    `notes` when given."""
    if isinstance(source, dict):
        return _checked(_comfy_audio_to_16k(source, notes if notes is not None else []))
    if not isinstance(source, (str, Path)):
        raise ValueError(f"audio must be a file path or a ComfyUI AUDIO dict, got {type(source).__name__}")
    return _checked(_read_audio_file(Path(source)))


def _comfy_audio_to_16k(audio: dict, notes: list) -> torch.Tensor:
    channels, rate = comfy_audio_waveform(audio, notes)
    mono, note = mono_mix(channels)  # librosa.load also averages channels first
    notes += [note] if note else []
    mono = mono.cpu().numpy()
    if rate != SAMPLE_RATE and mono.size:
        import librosa  # only to resample (16 kHz audio needs none)
        mono = librosa.resample(mono, orig_sr=rate, target_sr=SAMPLE_RATE)
    return torch.from_numpy(np.ascontiguousarray(mono, dtype=np.float32))


AUDIO_FORMAT = "a ComfyUI AUDIO is a dict with 'waveform' [batch, channels, samples] and 'sample_rate'"


def comfy_audio_waveform(audio, notes: list) -> tuple[torch.Tensor, int]:
    """A ComfyUI AUDIO checked -> (its first item as float32 PCM in [-1, 1] [channels, samples]
    (float_pcm; NaN kept for the caller to judge), sample rate). A ValueError names what is
    wrong with the audio input and what to do; a batch of several is noted, not refused.
    Zero samples pass (callers decide what no sound means)."""
    if not isinstance(audio, dict) or "waveform" not in audio or "sample_rate" not in audio:
        got = f"a dict with keys {sorted(map(str, audio))}" if isinstance(audio, dict) else type(audio).__name__
        raise ValueError(f"the audio input is not a ComfyUI AUDIO ({AUDIO_FORMAT}), got {got}: connect LoadAudio "
                         "or another node that outputs AUDIO")
    try:
        wave = torch.as_tensor(audio["waveform"]).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"the audio input's waveform is not an array of samples ({error})") from None
    if wave.dtype == torch.bool or wave.is_complex():
        raise ValueError(f"the audio input's waveform holds {wave.dtype} values; it must hold PCM samples "
                         "(float in -1..1, or integer PCM such as int16)")
    if wave.dim() != 3:
        fix = "add the batch dimension (waveform[None])" if wave.dim() == 2 else AUDIO_FORMAT
        raise ValueError(f"the audio input's waveform has shape {tuple(wave.shape)}; {AUDIO_FORMAT}: {fix}")
    if wave.shape[0] == 0 or wave.shape[1] == 0:
        raise ValueError(f"the audio input's waveform {tuple(wave.shape)} has no {'items' if wave.shape[0] == 0 else 'channels'}")
    if wave.shape[1] > MAX_CHANNELS and wave.shape[2] <= MAX_CHANNELS:
        raise ValueError(f"the audio input's waveform {tuple(wave.shape)} looks like [batch, samples, channels]; "
                         "ComfyUI AUDIO is [batch, channels, samples]: swap the last two dimensions")
    rate = audio["sample_rate"]
    try:
        rate_value = float(rate)
    except (TypeError, ValueError):
        rate_value = math.nan
    if not math.isfinite(rate_value) or rate_value < 1:
        raise ValueError(f"the audio input's sample_rate is {rate!r}; it must be a positive number of samples per "
                         "second (such as 16000, 44100 or 48000)")
    if wave.shape[0] > 1:
        notes.append(f"the audio input holds a batch of {wave.shape[0]} clips; the first is used")
    return float_pcm(wave[0]), int(round(rate_value))


MAX_CHANNELS = 8  # 7.1 surround; more "channels" than this with fewer samples is a transposed waveform
CANCELLING_MIX = 0.1  # mono mix RMS under this fraction of the loudest channel's: the channels cancel


def mono_mix(channels: torch.Tensor) -> tuple[torch.Tensor, str | None]:
    """[channels, samples] -> (mono [samples], note or None): the channels' average, as librosa
    mixes; but where that average all but cancels (one channel the other inverted, as from a
    microphone wired out of phase) the loudest channel alone, with a note saying so."""
    mix = channels.mean(0)
    if channels.shape[0] < 2 or channels.shape[1] == 0:
        return mix, None
    power = channels.double().pow(2).mean(1)
    loudest = int(power.argmax())
    if power[loudest] > 0 and mix.double().pow(2).mean() < CANCELLING_MIX ** 2 * power[loudest]:
        return channels[loudest], (f"the audio input's channels cancel out when mixed to mono (one is the other "
                                   f"inverted, as from a microphone wired out of phase): channel {loudest + 1} "
                                   "alone is used")
    return mix, None


def float_pcm(wave: torch.Tensor) -> torch.Tensor:
    """Samples of any PCM dtype -> float32 in [-1, 1]: integers by their full scale (int16
    / 32768, uint8 centred on 128), floats louder than 1.0 scaled down by their peak rather
    than clipped into a square wave. NaN stays NaN (callers decide)."""
    if wave.dtype == torch.uint8:
        return (wave.float() - 128) / 128
    if not wave.is_floating_point():
        return wave.float() / float(2 ** (torch.iinfo(wave.dtype).bits - 1))
    wave = wave.float()
    finite = wave[torch.isfinite(wave)]
    peak = float(finite.abs().max()) if finite.numel() else 0.0
    return wave / peak if peak > 1.0 else wave


def _read_audio_file(path: Path) -> torch.Tensor:
    """What the original's `librosa.load(path, sr=16000)` returns (libsndfile's float32
    samples, channels averaged, soxr_hq resampling), without librosa's deprecated audioread
    fallback: files libsndfile cannot read (m4a, aac, ...) are decoded by PyAV instead."""
    import librosa
    if not path.is_file():
        raise FileNotFoundError(f"audio file not found: {path}")
    try:
        samples, rate = _decode_audio_file(path)
    except Exception as error:  # libsndfile and FFmpeg raise many types
        raise ValueError(f"cannot decode audio file {path} ({error}); use wav, flac, mp3 or ogg") from None
    mono = samples.mean(0)
    if rate != SAMPLE_RATE and mono.size:
        import librosa  # only to resample (16 kHz audio needs none)
        mono = librosa.resample(mono, orig_sr=rate, target_sr=SAMPLE_RATE)
    return torch.from_numpy(np.ascontiguousarray(mono, dtype=np.float32))


def _decode_audio_file(path: Path) -> tuple[np.ndarray, int]:
    """[channels, samples] float32 and the file's sample rate."""
    import soundfile
    try:
        samples, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
        return samples.T, rate
    except soundfile.SoundFileRuntimeError:
        return _decode_with_av(path)


def _decode_with_av(path: Path) -> tuple[np.ndarray, int]:
    import av
    with av.open(str(path)) as container:
        if not container.streams.audio:
            raise ValueError("no audio stream")
        stream = container.streams.audio[0]
        to_float = av.AudioResampler(format="fltp")  # planar float, the file's layout and rate
        chunks = [out.to_ndarray() for frame in container.decode(stream) for out in to_float.resample(frame)]
        chunks += [out.to_ndarray() for out in to_float.resample(None)]
        return (np.concatenate(chunks, axis=1) if chunks else np.zeros((1, 0), np.float32)), stream.rate


def _checked(wave: torch.Tensor) -> torch.Tensor:
    if wave.dim() != 1:
        raise ValueError(f"the waveform must be mono [samples], got {tuple(wave.shape)}")
    if wave.numel() == 0:
        raise ValueError("the audio is empty")
    if wave.numel() < MIN_SAMPLES:
        raise ValueError(f"the audio is {wave.numel() / SAMPLE_RATE * 1000:.0f} ms long, too short to drive one video "
                         f"frame; at least {MIN_SAMPLES / SAMPLE_RATE * 1000:.0f} ms ({MIN_SAMPLES} samples at 16 kHz) "
                         "is needed")
    if not torch.isfinite(wave).all():
        raise ValueError("the audio contains NaN or infinite samples")
    return wave


def normalise(wave: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit (population) variance, as the feature extractor; silence stays zero."""
    return apply_normalisation(wave, normalisation_stats(wave))


@dataclass(frozen=True)
class NormStats:
    """x -> (x - mean) / scale, scale = sqrt(population variance + 1e-7)."""
    mean: float
    scale: float

    @classmethod
    def of_moments(cls, mean: float, variance: float) -> "NormStats":
        return cls(float(mean), math.sqrt(max(float(variance), 0.0) + NORM_EPS))


STATS_SLICE = 1 << 20  # samples per slice: the float64 copies stay at 8 MiB for any length


def normalisation_stats(wave: torch.Tensor) -> NormStats:
    """The whole waveform's mean and variance in float64, two passes over slices (so a long
    clip never gets a float64 copy)."""
    n = wave.numel()
    if n <= STATS_SLICE:  # one slice: torch's own mean and variance
        whole = wave.double()
        return NormStats.of_moments(whole.mean(), whole.var(unbiased=False))
    starts = range(0, n, STATS_SLICE)
    mean = sum(float(wave[i:i + STATS_SLICE].double().sum()) for i in starts) / n
    squares = sum(float(((wave[i:i + STATS_SLICE].double() - mean) ** 2).sum()) for i in starts)
    return NormStats.of_moments(mean, squares / n)


def apply_normalisation(wave: torch.Tensor, stats: NormStats) -> torch.Tensor:
    return ((wave.double() - stats.mean) / stats.scale).float()


# ---- wav2vec2 -----------------------------------------------------------------------------
class Wav2Vec2Encoder:
    """transformers' Wav2Vec2Model returning every hidden state: on weights it owns (`load`,
    `from_state_dict`: moved and cast here) or around another owner's (`sharing`: ComfyUI's
    audio encoder; no copy, computed in half precision on a GPU, float32 on the CPU)."""

    def __init__(self, model, device="cpu", dtype=torch.float32, owned: bool = True):
        self.model = (model.to(device=device, dtype=dtype).requires_grad_(False) if owned else model).eval()
        self.device, self.dtype, self.owned = torch.device(device), dtype, owned

    @classmethod
    def load(cls, path, device="cpu", dtype=torch.float32, config: dict | None = None) -> "Wav2Vec2Encoder":
        """The HF folder (config.json + model.safetensors or pytorch_model.bin) or a single
        safetensors file. `config` entries override the file's (e.g. num_attention_heads,
        which tensor shapes do not tell)."""
        path = Path(path)
        if path.is_dir():
            weights, file_config = _hf_folder_files(path)
        else:
            weights, file_config = path, safetensors_config(path)
        return cls.from_state_dict(read_state_dict(weights), {**(file_config or {}), **(config or {})}, device, dtype)

    @classmethod
    def from_state_dict(cls, sd: dict, config: dict | None = None, device="cpu", dtype=torch.float32):
        """Weights in Hugging Face naming, with or without `wav2vec2.`, either weight-norm
        naming; the config is inferred from shapes, then `config` entries override it."""
        model, sd = _meta_model(hf_state_dict(sd), config)
        _check_fits(sd, model.state_dict())
        model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in sd.items()}, strict=True, assign=True)
        if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
            raise ValueError("this transformers version builds wav2vec2 tensors that the checkpoint does not hold")
        return cls(model, device, dtype)

    @classmethod
    def sharing(cls, parameters: dict, config: dict | None = None) -> "Wav2Vec2Encoder":
        """Our encoder around another owner's wav2vec2 parameters (e.g. ComfyUI's
        AudioEncoderLoader model, whose names are Hugging Face's), the very tensors. They must
        be on one device; it computes there in float16 on a GPU, float32 on the CPU, casting
        one layer's weights at a time when they are stored otherwise."""
        model, parameters = _meta_model(hf_state_dict(dict(parameters)), config)
        bind_parameters(model, parameters, "wav2vec2")
        device, _ = placement_of(model, "audio encoder")
        return cls(model, device, torch.float16 if device.type == "cuda" else torch.float32, owned=False)

    def hidden_states(self, waveform_16k: torch.Tensor) -> torch.Tensor:
        """[T] mono 16 kHz samples (raw; normalised here) -> [layers + 1, T50, hidden] fp32 CPU."""
        return self.run(normalise(_checked(torch.as_tensor(waveform_16k).float().cpu())))

    def run(self, normalised: torch.Tensor, stream: "torch.cuda.Stream | None" = None) -> torch.Tensor:
        """[T] normalised samples (T >= 400) -> [layers + 1, feature_count(T), hidden] fp32 CPU.
        `stream`: a CUDA stream of its own to run on (the caller knows the weights are ready for
        it): reading the result back then waits for this run only, not for work queued before it
        on the current stream (a live session's DiT tick)."""
        with torch.no_grad(), (nullcontext() if self.owned else computing_in(self.model, self.dtype)), \
                (torch.cuda.stream(stream) if stream is not None else nullcontext()):
            out = self.model(normalised[None].to(self.device, self.dtype), output_hidden_states=True)
            # The last state is taken after the encoder's final layer norm, as transformers 4.x
            # (the original pins <= 4.51.3) and ComfyUI return it; transformers 5 puts the
            # state before that norm in hidden_states[-1], so it comes from last_hidden_state.
            states = (*out.hidden_states[:-1], out.last_hidden_state)
            return torch.cat(states).float().cpu()


def _meta_model(sd: dict, config: dict | None):
    """(Wav2Vec2Model on the meta device for these weights, the weights under its names)."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model
    settings = {**infer_config(sd), **(config or {}), "apply_spec_augment": False, "layerdrop": 0.0}
    try:
        with torch.device("meta"):  # no random init: every tensor comes from sd
            model = Wav2Vec2Model(Wav2Vec2Config(**settings))
    except Exception as error:
        raise ValueError(f"invalid wav2vec2 config ({error})") from None
    expected = model.state_dict()
    sd = _rename_weight_norm(sd, expected)
    if "masked_spec_embed" in expected and "masked_spec_embed" not in sd:  # training-time masking only
        like = next(iter(sd.values()))
        sd["masked_spec_embed"] = torch.zeros(expected["masked_spec_embed"].shape, device=like.device, dtype=like.dtype)
    return model, sd


def _hf_folder_files(folder: Path) -> tuple[Path, dict | None]:
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text()) if config_file.exists() else None
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name, config
    found = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not found:
        raise FileNotFoundError(f"no wav2vec2 weights (model.safetensors or pytorch_model.bin) in {folder}")
    return found[0], config


def hf_state_dict(sd: dict) -> dict:
    """Any wav2vec2 checkpoint layout -> Wav2Vec2Model names: drop the ForCTC `wav2vec2.`
    prefix and the heads (lm_head, pretraining quantizer). ComfyUI's repackaged file uses
    these same names (its comfy/audio_encoders/wav2vec2.py mirrors them), with or without
    the prefix; its positional conv weight norm is stored either way (see WEIGHT_NORM_NAMES)."""
    if any(k.startswith("model.encoder.embed_positions") for k in sd):
        raise ValueError("this is a Whisper audio encoder; LiveAvatar needs wav2vec2 "
                         "(wav2vec2_large_english_fp16.safetensors or the wav2vec2-large-xlsr-53-english folder)")
    out = {}
    for key, value in sd.items():
        key = key[len("wav2vec2."):] if key.startswith("wav2vec2.") else key
        if not key.startswith(IGNORED_PREFIXES):
            out[key] = value
    required = ("feature_extractor.conv_layers.0.conv.weight", "encoder.layer_norm.weight",
                "encoder.layers.0.feed_forward.intermediate_dense.weight")
    if not all(k in out for k in required) or not any(k.startswith(POS_CONV) for k in out):
        raise ValueError("not a wav2vec2 checkpoint (no feature_extractor / encoder weights); use "
                         "wav2vec2_large_english_fp16.safetensors or the wav2vec2-large-xlsr-53-english folder")
    return out


def _rename_weight_norm(sd: dict, expected: dict) -> dict:
    """Store the positional conv weight norm under the names this transformers/torch uses."""
    wanted = "new" if WEIGHT_NORM_NAMES["new"][0] in expected else "old"
    other = "old" if wanted == "new" else "new"
    sd = dict(sd)
    for src, dst in zip(WEIGHT_NORM_NAMES[other], WEIGHT_NORM_NAMES[wanted]):
        if src in sd:
            sd[dst] = sd.pop(src)
    return sd


def _check_fits(sd: dict, expected: dict):
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = [f"{k}: {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    if missing or unexpected or wrong:
        raise ValueError(f"the wav2vec2 weights do not fit the config: missing {missing[:4]}, unexpected "
                         f"{unexpected[:4]}, wrong shapes {wrong[:4]}")


def infer_config(sd: dict) -> dict:
    """Wav2Vec2Config entries from tensor shapes (HF names, as hf_state_dict returns), the way
    ComfyUI tells base from large: layer-normed convs mean the large, stable-layer-norm
    family. Head count is not in the shapes: 64-wide heads, as every wav2vec2 release."""
    hidden = sd["encoder.layer_norm.weight"].shape[0]
    convs = _indices(sd, r"feature_extractor\.conv_layers\.(\d+)\.conv\.weight")
    conv_weights = [sd[f"feature_extractor.conv_layers.{i}.conv.weight"] for i in convs]  # [out, in, kernel]
    pos_conv = sd.get(WEIGHT_NORM_NAMES["new"][1], sd.get(WEIGHT_NORM_NAMES["old"][1]))  # [hidden, hidden/groups, K]
    if pos_conv is None:
        raise ValueError("not a wav2vec2 checkpoint: no positional convolution weights")
    layer_norm_convs = "feature_extractor.conv_layers.1.layer_norm.weight" in sd
    kernels = [w.shape[-1] for w in conv_weights]
    return dict(
        hidden_size=hidden, num_hidden_layers=len(_indices(sd, r"encoder\.layers\.(\d+)\.")),
        num_attention_heads=max(1, hidden // HEAD_WIDTH),
        intermediate_size=sd["encoder.layers.0.feed_forward.intermediate_dense.weight"].shape[0],
        conv_dim=[w.shape[0] for w in conv_weights], conv_kernel=kernels,
        conv_stride=[5 if k == 10 else 2 for k in kernels],  # wav2vec2's fixed feature encoder: 10/5, then /2
        conv_bias="feature_extractor.conv_layers.0.conv.bias" in sd,
        feat_extract_norm="layer" if layer_norm_convs else "group", do_stable_layer_norm=layer_norm_convs,
        num_conv_pos_embeddings=pos_conv.shape[-1], num_conv_pos_embedding_groups=hidden // pos_conv.shape[1],
        feat_extract_activation="gelu", hidden_act="gelu")


def _indices(sd: dict, pattern: str) -> list[int]:
    return sorted({int(m.group(1)) for k in sd if (m := re.match(pattern, k))})


# ---- 50 Hz -> 30 Hz -------------------------------------------------------------------------
def feature_count(num_samples: int) -> int:
    """wav2vec2's 50 Hz features for `num_samples` samples: one per 320-sample hop whose
    400-sample receptive field fits (feature k sees samples [320 k, 320 k + 400))."""
    return (num_samples - RECEPTIVE_FIELD) // HOP + 1 if num_samples >= RECEPTIVE_FIELD else 0


def count_30hz(t50: int) -> int:
    """The original's 30 Hz length, int(T50 / 50 * 30), in its float arithmetic."""
    return int(t50 / FEATURE_RATE * RESAMPLED_RATE)


NATURAL_STEP = FEATURE_RATE / RESAMPLED_RATE  # 5/3: the 30 Hz grid of a clip of unknown length


def positions_30hz(indices: np.ndarray, t50: int | None) -> np.ndarray:
    """50 Hz positions of the 30 Hz features `indices`. For a clip of T50 frames, the
    original's (F.interpolate, linear, align_corners, over the whole clip), in its float32
    arithmetic: j * float32((T50 - 1) / (T30 - 1)), a step stretched from 5/3 so the last 30 Hz
    feature lands on the last 50 Hz frame, which depends on the clip's length. With t50=None
    (a stream of unknown length), j * 5/3."""
    if t50 is None:
        return np.asarray(indices, dtype=np.float64) * NATURAL_STEP
    t30 = count_30hz(t50)
    step = np.float32(t50 - 1) / np.float32(t30 - 1) if t30 > 1 else np.float32(0)
    return (step * np.asarray(indices, dtype=np.float32)).astype(np.float64)


def lerp_frames(states: torch.Tensor, positions: np.ndarray, first: int, last: int) -> torch.Tensor:
    """[layers, n, C] 50 Hz frames first .. first + n - 1 -> [layers, len(positions), C] at
    the 50 Hz `positions`, linear between neighbours, the right one clamped at frame `last`
    (the clip's last frame, as F.interpolate clamps)."""
    left = np.floor(positions).astype(np.int64)
    right = np.minimum(left + 1, last)
    weight = torch.from_numpy(positions - left).to(states.dtype)[None, :, None]
    return states[:, left - first] * (1 - weight) + states[:, right - first] * weight


class Resampler30Hz:
    """A clip's 50 Hz hidden states, given in consecutive pieces, -> its 30 Hz features on
    the original's grid (`positions_30hz`); each 30 Hz feature is written once both its 50 Hz
    neighbours have arrived, so only one 50 Hz frame is kept between pieces."""

    def __init__(self, t50: int):
        t30 = count_30hz(t50)
        if t30 == 0:
            raise ValueError(f"{t50} wav2vec2 frame(s) are too few for one video frame; "
                             f"the audio must be at least {MIN_SAMPLES / SAMPLE_RATE * 1000:.0f} ms long")
        self.t50, self.positions = t50, positions_30hz(np.arange(t30), t50)
        self.right = np.minimum(np.floor(self.positions).astype(np.int64) + 1, t50 - 1)  # non-decreasing
        self.out, self.done, self.carry = None, 0, None

    def add(self, first: int, states: torch.Tensor):
        """50 Hz frames first .. first + n - 1 ([layers, n, C]), following the last piece."""
        if self.out is None:
            self.out = states.new_empty(states.shape[0], len(self.positions), states.shape[2])
        if self.carry is not None:
            states, first = torch.cat([self.carry, states], dim=1), first - 1
        stop = int(np.searchsorted(self.right, first + states.shape[1]))  # both neighbours in
        self.out[:, self.done:stop] = lerp_frames(states, self.positions[self.done:stop], first, self.t50 - 1)
        self.done, self.carry = stop, states[:, -1:].clone()

    def result(self) -> torch.Tensor:
        if self.out is None or self.done < len(self.positions):
            raise RuntimeError("the 50 Hz hidden states given do not cover the clip")
        return self.out


def resample_to_30hz(hidden_states: torch.Tensor) -> torch.Tensor:
    """[layers, T50, C] -> [layers, int(T50 / 50 * 30), C], linear, align_corners (the same
    values as F.interpolate up to float rounding)."""
    resampler = Resampler30Hz(hidden_states.shape[1])
    resampler.add(0, hidden_states.float())
    return resampler.result()


# ---- features per video frame ---------------------------------------------------------------
def num_clips_for(t30: int, infer_frames: int, fps: int = VIDEO_FPS) -> int:
    """The original's clip count for T30 features: int(T30 / (infer_frames * 30 / fps)) + 1
    (one more than whole clips, so a clip boundary at the very end adds an empty clip)."""
    return int(t30 / (infer_frames * RESAMPLED_RATE / fps)) + 1


def per_frame_features(features_30hz: torch.Tensor, infer_frames: int, fps: int = VIDEO_FPS):
    """[layers, T30, C] -> ([layers, C, clips * infer_frames], video frames carrying speech):
    frame i at time i / fps takes 30 Hz feature round(i / fps * 30); past T30, zeros."""
    if int(infer_frames) != infer_frames or infer_frames <= 0:
        raise ValueError(f"infer_frames must be a positive whole number of video frames, got {infer_frames}")
    layers, t30, channels = features_30hz.shape
    frames = num_clips_for(t30, infer_frames, fps) * infer_frames
    times = np.linspace(0, frames / fps, frames, endpoint=False)  # seconds, as the original samples them
    index = np.round(times * RESAMPLED_RATE).astype(np.int64)
    covered = int((index < t30).sum())  # indices grow with i: the covered frames come first
    out = features_30hz.new_zeros(layers, channels, frames)
    out[:, :, :covered] = features_30hz[:, torch.from_numpy(index[:covered])].transpose(1, 2)
    return out, covered


def audio_coverage(num_samples: int, infer_frames: int, fps: int = VIDEO_FPS) -> tuple[int, int]:
    """(video frames, clips) the audio's duration spans: frames = ceil(duration * fps), the
    frames that start before the audio ends; clips = ceil(frames / infer_frames). By duration
    only: the features' own count (per_frame_features) is int(T30 / (1.2 infer_frames)) + 1
    clips with `covered` <= frames frames of speech."""
    frames = math.ceil(num_samples * fps / SAMPLE_RATE)
    return frames, math.ceil(frames / infer_frames)


@dataclass
class AudioFeatures:
    """What flows from the audio encoder to the sampler: all wav2vec2 layers at 30 Hz, laid
    out per video frame on demand (the padding depends on the clip length); optionally the
    speech they were encoded from, as given (not copied), from which a continued video takes
    the speech at the join."""

    features_30hz: torch.Tensor  # [layers + 1, T30, hidden], fp32, CPU
    num_samples: int  # of the 16 kHz waveform
    speech: dict | None = None  # {"waveform": [batch, channels, samples], "sample_rate"} as given

    @classmethod
    def from_hidden_states(cls, hidden_states: torch.Tensor, num_samples: int) -> "AudioFeatures":
        """All hidden states at 50 Hz [layers + 1, T50, hidden] (ours or ComfyUI's
        torch.cat(encoded_audio_all_layers) for a batch of one)."""
        if hidden_states.dim() != 3:
            raise ValueError(f"hidden states must be [layers + 1, frames, hidden], got {tuple(hidden_states.shape)}")
        return cls(resample_to_30hz(hidden_states.float().cpu()), int(num_samples))

    def per_frame(self, infer_frames: int, fps: int = VIDEO_FPS) -> tuple[torch.Tensor, int]:
        """([layers + 1, hidden, clips * infer_frames], video frames carrying speech)."""
        return per_frame_features(self.features_30hz, infer_frames, fps)

    def num_clips(self, infer_frames: int, fps: int = VIDEO_FPS) -> int:
        return num_clips_for(self.features_30hz.shape[1], infer_frames, fps)


# ---- encoding in bounded memory ---------------------------------------------------------------
# wav2vec2 attends over the whole clip, so a window's features differ from the one-pass ones;
# the difference shrinks with the context each side (see docs/audio.md for the measurements).
CHUNK_WINDOW_S = 30.0  # seconds of features kept per window
CHUNK_CONTEXT_S = 4.0  # seconds of audio each side of them


def chunk_windows(t50: int, window: int, context: int) -> list[tuple[int, int, int, int]]:
    """(lo, start, stop, hi) in 50 Hz frames: features start .. stop - 1 are kept from a
    run over frames lo .. hi - 1 (the context clipped at the clip's ends)."""
    return [(max(0, a - context), a, min(a + window, t50), min(t50, a + window + context))
            for a in range(0, t50, window)]


def hidden_state_chunks(encoder: Wav2Vec2Encoder, wave: torch.Tensor, window_s: float, context_s: float,
                        stats: NormStats | None = None, on_chunk=None):
    """Yield (first frame, [layers + 1, n, hidden]) for consecutive pieces of the clip's 50 Hz
    hidden states, each from a run over `window_s` + 2 `context_s` seconds of audio cut at a
    320-sample hop, so a piece's frames are the one-pass frames' positions exactly. The
    waveform is normalised with the whole clip's statistics (`stats`, by default computed
    here), as the one-pass path. `on_chunk(done, total)` after each window."""
    window, context = max(1, round(window_s * FEATURE_RATE)), max(0, round(context_s * FEATURE_RATE))
    stats = stats or normalisation_stats(wave)
    windows = chunk_windows(feature_count(wave.numel()), window, context)
    for done, (lo, start, stop, hi) in enumerate(windows, 1):
        segment = wave[HOP * lo:HOP * (hi - 1) + RECEPTIVE_FIELD]
        states = encoder.run(apply_normalisation(segment, stats))
        if states.shape[1] != hi - lo:
            raise RuntimeError(f"wav2vec2 gave {states.shape[1]} frames for {segment.numel()} samples, "
                               f"expected {hi - lo}")
        yield start, states[:, start - lo:stop - lo]
        if on_chunk is not None:
            on_chunk(done, len(windows))


def encode_audio(encoder: Wav2Vec2Encoder, waveform_16k: torch.Tensor, window_s: float | None = CHUNK_WINDOW_S,
                 context_s: float = CHUNK_CONTEXT_S, on_chunk=None) -> AudioFeatures:
    """16 kHz mono waveform -> all layers at 30 Hz (see AudioFeatures.per_frame). A clip
    longer than one window plus its context runs window by window (memory bounded by
    `window_s + 2 context_s` seconds of audio, whatever the length); shorter clips, or
    `window_s=None`, run in one pass."""
    wave = _checked(torch.as_tensor(waveform_16k).float().cpu())
    t50 = feature_count(wave.numel())
    if window_s is None or t50 <= round((window_s + 2 * context_s) * FEATURE_RATE):
        return AudioFeatures.from_hidden_states(encoder.hidden_states(wave), wave.numel())
    resampler = Resampler30Hz(t50)
    for first, states in hidden_state_chunks(encoder, wave, window_s, context_s, on_chunk=on_chunk):
        resampler.add(first, states)
    return AudioFeatures(resampler.result(), wave.numel())
