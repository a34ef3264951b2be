"""The pipelined (diagonal) schedule, one step per model copy, and continued runs all give
what the plain sequential schedule gives: the same streaming math, another order."""
import pytest
import torch

from conftest import fixture_sets, relative_l2
from dit_fixture import fixture_config, fixture_inputs, fixture_model, fixture_weights, write_checkpoint
from liveavatar.loading import load_dit
from liveavatar.placement import Offload, OneDevice, StepPerGPU
from liveavatar.sampler import StreamSettings, Streamer

SET = fixture_sets("dit_streaming")[0].values[0]
CLIPS = 3  # the ring (one clip) wraps twice; clips 1 and 2 use the refreshed sink
BOUND = 1e-5


def inputs_for(clips: int, infer_frames: int):
    """The fixture's text/portrait with random audio long enough for `clips` clips."""
    inputs = fixture_inputs(SET)
    layers, dim, _ = inputs.audio.shape
    generator = torch.Generator().manual_seed(7)
    inputs.audio = torch.randn(layers, dim, clips * infer_frames, generator=generator)
    return inputs


def run(model, settings, clips=CLIPS, streamer=None):
    streamer = streamer or Streamer(model, inputs_for(clips, settings.infer_frames), settings)
    blocks = list(streamer.blocks())
    assert [(b.clip, b.index) for b in blocks] == [divmod(i, streamer.blocks_per_clip) for i in range(len(blocks))]
    return torch.cat([b.latents for b in blocks], dim=1)


@pytest.fixture(scope="module")
def model():
    return fixture_model(SET)


@pytest.mark.parametrize("steps, infer_frames", [(1, 24), (2, 24), (3, 24), (4, 24), (5, 24), (6, 24),
                                                 (4, 48), (3, 12)])
def test_diagonal_schedule_equals_sequential(model, steps, infer_frames):
    settings = dict(infer_frames=infer_frames, steps=steps, seed=3)
    sequential = run(model, StreamSettings(pipelined=False, **settings))
    assert sequential.shape[1] == CLIPS * infer_frames // 4
    for first_alone in (True, False):
        pipelined = run(model, StreamSettings(pipelined=True, first_block_alone=first_alone, **settings))
        assert relative_l2(pipelined, sequential) <= BOUND


def count_forwards(model, monkeypatch) -> list[int]:
    """Block-steps per forward of the model, recorded as they run."""
    batches = []
    denoise = type(model).denoise
    monkeypatch.setattr(type(model), "denoise", lambda self, items, *args: (batches.append(len(items)),
                                                                         denoise(self, items, *args))[1])
    return batches


@pytest.mark.parametrize("first_alone", [False, True])
def test_a_tick_is_one_batched_forward(model, monkeypatch, first_alone):
    """12 blocks x 4 steps in 12 + 3 forwards of up to 4 block-steps (sequential: 48 of 1). With
    the first block alone: its 4 steps as 4 forwards of one, then 11 blocks in 11 + 3."""
    batches = count_forwards(model, monkeypatch)
    run(model, StreamSettings(infer_frames=48, steps=4, seed=3, first_block_alone=first_alone))
    assert sum(batches) == CLIPS * 4 * 4
    if first_alone:
        assert batches[:4] == [1, 1, 1, 1] and len(batches) == 4 + (CLIPS * 4 - 1) + 3
    else:
        assert len(batches) == CLIPS * 4 + 3
    assert max(batches) == 4


@pytest.mark.parametrize("first_alone, block_steps_before_first", [(False, 1 + 2 + 3 + 4), (True, 4)])
def test_first_block_is_clean_after_its_own_steps(model, first_alone, block_steps_before_first):
    """The time to the first frame: block-steps computed before block 0 comes out; block 1 is
    not later for it. One clip of 4 blocks: in the diagonal, block 1 is clean at the fifth tick,
    which runs blocks 1-3 (there is no fifth block): 1+2+3+4 + 3 block-steps. With block 0
    alone: 4, then blocks 1-3 ramp up: 1+2+3+3, the same 13."""
    done, seen = [], []
    streamer = Streamer(model, inputs_for(1, 48), StreamSettings(infer_frames=48, steps=4, seed=3,
                                                                 first_block_alone=first_alone))
    for _ in streamer.blocks(on_step=lambda: done.append(1)):
        seen.append(len(done))
    assert seen[:2] == [block_steps_before_first, 1 + 2 + 3 + 4 + 3]


def test_full_rings_of_consecutive_steps_attend_in_one_call(model, monkeypatch):
    """Once the rings are full (every tick after the first clip), a tick's block-steps attend
    in one call per layer; the results are pinned by the equivalence tests above."""
    from liveavatar import attention
    batches = []
    attend = attention.attend
    monkeypatch.setattr(attention, "attend", lambda q, segments, *rest: (batches.append(q.shape[0]),
                                                                          attend(q, segments, *rest))[1])
    run(model, StreamSettings(infer_frames=24, steps=3, seed=3))
    layers = fixture_config(SET).num_layers
    # 3 clips of 2 blocks, 3 steps: after clip 0 the rings are full, and the ticks with all 3
    # steps in flight attend in one call per layer
    assert batches.count(3) >= 2 * layers
    assert sum(batches) == CLIPS * 2 * 3 * layers  # every block-step attended once per layer


def test_tick_groups_consecutive_steps_with_one_sink_and_equal_rings():
    """Which block-steps share an attention call (kvcache.TickKV): consecutive steps of one
    StepRings, one sink, equally many valid ring tokens; at most attention_items per call."""
    from liveavatar.kernels import Kernels
    from liveavatar.kvcache import BlockStepKV, SinkStore, StepRings, TickKV
    rings, other = (StepRings(4, 12, 2, 8, ["cpu"], torch.float32) for _ in range(2))
    sink, refreshed = SinkStore(), SinkStore()
    views = rings.views()

    def tick(items, valid, cap=0):
        tables = [(torch.ones(4, 1, 4), torch.zeros(4, 1, 4))] * len(items)
        kv = TickKV([BlockStepKV(ring, s, 30, 0) for ring, s in items], tables, torch.zeros(len(items), 4), Kernels(),
                    cap)
        kv.valid = valid
        return kv._groups()

    assert tick([(v, sink) for v in views], [12] * 4) == [[0, 1, 2, 3]]
    assert tick([(v, sink) for v in views], [12] * 4, cap=3) == [[0, 1, 2], [3]]
    assert tick([(v, sink) for v in views], [4, 8, 12, 12]) == [[0], [1], [2, 3]]  # first clip: rings filling
    assert tick([(views[0], refreshed)] + [(v, sink) for v in views[1:]], [12] * 4) == [[0], [1, 2, 3]]
    assert tick([(views[0], sink), (views[2], sink)], [12] * 2) == [[0], [1]]  # not consecutive
    assert tick([(views[0], sink), (other.views()[1], sink)], [12] * 2) == [[0], [1]]  # another copy's rings


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(fixture_weights(SET), tmp_path_factory.mktemp("ckpt") / "dit.safetensors")


@pytest.mark.parametrize("copies, steps", [(2, 4), (3, 4), (2, 3)])
def test_one_step_per_model_copy_equals_one_device(checkpoint, copies, steps):
    """StepPerGPU's dealing of steps over copies, exercised with CPU 'devices'."""
    settings = StreamSettings(infer_frames=24, steps=steps, seed=5)
    one = load_dit(checkpoint, storage="fp32", placement=OneDevice("cpu"), config=fixture_config(SET))
    spread = load_dit(checkpoint, storage="fp32", placement=StepPerGPU(["cpu"] * copies), config=fixture_config(SET))
    assert len({id(m) for m in spread.step_models(steps)}) == copies
    assert relative_l2(run(spread, settings), run(one, settings)) <= BOUND


def test_offload_streams_pipelined_ticks_unchanged(checkpoint):
    settings = StreamSettings(infer_frames=24, steps=4, seed=5)
    layers = fixture_config(SET).num_layers
    one = load_dit(checkpoint, storage="fp32", placement=OneDevice("cpu"), config=fixture_config(SET))
    offloaded = load_dit(checkpoint, storage="fp32", placement=Offload("cpu", blocks=layers, num_layers=layers),
                         config=fixture_config(SET))
    assert torch.equal(run(offloaded, settings), run(one, settings))


@pytest.mark.parametrize("first, pipelined", [(1, True), (2, True), (1, False)])
def test_continued_run_equals_whole_run(model, first, pipelined):
    """Audio cut at a clip boundary: run the first part, extend with the rest, go on."""
    settings = dict(infer_frames=24, steps=4, seed=11, pipelined=pipelined)
    whole_inputs = inputs_for(CLIPS, 24)
    whole = run(model, StreamSettings(**settings), streamer=Streamer(model, whole_inputs, StreamSettings(**settings)))
    part_inputs = inputs_for(CLIPS, 24)
    part_inputs.audio = whole_inputs.audio[..., :first * 24]
    streamer = Streamer(model, part_inputs, StreamSettings(**settings))
    head = run(model, None, streamer=streamer)
    streamer.extend(whole_inputs.audio[..., first * 24:])
    tail = list(streamer.blocks())
    assert [b.clip for b in tail][0] == first
    joined = torch.cat([head] + [b.latents for b in tail], dim=1)
    assert relative_l2(joined, whole) <= BOUND


def test_continuing_needs_a_finished_run(model):
    streamer = Streamer(model, inputs_for(2, 24), StreamSettings(infer_frames=24, steps=2))
    blocks = streamer.blocks()
    next(blocks)
    with pytest.raises(RuntimeError, match="finished run"):
        streamer.extend(inputs_for(1, 24).audio)
    blocks.close()  # abandoned mid-run, like a cancel: the state is no longer continuable
    with pytest.raises(RuntimeError, match="new one"):
        streamer.extend(inputs_for(1, 24).audio)
