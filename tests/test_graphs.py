"""CUDA graphs of a run's steady ticks (liveavatar/graphs.py). On the CPU a stand-in takes the
capture's place: it runs the captured function again at every replay, reading the same input
tensors the graph would read, and refills the output the capture returned. A value that a
tick took from the tick it was captured in (a Python number, a tensor made once) instead of
from its inputs would then show as a difference from the run without graphs. The CUDA graphs
themselves: tests/test_cuda.py."""
import logging

import pytest
import torch

from dit_fixture import fixture_inputs, fixture_model
from conftest import fixture_sets
from liveavatar.graphs import TickGraphs, steady_key
from liveavatar.sampler import VIDEO_FRAMES_PER_BLOCK, StreamSettings, Streamer

SET = fixture_sets("dit_streaming")[0].values[0]


class ReplayStandIn:
    """capture(fn) -> (graph, output): replay() writes fn()'s result into that output."""

    def __init__(self, fail: bool = False):
        self.fail, self.captured = fail, 0

    def __call__(self, fn):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.captured += 1
        output = fn()
        return type("Graph", (), {"replay": lambda _: output.copy_(fn())})(), output


@pytest.fixture(scope="module")
def model():
    return fixture_model(SET)


def inputs_for(clips: int, infer_frames: int):
    inputs = fixture_inputs(SET)
    layers, dim, _ = inputs.audio.shape
    inputs.audio = torch.randn(layers, dim, clips * infer_frames, generator=torch.Generator().manual_seed(7))
    return inputs


def with_graphs(streamer: Streamer, capture) -> Streamer:
    replica = streamer.replicas[0]
    streamer.graphs = TickGraphs(replica.model, replica.text_kv, streamer.plan.ffn_rows, streamer.plan.attention_items,
                                 capture=capture)
    return streamer


def latents(streamer: Streamer, **kwargs) -> torch.Tensor:
    return torch.cat([block.latents for block in streamer.blocks(**kwargs)], dim=1)


@pytest.mark.parametrize("steps, infer_frames", [(4, 24), (3, 48)])
def test_replayed_ticks_give_the_run_without_graphs(model, steps, infer_frames):
    """6 clips (the rings wrap, the sink is refreshed), pipelined: the same latents, bit for bit.
    One kind of tick captured: the full one on the refreshed sink (the first clip's rings fill;
    its last ticks read the portrait's sink, replaced after it; the draining ticks come once)."""
    settings = StreamSettings(infer_frames=infer_frames, steps=steps, seed=5)
    plain = latents(Streamer(model, inputs_for(6, infer_frames), settings))
    stand_in = ReplayStandIn()
    streamer = with_graphs(Streamer(model, inputs_for(6, infer_frames), settings), stand_in)
    graphed = latents(streamer)
    assert torch.equal(graphed, plain)
    refreshed = streamer.replicas[0].sinks[1]
    assert stand_in.captured == len(streamer.graphs.graphs) == 1
    ((shape, places), graph), = streamer.graphs.graphs.items()
    assert shape[0] == steps and [step for _, step, _ in places] == list(range(steps))
    assert all(sink is refreshed for sink in graph.sinks)
    full_ticks = 6 * infer_frames // 12 - steps + 1 - infer_frames // 12  # from clip 1's first to the last start
    assert streamer.graphs.replays == full_ticks


def test_a_live_stream_of_one_block_step_ticks_replays_them(model):
    """A live stream whose speech comes a block at a time, each block started alone (the ticks of
    a session that keeps pace): the same latents as without graphs; after the first clip each
    step's one-block-step tick is captured once, then replayed (whatever ring rows it writes)."""
    infer_frames, blocks = 24, 14

    def live_run(capture):
        inputs = inputs_for(0, infer_frames)
        audio = inputs_for(blocks * VIDEO_FRAMES_PER_BLOCK // infer_frames + 1, infer_frames).audio
        streamer = Streamer(model, inputs, StreamSettings(infer_frames=infer_frames, steps=4, seed=2), live=True)
        if capture is not None:
            with_graphs(streamer, capture)
        fed = [0]

        def on_audio(wait):
            if not wait:  # a block in flight: its speech is not in yet
                return
            if fed[0] == blocks:
                streamer.end_audio()
                return
            streamer.append_audio(audio[..., fed[0] * 12:(fed[0] + 1) * 12])
            fed[0] += 1
        return streamer, latents(streamer, on_audio=on_audio)

    _, plain = live_run(None)
    streamer, graphed = live_run(ReplayStandIn())
    assert torch.equal(graphed, plain)
    assert len(streamer.graphs.graphs) == 4  # one per step, the refreshed sink's only
    refreshed = streamer.replicas[0].sinks[1]
    assert all(sink is refreshed for graph in streamer.graphs.graphs.values() for sink in graph.sinks)
    # every block-step of the later clips is a replay, the first of each step right after its capture
    # (the first clip's last block fills the rings, on the portrait's sink: not captured)
    assert streamer.graphs.replays == (blocks - streamer.blocks_per_clip) * 4


def test_a_capture_that_fails_turns_graphs_off_for_the_run(model, caplog):
    settings = StreamSettings(infer_frames=24, steps=2, seed=1)
    plain = latents(Streamer(model, inputs_for(3, 24), settings))
    streamer = with_graphs(Streamer(model, inputs_for(3, 24), settings), ReplayStandIn(fail=True))
    with caplog.at_level(logging.WARNING, logger="LiveAvatar"):
        graphed = latents(streamer)
    assert torch.equal(graphed, plain)
    assert streamer.graphs.failed and not streamer.graphs.graphs and streamer.graphs.replays == 0
    assert "CUDA graphs are off for this run" in caplog.text


def test_steady_key_waits_for_full_rings(model):
    """None while a block-step's ring is still filling (the attention's length changes), else
    the same key for the same shape, steps and sink (wherever in the ring the block goes)."""
    streamer = Streamer(model, inputs_for(3, 24), StreamSettings(infer_frames=24, steps=2, seed=1))
    ring = streamer.latent_frames * streamer.frame_tokens
    block_tokens = ring // streamer.blocks_per_clip
    item = type("Item", (), {})
    inputs = item()
    inputs.latents = torch.zeros(1, 16, 3, 4, 4)
    inputs.ring_rows = torch.zeros(1, block_tokens)

    def kv(token_start, step=0):
        one = item()
        one.ring, one.sink, one.token_start = streamer.caches[step], streamer.replicas[0].sinks[0], token_start
        return one

    assert steady_key([kv(0)], inputs) is None
    assert steady_key([kv(ring - 2 * block_tokens)], inputs) is None
    last = steady_key([kv(ring - block_tokens)], inputs)
    assert last is not None and last == steady_key([kv(2 * ring - block_tokens)], inputs)
    assert steady_key([kv(ring)], inputs) == last != steady_key([kv(ring - block_tokens, step=1)], inputs)


def test_graphs_only_on_a_gpu(model):
    """On the CPU a run has no graphs (tests put a stand-in in by hand)."""
    assert Streamer(model, inputs_for(1, 24), StreamSettings(infer_frames=24)).graphs is None
