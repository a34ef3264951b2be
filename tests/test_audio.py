"""Audio features against the original's fixtures; file layouts; input handling."""
import json

import numpy as np
import pytest
import soundfile
import torch
from safetensors.torch import save_file

from conftest import fixture_sets, load_manifest, load_tensors, relative_l2
from liveavatar import audio as A

SETS = fixture_sets("audio")


def manifest(set_dir):
    return load_manifest(set_dir, "audio")


def tolerance(set_dir):
    return manifest(set_dir)["tolerance"]["relative_l2"]


def encoder(set_dir) -> A.Wav2Vec2Encoder:
    return A.Wav2Vec2Encoder.from_state_dict(load_tensors(set_dir, "audio", prefix="weights."), manifest(set_dir)["config"])


def outputs(set_dir):
    return load_tensors(set_dir, "audio", prefix="outputs.")


def waveform(set_dir):
    return load_tensors(set_dir, "audio", prefix="inputs.")["waveform_16k"]


@pytest.mark.parametrize("set_dir", SETS)
def test_parity_audio_normalised_input(set_dir):
    assert relative_l2(A.normalise(waveform(set_dir)), outputs(set_dir)["normalized_input"]) < tolerance(set_dir)


@pytest.mark.parametrize("set_dir", SETS)
def test_parity_audio_all_hidden_states(set_dir):
    hidden = encoder(set_dir).hidden_states(outputs(set_dir)["normalized_input"])
    assert relative_l2(hidden, outputs(set_dir)["hidden_states_50hz"]) < tolerance(set_dir)


@pytest.mark.parametrize("set_dir", SETS)
def test_parity_audio_30hz_interpolation(set_dir):
    resampled = A.resample_to_30hz(outputs(set_dir)["hidden_states_50hz"])
    assert relative_l2(resampled, outputs(set_dir)["features_30hz"]) < tolerance(set_dir)


@pytest.mark.parametrize("set_dir", SETS)
def test_parity_audio_per_frame_features(set_dir):
    m = manifest(set_dir)
    features, frames = A.per_frame_features(outputs(set_dir)["features_30hz"], m["infer_frames"], m["fps"])
    expected = outputs(set_dir)["per_frame_features"]
    assert features.shape == expected.shape and features.shape[-1] == m["clips"] * m["infer_frames"]
    assert relative_l2(features, expected) < tolerance(set_dir)
    # frames past the speech are the zero padding, frames before it are not
    assert (expected[..., frames:] == 0).all() and (expected[..., frames - 1] != 0).any()


@pytest.mark.parametrize("set_dir", SETS)
def test_parity_audio_end_to_end(set_dir):
    m = manifest(set_dir)
    result = A.encode_audio(encoder(set_dir), waveform(set_dir))
    features, _ = result.per_frame(m["infer_frames"])
    assert result.num_clips(m["infer_frames"]) == m["clips"]
    assert relative_l2(features, outputs(set_dir)["per_frame_features"]) < tolerance(set_dir)


def _hf_folder(set_dir, tmp_path, fmt):
    folder = tmp_path / "wav2vec2-large-xlsr-53-english"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(manifest(set_dir)["config"]))
    weights = load_tensors(set_dir, "audio", prefix="weights.")
    if fmt == "safetensors":
        save_file(weights, str(folder / "model.safetensors"))
    else:
        torch.save(weights, folder / "pytorch_model.bin")
    return folder


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_parity_audio_hf_folder_layouts(fmt, tmp_path):
    set_dir = SETS[0].values[0]
    enc = A.Wav2Vec2Encoder.load(_hf_folder(set_dir, tmp_path, fmt))
    hidden = enc.hidden_states(outputs(set_dir)["normalized_input"])
    assert relative_l2(hidden, outputs(set_dir)["hidden_states_50hz"]) < tolerance(set_dir)


def test_comfyui_single_file_layout(tmp_path):
    """ComfyUI's wav2vec2_large_english_fp16.safetensors: no `wav2vec2.` prefix, fp16, weight
    norm saved as parametrizations.weight.original0/1, no lm_head."""
    set_dir = SETS[0].values[0]
    weights = load_tensors(set_dir, "audio", prefix="weights.")
    comfy = {}
    for k, v in weights.items():
        if not k.startswith("wav2vec2."):
            continue
        k = k[len("wav2vec2."):].replace("conv.weight_g", "conv.parametrizations.weight.original0")
        comfy[k.replace("conv.weight_v", "conv.parametrizations.weight.original1")] = v.half()
    sd = {k: v for k, v in comfy.items()}
    enc = A.Wav2Vec2Encoder.from_state_dict(sd, manifest(set_dir)["config"])
    hidden = enc.hidden_states(outputs(set_dir)["normalized_input"])
    assert relative_l2(hidden, outputs(set_dir)["hidden_states_50hz"]) < 2e-3  # fp16-rounded weights


def test_large_config_inferred_from_shapes():
    from transformers import Wav2Vec2Config, Wav2Vec2Model
    large = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                 conv_dim=[512] * 7, conv_kernel=[10, 3, 3, 3, 3, 2, 2], conv_stride=[5, 2, 2, 2, 2, 2, 2],
                 conv_bias=True, feat_extract_norm="layer", num_conv_pos_embeddings=128,
                 num_conv_pos_embedding_groups=16, do_stable_layer_norm=True)
    with torch.device("meta"):
        sd = Wav2Vec2Model(Wav2Vec2Config(**large)).state_dict()
    inferred = A.infer_config(sd)
    assert {k: inferred[k] for k in large} == large


def test_silent_audio_is_valid():
    set_dir = SETS[0].values[0]
    features, frames = A.encode_audio(encoder(set_dir), torch.zeros(16000)).per_frame(48)
    # 1 s -> 49 wav2vec2 frames -> int(49 * 0.6) = 29 at 30 Hz -> frames i with round(1.2 i) < 29: 24
    assert frames == 24 and features.shape[-1] == 48 and torch.isfinite(features).all()


@pytest.mark.parametrize("samples", [0, 100])
def test_too_short_audio_is_a_clear_error(samples):
    with pytest.raises(ValueError, match="ms"):
        A.load_audio({"waveform": torch.zeros(1, 1, samples) if samples else torch.zeros(1, 1, 0), "sample_rate": 16000})


def test_comfy_audio_dict_is_mixed_to_mono_and_resampled():
    import librosa
    rng = np.random.default_rng(0)
    stereo = rng.standard_normal((2, 44100)).astype(np.float32) * 0.1
    wave = A.load_audio({"waveform": torch.from_numpy(stereo)[None], "sample_rate": 44100})
    expected = librosa.resample(stereo.mean(0), orig_sr=44100, target_sr=16000)
    assert wave.shape == (16000,)
    np.testing.assert_allclose(wave.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_audio_file_is_read_like_the_original(tmp_path):
    import librosa
    rng = np.random.default_rng(1)
    stereo = (rng.standard_normal((22050, 2)) * 0.1).astype(np.float32)
    path = tmp_path / "speech.wav"
    soundfile.write(path, stereo, 22050)
    expected, _ = librosa.load(str(path), sr=16000)
    np.testing.assert_allclose(A.load_audio(path).numpy(), expected, rtol=1e-6)
    with pytest.raises(FileNotFoundError):
        A.load_audio(tmp_path / "missing.wav")


def test_wrong_weights_are_a_clear_error():
    with pytest.raises(ValueError, match="not a wav2vec2"):
        A.Wav2Vec2Encoder.from_state_dict({"encoder.conv1.weight": torch.zeros(1)})
