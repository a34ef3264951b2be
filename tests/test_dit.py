"""The DiT and the streaming sampler against the original's fixtures (manifest-driven)."""

import pytest
import torch

from conftest import fixture_sets, load_manifest, load_tensors, relative_l2
from dit_fixture import fixture_inputs, fixture_model, fixture_settings, stream_clips
from liveavatar.dit import DiTConfig, LiveAvatarDiT
from liveavatar.sampler import Streamer, flow_schedule


def tolerance(set_dir) -> float:
    return load_manifest(set_dir, "dit_streaming")["tolerance"]["relative_l2"]


DIT_SETS = fixture_sets("dit_streaming")


@pytest.mark.parametrize("set_dir", DIT_SETS)
def test_parity_dit_first_block_prediction(set_dir):
    """Clip 0, block 0, first step, right after the sink prefill."""
    model = fixture_model(set_dir)
    streamer = Streamer(model, fixture_inputs(set_dir), fixture_settings(set_dir))
    x = streamer.clip_noise(0)[:, :3]
    flow = streamer.predict(x, step=0, clip=0, block=0)
    expected = load_tensors(set_dir, "dit_streaming", prefix="outputs.")["first_block_first_step_prediction"]
    assert relative_l2(flow, expected) < tolerance(set_dir)


@pytest.mark.parametrize("set_dir", DIT_SETS)
def test_parity_dit_streaming_end_to_end(set_dir):
    """Every block of every clip: sink prefill, per-step rings, rolling sink, sink refresh."""
    model = fixture_model(set_dir)
    latents = stream_clips(model, fixture_inputs(set_dir), fixture_settings(set_dir))
    expected = load_tensors(set_dir, "dit_streaming", prefix="outputs.")["clean_latents"]
    assert latents.shape == expected.shape
    for clip in range(expected.shape[0]):
        assert relative_l2(latents[clip], expected[clip]) < tolerance(set_dir), f"clip {clip}"


@pytest.mark.parametrize("set_dir", fixture_sets("schedule"))
def test_parity_schedule_matches_original(set_dir):
    schedule = load_manifest(set_dir, "schedule")["steps"]
    for steps, expected in schedule.items():
        timesteps, sigmas = flow_schedule(int(steps))
        torch.testing.assert_close(timesteps, torch.tensor(expected["timesteps"]), rtol=1e-6, atol=1e-4)
        torch.testing.assert_close(sigmas, torch.tensor(expected["sigmas"]), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("set_dir", fixture_sets("wan22_s2v_14b_keys"))
def test_14b_config_has_every_official_key_and_shape(set_dir):
    official = load_manifest(set_dir, "wan22_s2v_14b_keys")
    cfg = DiTConfig.from_dict(official["config"])
    with torch.device("meta"):
        model = LiveAvatarDiT(cfg)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: v["shape"] for k, v in official["keys"].items()}
    assert sorted(set(theirs) - set(ours)) == [] and sorted(set(ours) - set(theirs)) == []
    assert {k: s for k, s in ours.items() if theirs[k] != s} == {}
    assert sum(v.numel() for v in model.state_dict().values()) == official["num_params"]


def test_unsupported_variant_is_refused():
    with pytest.raises(ValueError, match="enable_framepack"):
        DiTConfig.from_dict({"enable_framepack": False})


@pytest.mark.parametrize("frames", [0, 8, 50, -12])
def test_infer_frames_must_be_whole_blocks(frames):
    set_dir = fixture_sets("dit_streaming")[0].values[0]
    settings = fixture_settings(set_dir)
    settings.infer_frames = frames
    with pytest.raises(ValueError, match="multiple of 12"):
        Streamer(fixture_model(set_dir), fixture_inputs(set_dir), settings)


@pytest.mark.parametrize("steps", [0, 7])
def test_step_count_outside_distilled_range_is_refused(steps):
    with pytest.raises(ValueError, match="between 1 and 6"):
        flow_schedule(steps)


def test_clips_follow_audio_length_and_num_clip():
    set_dir = fixture_sets("dit_streaming")[0].values[0]
    inputs, settings = fixture_inputs(set_dir), fixture_settings(set_dir)
    per_clip = settings.infer_frames
    model = fixture_model(set_dir)
    settings.num_clip = 0
    inputs.audio = inputs.audio[..., :per_clip + 1]  # one frame into the second clip
    assert Streamer(model, inputs, settings).num_clips == 2
    settings.num_clip = 1
    assert Streamer(model, inputs, settings).num_clips == 1


def test_rolling_offset_is_reproducible_from_seed():
    set_dir = fixture_sets("dit_streaming")[0].values[0]
    model, inputs = fixture_model(set_dir), fixture_inputs(set_dir)

    def first_clip(seed):
        settings = fixture_settings(set_dir)
        settings.rolling_offset, settings.noise, settings.num_clip, settings.seed = None, None, 1, seed
        return stream_clips(model, inputs, settings)

    a, b, c = first_clip(3), first_clip(3), first_clip(4)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_text_longer_than_text_len_is_a_clear_error():
    set_dir = fixture_sets("dit_streaming")[0].values[0]
    model = fixture_model(set_dir)
    with pytest.raises(ValueError, match="tokens long"):
        model.text_context(torch.zeros(model.cfg.text_len + 1, model.cfg.text_dim))
