"""A live stream's audio comes block by block (Streamer(..., live=True): append_audio, end_audio,
blocks(on_audio=...)). Given the same features, block by block as the loop asks for them gives
bit for bit the latents of the one-shot run (the same schedule); audio that comes late changes
only the order of the same math; the features held stay bounded."""
import pytest
import torch

from conftest import relative_l2
from liveavatar.feature_timeline import FeatureTimeline
from liveavatar.loading import load_dit
from liveavatar.placement import Offload, OneDevice, StepPerGPU
from liveavatar.sampler import StreamInputs, StreamSettings, Streamer
from test_schedule import SET, checkpoint, inputs_for, model  # noqa: F401 (fixtures)
from dit_fixture import fixture_config

CLIPS, FRAMES, BLOCK = 3, 24, 12
BOUND = 1e-5  # another order of the same math: float rounding only


def one_shot(model, settings):
    streamer = Streamer(model, inputs_for(CLIPS, FRAMES), settings)
    return torch.cat([b.latents for b in streamer.blocks()], dim=1)


class BlockByBlock:
    """on_audio for a live stream: hands the next block of the same features when asked (and
    `delay(call)` says it is there), ends the audio after the last; records what the loop had
    done by then."""

    def __init__(self, streamer, features, delay=lambda call: False):
        self.streamer, self.features, self.delay = streamer, features, delay
        self.calls, self.given, self.yielded_at_call, self.held = 0, 0, [], []
        self.yielded = 0

    def __call__(self, wait: bool):
        self.calls += 1
        self.yielded_at_call.append(self.yielded)
        self.held.append(self.streamer.audio.end - self.streamer.audio.start)
        if self.given * BLOCK >= self.features.shape[-1]:
            self.streamer.end_audio()
        elif wait or not self.delay(self.calls):
            self.streamer.append_audio(self.features[..., self.given * BLOCK:(self.given + 1) * BLOCK])
            self.given += 1


def live_run(model, settings, delay=lambda call: False):
    inputs = inputs_for(CLIPS, FRAMES)
    features = inputs.audio
    inputs.audio = features[..., :0]
    streamer = Streamer(model, inputs, settings, live=True)
    feed = BlockByBlock(streamer, features, delay)
    blocks = []
    for block in streamer.blocks(on_audio=feed):
        blocks.append(block)
        feed.yielded += 1
    assert [(b.clip, b.index) for b in blocks] == [divmod(i, streamer.blocks_per_clip) for i in range(len(blocks))]
    return torch.cat([b.latents for b in blocks], dim=1), feed, streamer


@pytest.mark.parametrize("pipelined, first_alone", [(True, True), (True, False), (False, True)])
def test_session_stream_block_by_block_is_bit_identical_to_one_shot(model, pipelined, first_alone):
    settings = StreamSettings(infer_frames=FRAMES, steps=4, seed=3, pipelined=pipelined, first_block_alone=first_alone)
    latents, feed, streamer = live_run(model, settings)
    assert torch.equal(latents, one_shot(model, settings))
    assert latents.shape[1] == CLIPS * FRAMES // 4
    assert feed.given == CLIPS * FRAMES // BLOCK
    # blocks came out while audio was still being given, and at most the block being started
    # (and the next, given ahead) was ever held
    assert feed.yielded_at_call[feed.given - 1] > 0
    assert max(feed.held) <= 2 * BLOCK and streamer.audio.end == CLIPS * FRAMES


def test_session_stream_late_audio_changes_only_the_order(model):
    """Every other ask while blocks are in flight finds no audio: blocks start later, run in
    other batches, give the same latents to float rounding."""
    settings = StreamSettings(infer_frames=FRAMES, steps=4, seed=3)
    late, feed, _ = live_run(model, settings, delay=lambda call: call % 2 == 0)
    assert feed.calls > CLIPS * FRAMES // BLOCK + 1  # some asks came back empty
    assert relative_l2(late, one_shot(model, settings)) <= BOUND


@pytest.mark.parametrize("placement", ["offload", "step per copy"])
def test_session_stream_same_loop_on_every_placement(checkpoint, placement):
    cfg = fixture_config(SET)
    where = Offload("cpu", blocks=cfg.num_layers, num_layers=cfg.num_layers) if placement == "offload" \
        else StepPerGPU(["cpu", "cpu"])
    dit = load_dit(checkpoint, storage="fp32", placement=where, config=cfg)
    settings = StreamSettings(infer_frames=FRAMES, steps=4, seed=5)
    assert torch.equal(live_run(dit, settings)[0], one_shot(dit, settings))
    one = load_dit(checkpoint, storage="fp32", placement=OneDevice("cpu"), config=cfg)
    assert relative_l2(live_run(dit, settings)[0], one_shot(one, settings)) <= BOUND


def test_session_stream_refuses_misuse(model):
    inputs = inputs_for(1, FRAMES)
    features = inputs.audio
    with pytest.raises(ValueError, match="whole blocks of 12 frames"):
        Streamer(model, StreamInputs(inputs.text, inputs.ref_latent, inputs.motion_latents, features[..., :5]),
                 StreamSettings(infer_frames=FRAMES), live=True)
    inputs.audio = features[..., :0]
    streamer = Streamer(model, inputs, StreamSettings(infer_frames=FRAMES, steps=2), live=True)
    with pytest.raises(ValueError, match="whole blocks"):
        streamer.append_audio(features[..., :7])
    with pytest.raises(ValueError, match="like the stream's"):
        streamer.append_audio(features[:2, :, :12])
    with pytest.raises(RuntimeError, match="no block is in flight"):
        next(streamer.blocks())
    streamer = Streamer(model, inputs, StreamSettings(infer_frames=FRAMES, steps=2), live=True)
    streamer.append_audio(features[..., :12])
    streamer.end_audio()
    assert [b.index for b in streamer.blocks()] == [0]
    with pytest.raises(RuntimeError, match="before end_audio"):
        streamer.append_audio(features[..., 12:24])
    with pytest.raises(RuntimeError, match="append_audio"):
        streamer.extend(features)


def test_session_feature_timeline_takes_releases_and_truncates():
    values = torch.arange(60.0).reshape(1, 1, 60)
    timeline = FeatureTimeline(values[..., :24])
    timeline.append(values[..., 24:36])
    timeline.append(values[..., 36:60])
    assert timeline.take(20, 8).flatten().tolist() == list(range(20, 28))  # across two parts
    assert timeline.take(0, 12).data_ptr() == values.data_ptr()  # inside one part: a view
    timeline.release(30)  # the first part ends at 24: dropped; the second holds 30: kept
    assert (timeline.start, timeline.end, len(timeline.parts)) == (24, 60, 2)
    with pytest.raises(IndexError, match="not held"):
        timeline.take(12, 12)
    timeline.truncate(48)
    assert timeline.end == 48 and timeline.take(36, 12).flatten().tolist() == list(range(36, 48))
    timeline.release(48)
    timeline.truncate(40)
    assert (timeline.start, timeline.end, len(timeline.parts)) == (48, 48, 0)
