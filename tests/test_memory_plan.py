"""The memory planner (liveavatar/memory.py): its arithmetic against hand-derived numbers and
the bytes the caches really take, the settings it picks under a cap, and the error when a run
cannot fit; trimmed runs give the same latents; the breakdown script's CPU mode."""
import importlib.util
from pathlib import Path

import pytest
import torch

from conftest import fixture_sets, relative_l2
from dit_fixture import fixture_config, fixture_inputs, fixture_settings, fixture_weights, stream_clips, write_checkpoint
from liveavatar.dit import DiTConfig
from liveavatar.loading import load_dit
from liveavatar.memory import (ALLOCATOR_RESERVE, GIB, TRIMS, MemoryPlanError, ModelSpec, RunShape, _estimate, kv_ring_bytes,
                               plan_memory, sink_bytes)
from liveavatar.placement import Offload, OneDevice, StepPerGPU
from liveavatar.sampler import Streamer

SET = fixture_sets("dit_streaming")[0].values[0]
LAYERS = fixture_config(SET).num_layers


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(fixture_weights(SET), tmp_path_factory.mktemp("ckpt") / "dit.safetensors")


def loaded(checkpoint, placement, storage="fp32"):
    return load_dit(checkpoint, storage=storage, placement=placement, config=fixture_config(SET))


# ---- arithmetic ------------------------------------------------------------------------------------
def test_token_counts_and_cache_bytes_at_the_two_sizes():
    """704*384 = latent 48x88: 24*44 = 1056 tokens per latent frame; FramePack motion 1056 (1
    latent at 1x) + 12*22 (2 latents at 2x: one 2x4x4 patch row) + 4*6*11 (16 latents at 4x) =
    1584; ring = 12 latent frames. 384*256 = latent 32x48: 384, 384 + 96 + 96 = 576."""
    big, small = RunShape(48, 88, 48, 4), RunShape(32, 48, 48, 4)
    assert (big.frame_tokens, big.motion_tokens, big.sink_tokens, big.ring_tokens) == (1056, 1584, 2640, 12672)
    assert (small.frame_tokens, small.motion_tokens, small.sink_tokens, small.ring_tokens) == (384, 576, 960, 4608)
    # rings: steps x layers x (keys + values) x tokens x (dim bytes [+ a 4-byte scale when fp8])
    assert kv_ring_bytes(big, 5120, 4, 40, True, 2) == 4 * 40 * 2 * 12672 * (5120 + 4)  # 19.35 GiB
    assert kv_ring_bytes(big, 5120, 4, 40, False, 2) == 4 * 40 * 2 * 12672 * 5120 * 2  # 38.67 GiB
    assert kv_ring_bytes(small, 5120, 4, 40, True, 2) == 4 * 40 * 2 * 4608 * (5120 + 4)  # 7.04 GiB
    # one sink for all steps: keys and values of its 2640 tokens, 40 layers (1.21 GiB in fp8)
    assert sink_bytes(big, 5120, 40, True, 2) == 40 * 2 * 2640 * (5120 + 4)
    assert sink_bytes(big, 5120, 40, True, 2) * 4 == 40 * 4 * 2 * 2640 * (5120 + 4)  # what a copy per step took


def test_full_size_weights_from_the_config():
    """fp8 storage: per block 8 attention matrices 5120x5120 and the FFN's 5120x13824 twice in
    fp8 (+ a 4-byte scale each), the 21 vectors of 5120 and the 13824 FFN bias in bf16."""
    spec = ModelSpec.of_config(DiTConfig(), "fp8", OneDevice("meta"), steps=4)
    block = 8 * 5120 * 5120 + 2 * 5120 * 13824 + 10 * 4 + (21 * 5120 + 13824) * 2
    assert spec.block_bytes == [block] * 40
    bf16 = ModelSpec.of_config(DiTConfig(), "bf16", OneDevice("meta"), steps=4)
    assert bf16.block_bytes[0] == 2 * (8 * 5120 * 5120 + 2 * 5120 * 13824 + 21 * 5120 + 13824)
    meta = torch.device("meta")
    assert spec.weights[meta] < bf16.weights[meta] < 2 * spec.weights[meta]
    steps = ModelSpec.of_config(DiTConfig(), "fp8", StepPerGPU(["meta", "meta"]), steps=4)
    assert steps.copy_steps == [2, 2] and steps.weights[meta] == 2 * spec.weights[meta]


def test_plan_counts_the_caches_a_run_allocates():
    """On the fixture model (CPU, no limit): the plan's rings, sinks (two: the portrait's and the
    refreshed, overlapping while clip 0 finishes), text keys/values and weights are the bytes of
    the tensors the run holds."""
    from dit_fixture import fixture_model
    for dtype, kv_fp8 in ((torch.float32, False), (torch.bfloat16, True)):
        model = fixture_model(SET).to(dtype)
        settings = fixture_settings(SET)
        settings.kv_fp8 = kv_fp8
        streamer = Streamer(model, fixture_inputs(SET), settings)
        list(streamer.blocks())
        parts = streamer.plan.devices[0].parts
        assert parts["KV rings"] == streamer.caches[0].group.nbytes()
        assert parts["sink"] == 2 * streamer.replicas[0].sinks[1].nbytes()
        text = sum(t.numel() * t.element_size() for layer in streamer.replicas[0].text_kv for t in layer[:2])
        cfg, shape = model.cfg, streamer.plan.shape
        modulation_and_rope = settings.steps * (3 * 7 * cfg.dim * 4 + shape.block_tokens * cfg.head_dim * 4)
        assert parts["text/audio context"] == text + modulation_and_rope
        assert parts["weights"] == sum(p.numel() * p.element_size() for p in model.parameters()) + \
            sum(b.numel() * b.element_size() for b in model.buffers())
        assert streamer.plan.kv_fp8 == kv_fp8


def test_one_step_per_gpu_counts_each_copys_own_caches(checkpoint):
    model = loaded(checkpoint, StepPerGPU(["cpu", "cpu"]))
    settings = fixture_settings(SET)
    streamer = Streamer(model, fixture_inputs(SET), settings)
    rings = {id(c.group): c.group.nbytes() for c in streamer.caches}
    assert len(rings) == 2
    parts = streamer.plan.devices[0].parts  # both copies on the one CPU "GPU"
    assert parts["KV rings"] == sum(rings.values())
    assert parts["sink"] == 2 * sum(r.sinks[0].nbytes() for r in streamer.replicas)


# ---- choosing under a cap --------------------------------------------------------------------------
def totals(model, shape, kv_fp8, count):
    spec = ModelSpec.of_model(model, shape.steps)
    return [_estimate(spec, shape, kv_fp8, trim, count, {}, {}).devices[0].total for trim in TRIMS]


def fixture_shape():
    inputs, settings = fixture_inputs(SET), fixture_settings(SET)
    return RunShape(*inputs.ref_latent.shape[-2:], settings.infer_frames, settings.steps,
                    text_tokens=inputs.text.shape[0] + 1)


def test_cap_takes_the_fewest_offloaded_blocks_then_the_least_trimming(checkpoint):
    """L blocks, L - 1 GPU slots: offloading up to L - 1 blocks saves nothing (a slot each), all L
    save one block; under any cap the plan is the fewest blocks that fit, then the least trimming."""
    model = loaded(checkpoint, Offload("cpu", blocks=0, num_layers=LAYERS, slots=LAYERS - 1))
    shape = fixture_shape()
    by_count = {n: totals(model, shape, False, n) for n in range(LAYERS + 1)}
    block = model.blocks[0]
    block_bytes = sum(t.numel() * t.element_size() for t in list(block.parameters()) + list(block.buffers()))
    assert all(by_count[n] == by_count[0] for n in range(LAYERS))
    assert [a - b for a, b in zip(by_count[0], by_count[LAYERS])] == [block_bytes] * len(TRIMS)
    assert all(a >= b for a, b in zip(by_count[0], by_count[0][1:]))  # trimming never adds
    for n in (0, LAYERS):
        for total in by_count[n]:
            cap = (total + 0.5) / GIB
            plan = plan_memory(model, shape, False, memory_cap_gib=cap)
            fits = [(c, i) for c in by_count for i, v in enumerate(by_count[c]) if v <= int(cap * GIB)]
            assert (plan.offload_blocks, TRIMS.index(plan.trim)) == min(fits)
            assert plan.devices[0].total <= cap * GIB


def test_plan_moves_blocks_and_the_latents_stay_the_same(checkpoint):
    reference = stream_clips(loaded(checkpoint, OneDevice("cpu")), fixture_inputs(SET), fixture_settings(SET))
    model = loaded(checkpoint, Offload("cpu", blocks=0, num_layers=LAYERS, slots=LAYERS - 1))
    settings = fixture_settings(SET)
    for count, offloaded, slots in ((LAYERS, list(range(LAYERS)), LAYERS - 1), (0, [], 0)):
        settings.memory_cap_gib = (totals(model, fixture_shape(), False, count)[-1 if count else 0] + 0.5) / GIB
        latents = stream_clips(model, fixture_inputs(SET), settings)
        assert model.placement.offloaded == offloaded and len(model.placement.slots) == slots
        assert relative_l2(latents, reference) < 1e-5


def test_set_blocks_moves_weights_between_host_and_device(checkpoint):
    model = loaded(checkpoint, Offload("cpu", blocks=1, num_layers=LAYERS))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.placement.set_blocks(LAYERS)
    assert model.placement.offloaded == list(range(LAYERS)) and len(model.placement.slots) == min(3, LAYERS)
    model.placement.set_blocks(0)
    assert model.placement.offloaded == [] and model.placement.slots == []
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match=f"offload 0 to {LAYERS}"):
        model.placement.set_blocks(LAYERS + 1)


def test_a_run_that_cannot_fit_fails_before_any_long_work(checkpoint, monkeypatch):
    model = loaded(checkpoint, OneDevice("cpu"))
    monkeypatch.setattr(type(model), "prefill_sink", lambda *a: pytest.fail("prefill ran"))
    settings = fixture_settings(SET)
    settings.kv_fp8, settings.memory_cap_gib = False, 1e-4
    with pytest.raises(MemoryPlanError) as error:
        Streamer(model, fixture_inputs(SET), settings)
    message = str(error.value)
    for words in ("memory_cap_gib 0.0001", "kv_cache fp8", "infer_frames", "raise memory_cap_gib", "KV rings"):
        assert words in message, message


def test_the_error_names_the_offloaded_blocks_that_would_fit():
    """704*384, fp8, one GPU under 30 GiB: the error names offload_blocks N, and an Offload
    placement under the same cap fits with N or fewer blocks."""
    shape = RunShape(48, 88, 48, 4)
    one = ModelSpec.of_config(DiTConfig(), "fp8", OneDevice("meta"), 4)
    with pytest.raises(MemoryPlanError, match=r"offload_blocks (\d+) or more") as error:
        plan_memory(one, shape, True, memory_cap_gib=30)
    import re
    needed = int(re.search(r"offload_blocks (\d+)", str(error.value)).group(1))
    offload = ModelSpec.of_config(DiTConfig(), "fp8", Offload("meta", blocks=0, num_layers=40), 4)
    assert plan_memory(offload, shape, True, memory_cap_gib=30).offload_blocks <= needed
    with pytest.raises(MemoryPlanError) as error:  # the rings alone are 19 GiB: no offloading helps
        plan_memory(one, shape, True, memory_cap_gib=14)
    assert "offload_blocks" not in str(error.value) and "lower the size or infer_frames" in str(error.value)


def test_trimmed_runs_give_the_untrimmed_latents(checkpoint, monkeypatch):
    """Each trimming step (one sink at a time: the pipeline drains once; one block-step per
    attention call; the feed-forward in row chunks) changes the order of the work only."""
    import liveavatar.sampler as sampler
    model = loaded(checkpoint, OneDevice("cpu"))
    settings = fixture_settings(SET)
    whole = stream_clips(model, fixture_inputs(SET), settings)
    plan, refresh = sampler.plan_memory, sampler.Streamer._refresh_sink
    sinks_alive = []
    monkeypatch.setattr(sampler.Streamer, "_refresh_sink", lambda self, *a, **k: (
        refresh(self, *a, **k), sinks_alive.append(len(self.replicas[0].sinks))))
    for trim in TRIMS[1:]:
        monkeypatch.setattr(sampler, "plan_memory", lambda *a, trim=trim, **k: _trimmed(plan(*a, **k), trim))
        sinks_alive.clear()
        assert relative_l2(stream_clips(model, fixture_inputs(SET), settings), whole) < 1e-5
        assert sinks_alive == [1]  # the portrait's sink was gone before the refreshed one was made


def _trimmed(plan, trim):
    plan.trim = trim
    plan.attention_items = trim.attention_items
    return plan


def test_feed_forward_in_row_chunks_is_the_whole():
    from dit_fixture import fixture_model
    block = fixture_model(SET).blocks[0]
    h = torch.randn(6, 13, block.ffn[0].in_features, generator=torch.Generator().manual_seed(0))
    whole = block.feed_forward(h)
    for rows in (1, 16, 40, 77, 78, 500):
        chunked = block.feed_forward_chunked(h, rows)
        assert chunked.shape == whole.shape
        torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)


# ---- the breakdown script ------------------------------------------------------------------------------
def test_memory_breakdown_dry_run_measures_what_the_plan_estimates(tmp_path):
    path = Path(__file__).resolve().parents[1] / "bench" / "memory_breakdown.py"
    spec = importlib.util.spec_from_file_location("memory_breakdown", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    rows = script.main(["--dry", "--sizes", "512*256", "--runs", "fp8,fp8-kvbf16,stepgpu2-fp8",
                        "--infer-frames", "24", "--out-dir", str(tmp_path)])
    assert (tmp_path / "memory_breakdown.md").read_text().count("| KV rings |") == 1
    by_run = {r["run"]: r for r in rows}
    for name, row in by_run.items():
        estimate = next(iter(row["estimate"].values()))
        measured = row.get("per_gpu") or row["measured"]
        for part in ("weights", "KV rings"):
            assert measured[part] == estimate[part], (name, part)
        assert measured["sink"] == estimate["sink"] // 2  # two estimated during the switch; one held at the end
        assert 0 < measured["text/audio context"] <= estimate["text/audio context"]
        assert measured["tick activations"] > 0
    fp8, bf16 = (by_run[name]["measured"]["KV rings"] for name in ("fp8", "fp8-kvbf16"))
    assert fp8 * 128 == bf16 * (64 + 4)  # dim 64: per token 64 fp8 bytes + a 4-byte scale instead of 128 bf16 bytes


def test_cuda_graphs_need_room_for_another_ticks_activations():
    """A run replays its ticks as CUDA graphs (graphs.py) only when the GPU also holds their pool:
    one more tick's activations beside the plan. 384*256, fp8, one GPU: with 80 GiB there is room;
    under a cap that the plan fits with less than that to spare, there is not."""
    shape = RunShape(32, 48, 48, 4)
    one = ModelSpec.of_config(DiTConfig(), "fp8", OneDevice("meta"), 4)
    roomy = plan_memory(one, shape, True, memory_cap_gib=80)
    main = roomy.devices[0]
    activations = main.parts["tick activations"]
    assert roomy.room_for_graphs() and main.limit - main.total > activations
    fixed, share = ALLOCATOR_RESERVE  # the allocator reserve grows with the cap
    without_reserve = main.total - fixed - share * main.limit
    cap = (without_reserve + fixed + activations / 2) / (1 - share)  # half a tick's activations to spare
    tight = plan_memory(one, shape, True, memory_cap_gib=cap / GIB)
    assert tight.devices[0].fits and tight.trim == roomy.trim
    assert 0 < tight.devices[0].limit - tight.devices[0].total < activations and not tight.room_for_graphs()
