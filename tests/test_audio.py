"""wav2vec2 audio features against the original's fixtures; file layouts; input handling.

Everything about the model (config, clip length, tolerance) comes from each fixture set's
audio.json, so the same tests run on every set.

The last hidden state is taken after the encoder's final layer norm, as the original
(transformers <= 4.51.3) and ComfyUI do, on any transformers version."""
import json
from functools import lru_cache

import numpy as np
import pytest
import soundfile
import torch
from safetensors.torch import save_file

from conftest import fixture_sets, load_manifest, load_tensors, relative_l2
from liveavatar import audio as A

SETS = fixture_sets("audio")
# Rounding the weights to fp16 moves the outputs by ~1e-3 relative; well under this bound,
# far above what a wrong key mapping gives (order 1).
FP16_WEIGHTS_BOUND = 2e-2


@lru_cache(maxsize=None)
def manifest(set_dir):
    return load_manifest(set_dir, "audio")


def tolerance(set_dir):
    return manifest(set_dir)["tolerance"]["relative_l2"]


def weights(set_dir):
    return load_tensors(set_dir, "audio", prefix="weights.")


def outputs(set_dir):
    return load_tensors(set_dir, "audio", prefix="outputs.")


def waveform(set_dir):
    return load_tensors(set_dir, "audio", prefix="inputs.")["waveform_16k"]


def expected_hidden_states(set_dir) -> torch.Tensor:
    """The fixture's 50 Hz hidden states; the last one is after the final layer norm (made
    with transformers 4.51.3, as the original computes it)."""
    return outputs(set_dir)["hidden_states_50hz"]


def expected_per_frame(set_dir) -> torch.Tensor:
    return outputs(set_dir)["per_frame_features"]


def encoder(set_dir, state_dict=None) -> A.Wav2Vec2Encoder:
    return A.Wav2Vec2Encoder.from_state_dict(weights(set_dir) if state_dict is None else state_dict,
                                             manifest(set_dir)["config"])


# ---- the feature path, step by step ---------------------------------------------------------
@pytest.mark.parametrize("set_dir", SETS)
def test_parity_audio_normalised_input(set_dir):
    assert relative_l2(A.normalise(waveform(set_dir)), outputs(set_dir)["normalized_input"]) < tolerance(set_dir)


@pytest.mark.parametrize("set_dir", SETS)
def test_parity_audio_hidden_states(set_dir):
    hidden = encoder(set_dir).hidden_states(waveform(set_dir))
    assert hidden.shape[0] == manifest(set_dir)["config"]["num_hidden_layers"] + 1
    assert relative_l2(hidden, expected_hidden_states(set_dir)) < tolerance(set_dir)
    # the states before the last are the fixture's as they are
    assert relative_l2(hidden[:-1], outputs(set_dir)["hidden_states_50hz"][:-1]) < tolerance(set_dir)


@pytest.mark.parametrize("set_dir", SETS)
def test_parity_audio_30hz_features(set_dir):
    hidden = outputs(set_dir)["hidden_states_50hz"]
    resampled = A.resample_to_30hz(hidden)
    assert resampled.shape[1] == int(hidden.shape[1] / 50 * 30)
    assert relative_l2(resampled, outputs(set_dir)["features_30hz"]) < tolerance(set_dir)


@pytest.mark.parametrize("set_dir", SETS)
def test_parity_audio_per_frame_features(set_dir):
    m = manifest(set_dir)
    features, covered = A.per_frame_features(outputs(set_dir)["features_30hz"], m["infer_frames"], m["fps"])
    expected = outputs(set_dir)["per_frame_features"]
    assert features.shape == expected.shape == (expected.shape[0], m["config"]["hidden_size"], m["clips"] * m["infer_frames"])
    assert relative_l2(features, expected) < tolerance(set_dir)
    # the frames past the speech are the zero padding; the last covered one is not
    assert (expected[..., covered:] == 0).all() and (expected[..., covered - 1] != 0).any()


@pytest.mark.parametrize("set_dir", SETS)
def test_parity_audio_end_to_end(set_dir):
    m = manifest(set_dir)
    result = A.encode_audio(encoder(set_dir), waveform(set_dir))
    features, covered = result.per_frame(m["infer_frames"], m["fps"])
    assert result.num_clips(m["infer_frames"], m["fps"]) == m["clips"]
    assert relative_l2(features, expected_per_frame(set_dir)) < tolerance(set_dir)
    assert relative_l2(features[:-1], outputs(set_dir)["per_frame_features"][:-1]) < tolerance(set_dir)
    frames, clips = A.audio_coverage(waveform(set_dir).numel(), m["infer_frames"], m["fps"])
    assert covered <= frames and clips == m["clips"]


@pytest.mark.parametrize("set_dir", SETS)
def test_parity_audio_features_from_comfy_style_hidden_states(set_dir):
    """ComfyUI's AudioEncoderEncode gives the same hidden states as a tuple per layer."""
    m = manifest(set_dir)
    per_layer = tuple(h[None] for h in outputs(set_dir)["hidden_states_50hz"])  # [1, T50, hidden] each
    result = A.AudioFeatures.from_hidden_states(torch.cat(per_layer), waveform(set_dir).numel())
    features, _ = result.per_frame(m["infer_frames"], m["fps"])
    assert relative_l2(features, outputs(set_dir)["per_frame_features"]) < tolerance(set_dir)


# ---- file layouts -----------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("set_dir", SETS)
def test_parity_audio_hf_folder(set_dir, fmt, tmp_path):
    """wav2vec2-large-xlsr-53-english/ as shipped in Wan2.2-S2V-14B: config.json and the
    Wav2Vec2ForCTC weights (`wav2vec2.` prefix, lm_head, weight_g / weight_v)."""
    folder = tmp_path / "wav2vec2-large-xlsr-53-english"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(manifest(set_dir)["config"]))
    if fmt == "safetensors":
        save_file(weights(set_dir), str(folder / "model.safetensors"))
    else:
        torch.save(weights(set_dir), folder / "pytorch_model.bin")
    hidden = A.Wav2Vec2Encoder.load(folder).hidden_states(waveform(set_dir))
    assert relative_l2(hidden, expected_hidden_states(set_dir)) < tolerance(set_dir)


def comfy_single_file(state_dict: dict, prefix: str, weight_norm: str) -> dict:
    """ComfyUI's repackaged wav2vec2_large_english_fp16.safetensors: Wav2Vec2Model names
    (comfy/audio_encoders/wav2vec2.py), optionally under `wav2vec2.`, no lm_head, fp16, the
    positional conv weight norm named either way."""
    names = dict(zip(A.WEIGHT_NORM_NAMES["old"], A.WEIGHT_NORM_NAMES[weight_norm]))
    out = {}
    for key, value in state_dict.items():
        if key.startswith("lm_head."):
            continue
        key = key[len("wav2vec2."):] if key.startswith("wav2vec2.") else key
        out[prefix + names.get(key, key)] = value.half()
    return out


@pytest.mark.parametrize("prefix, weight_norm", [("", "new"), ("", "old"), ("wav2vec2.", "new")])
@pytest.mark.parametrize("set_dir", SETS)
def test_parity_audio_comfyui_single_file(set_dir, prefix, weight_norm, tmp_path):
    m = manifest(set_dir)
    path = tmp_path / "wav2vec2_large_english_fp16.safetensors"
    save_file(comfy_single_file(weights(set_dir), prefix, weight_norm), str(path))
    # the file has no config: everything but the head count comes from the tensor shapes
    loaded = A.Wav2Vec2Encoder.load(path, config={"num_attention_heads": m["config"]["num_attention_heads"]})
    hidden = loaded.hidden_states(waveform(set_dir))
    rounded = encoder(set_dir, {k: v.half().float() for k, v in weights(set_dir).items()})
    assert relative_l2(hidden, rounded.hidden_states(waveform(set_dir))) < tolerance(set_dir)
    assert relative_l2(hidden, expected_hidden_states(set_dir)) < FP16_WEIGHTS_BOUND


@pytest.mark.parametrize("set_dir", SETS)
def test_audio_config_inferred_from_fixture_shapes(set_dir):
    config = manifest(set_dir)["config"]
    inferred = A.infer_config(A.hf_state_dict(weights(set_dir)))
    shape_fields = ["hidden_size", "num_hidden_layers", "intermediate_size", "conv_dim", "conv_kernel", "conv_stride",
                    "conv_bias", "feat_extract_norm", "do_stable_layer_norm", "num_conv_pos_embeddings",
                    "num_conv_pos_embedding_groups"]
    assert {k: inferred[k] for k in shape_fields} == {k: config[k] for k in shape_fields}


def test_audio_large_english_config_inferred_from_shapes():
    """wav2vec2-large-xlsr-53-english (the real file's architecture), on the meta device."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model
    large = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                 conv_dim=[512] * 7, conv_kernel=[10, 3, 3, 3, 3, 2, 2], conv_stride=[5, 2, 2, 2, 2, 2, 2],
                 conv_bias=True, feat_extract_norm="layer", num_conv_pos_embeddings=128,
                 num_conv_pos_embedding_groups=16, do_stable_layer_norm=True)
    with torch.device("meta"):
        sd = Wav2Vec2Model(Wav2Vec2Config(**large)).state_dict()
    inferred = A.infer_config(A.hf_state_dict(sd))
    assert {k: inferred[k] for k in large} == large


def test_audio_wrong_files_are_clear_errors(tmp_path):
    set_dir = SETS[0].values[0]
    with pytest.raises(ValueError, match="not a wav2vec2"):
        A.Wav2Vec2Encoder.from_state_dict({"encoder.conv1.weight": torch.zeros(1)})  # e.g. the VAE
    with pytest.raises(ValueError, match="Whisper"):
        A.Wav2Vec2Encoder.from_state_dict({"model.encoder.embed_positions.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="do not fit"):
        A.Wav2Vec2Encoder.from_state_dict(weights(set_dir), {**manifest(set_dir)["config"], "intermediate_size": 8})
    garbage = tmp_path / "broken.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read"):
        A.Wav2Vec2Encoder.load(garbage)
    with pytest.raises(FileNotFoundError):
        A.Wav2Vec2Encoder.load(tmp_path / "missing.safetensors")
    empty = tmp_path / "wav2vec2-large-xlsr-53-english"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no wav2vec2 weights"):
        A.Wav2Vec2Encoder.load(empty)


# ---- audio input ------------------------------------------------------------------------------
def test_silent_audio_is_valid():
    set_dir = SETS[0].values[0]
    result = A.encode_audio(encoder(set_dir), torch.zeros(A.SAMPLE_RATE))
    features, covered = result.per_frame(48)
    # 1 s: (16000 - 400) // 320 + 1 = 49 features at 50 Hz -> int(49 * 0.6) = 29 at 30 Hz;
    # frame i is covered while round(1.2 i) < 29, i.e. i <= 23: 24 frames; int(29 / 57.6) + 1 = 1 clip
    assert covered == 24 and features.shape[-1] == 48 and torch.isfinite(features).all()


@pytest.mark.parametrize("samples, message", [(0, "empty"), (100, "too short"), (A.MIN_SAMPLES - 1, "too short")])
def test_too_short_audio_is_a_clear_error(samples, message):
    with pytest.raises(ValueError, match=message):
        A.load_audio({"waveform": torch.zeros(1, 1, samples), "sample_rate": 16000})


def test_shortest_audio_drives_one_frame():
    """MIN_SAMPLES = 720: (720 - 400) // 320 + 1 = 2 features at 50 Hz -> int(1.2) = 1 at 30 Hz."""
    set_dir = SETS[0].values[0]
    wave = A.load_audio({"waveform": torch.randn(1, 1, A.MIN_SAMPLES), "sample_rate": 16000})
    assert A.encode_audio(encoder(set_dir), wave).per_frame(48)[1] == 1


@pytest.mark.parametrize("bad, message", [
    ({"waveform": torch.zeros(1, 16000)}, "dict with 'waveform'"),
    ({"waveform": torch.zeros(16000), "sample_rate": 16000}, r"\[batch, channels, samples\]"),
    ({"waveform": torch.zeros(1, 1, 16000), "sample_rate": 0}, "positive"),
    ({"waveform": torch.full((1, 1, 16000), float("nan")), "sample_rate": 16000}, "NaN"),
    (12, "file path or a ComfyUI AUDIO"),
])
def test_bad_audio_input_is_a_clear_error(bad, message):
    with pytest.raises(ValueError, match=message):
        A.load_audio(bad)


def test_comfy_audio_dict_is_mixed_to_mono_and_resampled():
    import librosa
    rng = np.random.default_rng(0)
    stereo = (rng.standard_normal((2, 44100)) * 0.1).astype(np.float32)  # 1 s at 44.1 kHz
    wave = A.load_audio({"waveform": torch.from_numpy(stereo)[None], "sample_rate": 44100})
    expected = librosa.resample(stereo.mean(0), orig_sr=44100, target_sr=16000)
    assert wave.dtype == torch.float32 and wave.shape == (16000,)
    np.testing.assert_allclose(wave.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_audio_file_is_read_like_the_original(tmp_path):
    import librosa
    rng = np.random.default_rng(1)
    stereo = (rng.standard_normal((22050, 2)) * 0.1).astype(np.float32)
    path = tmp_path / "speech.wav"
    soundfile.write(path, stereo, 22050)
    expected, _ = librosa.load(str(path), sr=16000)  # the original's call
    np.testing.assert_allclose(A.load_audio(path).numpy(), expected, rtol=1e-6)
    with pytest.raises(FileNotFoundError):
        A.load_audio(tmp_path / "missing.wav")
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF0000WAVEnot audio")
    with pytest.raises(ValueError, match="cannot decode"):
        A.load_audio(broken)


def test_audio_coverage_by_duration():
    # 3.1 s = 49600 samples -> 77.5 frames at 25 fps -> 78 frames begin before the end -> 2 clips of 48
    assert A.audio_coverage(49600, 48) == (78, 2)
    # exactly 2 clips of 48 frames: 3.84 s
    assert A.audio_coverage(61440, 48) == (96, 2)


def test_audio_file_libsndfile_cannot_read_is_decoded_by_pyav(tmp_path):
    """m4a (AAC): libsndfile has no decoder for it, PyAV (FFmpeg) has; a 440 Hz stereo tone
    of 1.5 s comes back as 440 Hz mono at 16 kHz, 1.5 s plus the codec's padding."""
    import av
    rate, seconds = 44100, 1.5
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(int(rate * seconds)) / rate)).astype(np.float32)
    path = tmp_path / "speech.m4a"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=rate, layout="stereo")
        for start in range(0, len(tone), 1024):
            frame = av.AudioFrame.from_ndarray(np.stack([tone[start:start + 1024]] * 2), format="fltp", layout="stereo")
            frame.sample_rate = rate
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    with pytest.raises(soundfile.LibsndfileError):
        soundfile.read(str(path))
    wave = A.load_audio(path).numpy()
    assert seconds <= len(wave) / 16000 < seconds + 0.1
    spectrum = np.abs(np.fft.rfft(wave))
    assert abs(np.argmax(spectrum) * 16000 / len(wave) - 440) < 16000 / len(wave)  # within one bin
