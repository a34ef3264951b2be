"""The KV store (liveavatar/kvcache.py) and attention over its segments (liveavatar/attention.py):
exact against softmax attention over the concatenated tokens, the sink held once per model copy,
the fp8 caches' error on the reference fixtures."""
import pytest
import torch

from conftest import fixture_sets, load_tensors, relative_l2
from dit_fixture import fixture_inputs, fixture_model, fixture_settings, stream_clips
from liveavatar import attention, kernels
from liveavatar.attention import KV
from liveavatar.kernels import Kernels

SET = fixture_sets("dit_streaming")[0].values[0]


def softmax_attention(q, k, v):
    """q [n, H, D], k/v [L, H, D] in float64: the definition."""
    q, k, v = q.double(), k.double(), v.double()
    weights = torch.softmax(torch.einsum("nhd,lhd->hnl", q, k) / q.shape[-1] ** 0.5, dim=-1)
    return torch.einsum("hnl,lhd->nhd", weights, v)


def random_segments(batch, fp8: bool, seed=0, heads=2, head_dim=16):
    """[reference keys per block-step, shared values], [shared motion], [a ring per block-step]."""
    g = torch.Generator().manual_seed(seed)

    def tokens(b, length, scale=1.0):
        x = torch.randn(b, length, heads, head_dim, generator=g) * scale
        if not fp8:
            return x, None
        s = x.abs().amax(dim=(-2, -1)) / 448.0
        return (x / s[..., None, None]).to(torch.float8_e4m3fn), s

    ref_k, _ = (torch.randn(batch, 5, heads, head_dim, generator=g), None)
    ref_v, ref_vs = tokens(1, 5)
    motion_k, motion_ks = tokens(1, 7, 2.0)
    motion_v, motion_vs = tokens(1, 7)
    ring_k, ring_ks = tokens(batch, 11)
    ring_v, ring_vs = tokens(batch, 11, 3.0)
    return [KV(ref_k, ref_v, None, ref_vs), KV(motion_k, motion_v, motion_ks, motion_vs),
            KV(ring_k, ring_v, ring_ks, ring_vs)]


def expected(q, segments):
    """Per block-step: softmax attention over the concatenated (dequantised) tokens."""
    out = []
    for j in range(q.shape[0]):
        ks, vs = zip(*(s.values(torch.float64) for s in segments))
        k = torch.cat([t[j if t.shape[0] > 1 else 0] for t in ks])
        v = torch.cat([t[j if t.shape[0] > 1 else 0] for t in vs])
        out.append(softmax_attention(q[j], k, v))
    return torch.stack(out)


@pytest.mark.parametrize("mode", ["auto", "gather"])
@pytest.mark.parametrize("fp8", [False, True])
def test_attention_over_segments_is_attention_over_their_union(monkeypatch, mode, fp8):
    """fp32, CPU: auto merges the ring attended in place with the copied sink parts by their
    log-sum-exp (compute-dtype cache), or dequantises all into one buffer (fp8); gather copies
    all. Both are softmax attention over the union of the tokens."""
    calls = []
    lse = attention.sdpa_lse
    monkeypatch.setattr(attention, "sdpa_lse", lambda *a: (calls.append(1), lse(*a))[1])
    q = torch.randn(3, 6, 2, 16, generator=torch.Generator().manual_seed(1))
    segments = random_segments(3, fp8)
    got = attention.attend(q, segments, Kernels(), gather_all=mode == "gather")
    assert got.shape == q.shape
    torch.testing.assert_close(got.double(), expected(q, segments), rtol=1e-5, atol=1e-5)
    assert len(calls) == (2 if mode == "auto" and not fp8 else 0)


def test_log_sum_exp_merge_is_exact():
    """Attention over [A | B] from attention over A and over B and their log-sum-exps."""
    g = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(2, 9, 3, 8, generator=g), torch.randn(2, 13, 3, 8, generator=g), torch.randn(2, 13, 3, 8, generator=g)
    fx = Kernels()
    parts = [attention.sdpa_lse(q, k[:, :4], v[:, :4], fx), attention.sdpa_lse(q, k[:, 4:], v[:, 4:], fx)]
    scores = torch.einsum("bnhd,blhd->bhnl", q.double(), k[:, :4].double()) / 8 ** 0.5
    torch.testing.assert_close(parts[0][1].double(), torch.logsumexp(scores, -1), rtol=1e-5, atol=1e-5)
    merged = attention.merge(parts, fx)
    want = torch.stack([softmax_attention(q[b], k[b], v[b]) for b in range(2)])
    torch.testing.assert_close(merged.double(), want, rtol=1e-5, atol=1e-5)


def test_a_tick_attends_each_block_step_to_its_sink_and_ring():
    """TickKV: rings written through the store (keys normed + roped, fp32 here), reference keys
    re-roped at each block-step's rolling time, motion/values of the one shared sink; each
    block-step's output = softmax attention over [its reference keys | motion | its ring]."""
    from liveavatar import rope
    from liveavatar.kvcache import BlockStepKV, SinkStore, StepRings, TickKV
    from liveavatar.layers import RMSNorm
    g = torch.Generator().manual_seed(3)
    heads, head_dim, hp, wp = 2, 12, 2, 3
    dim, ft = heads * head_dim, hp * wp
    sink = SinkStore()
    keys, values = torch.randn(ft + 5, heads, head_dim, generator=g), torch.randn(ft + 5, heads, head_dim, generator=g)
    roped = torch.randn(ft + 5, heads, head_dim, generator=g)  # any "roped" keys: stored as given
    sink.keep(0, ft, keys, roped, values, Kernels())
    rings = StepRings(3, 4 * ft, heads, head_dim, ["cpu"], torch.float32)
    norm = RMSNorm(dim, 1e-6)
    items = [BlockStepKV(view, sink, ref_time=30 + j, token_start=5 * ft) for j, view in enumerate(rings.views())]
    for view in rings.views():  # rings already full of earlier tokens
        rings.keys[0][view.index].normal_(generator=g)
        rings.values[0][view.index].normal_(generator=g)
    reference = [rope.grid_tables(item.ref_time, 1, hp, wp, head_dim, "cpu") for item in items]
    rows = torch.stack([rings.rows(item.ring.index, item.token_start, ft, "cpu") for item in items])
    tick = TickKV(items, reference, rows, Kernels())
    k_new, v_new = torch.randn(3 * ft, dim, generator=g), torch.randn(3 * ft, heads, head_dim, generator=g)
    cos, sin = rope.grid_tables(5, 1, hp, wp, head_dim, "cpu")
    cos, sin = cos.repeat(3, 1, 1), sin.repeat(3, 1, 1)
    tick.write(0, norm, k_new, v_new, cos, sin)
    assert tick.valid == [4 * ft] * 3
    q = torch.randn(3, ft, heads, head_dim, generator=g)
    got = tick.attend(0, q)
    for j in range(3):
        rows = slice(ft, 2 * ft)  # token_start 5*ft mod 4*ft
        written = rope.apply_rope(norm(k_new[j * ft:(j + 1) * ft]).unflatten(-1, (heads, head_dim)),
                                  cos[:ft], sin[:ft])
        torch.testing.assert_close(rings.keys[0][j, rows], written)
        ref = rope.apply_rope(keys[:ft], *rope.grid_tables(30 + j, 1, hp, wp, head_dim, "cpu"))
        k = torch.cat([ref, roped[ft:], rings.keys[0][j]])
        v = torch.cat([values, rings.values[0][j]])
        torch.testing.assert_close(got[j].double(), softmax_attention(q[j], k, v), rtol=1e-5, atol=1e-5)


def test_sink_is_held_once_for_all_steps(monkeypatch):
    """One SinkStore per model copy whatever the step count, with the bytes its layout says:
    per layer reference keys (compute dtype), motion keys and all values (fp8 + a scale per
    token, or compute dtype)."""
    from liveavatar.sampler import Streamer
    model = fixture_model(SET)
    cfg = model.cfg
    for fp8, size in ((False, 4), (True, 1)):  # fp32 model: fp32 or fp8 caches
        settings = fixture_settings(SET)
        settings.kv_fp8 = fp8
        streamer = Streamer(model, fixture_inputs(SET), settings)
        sinks = {id(s) for r in streamer.replicas for s in r.sinks.values()}
        assert len(sinks) == 1 and len(streamer.replicas) == 1
        sink = streamer.replicas[0].sinks[0]
        ft = streamer.frame_tokens
        h, w = streamer.latent_size  # reference frame + FramePack motion: 1 latent at 1x, 2 at 2x, 16 at 4x
        assert sink.length == ft + ft + (h // 4) * (w // 4) + 4 * (h // 8) * (w // 8)
        per_layer = 2 * sink.length * (cfg.dim * (size if fp8 else 4) + (4 if fp8 else 0))
        assert sink.nbytes() == cfg.num_layers * per_layer
        ring = streamer.latent_frames * ft
        per_layer = settings.steps * ring * 2 * (cfg.dim * size + (4 if fp8 else 0))
        assert streamer.caches[0].group.nbytes() == cfg.num_layers * per_layer


def fixture_run(set_dir, kv_fp8):
    """The bf16 model (what bf16 and fp8 weights compute in) on a fixture: (first block's
    prediction, clean latents of every clip)."""
    from liveavatar.sampler import Streamer
    model = fixture_model(set_dir).to(torch.bfloat16)
    settings = fixture_settings(set_dir)
    settings.kv_fp8 = kv_fp8
    streamer = Streamer(model, fixture_inputs(set_dir), settings)
    first = streamer.predict(streamer.clip_noise(0)[:, :3], step=0, clip=0, block=0).float()
    return first, stream_clips(model, fixture_inputs(set_dir), settings).float()


# fp8 caches against bf16 caches, bf16 model, relative L2 (measured on CPU, the two fixture sets):
# first block 5.0e-3 / 6.4e-3, clean latents 3.2e-3 / 2.9e-3; against the fp32 reference the bf16
# model is at 5.8e-3 / 7.9e-3 (first block) with bf16 caches and 6.2e-3 / 8.3e-3 with fp8 caches.
# (fp32 model: fp8 vs fp32 caches 2.3e-3 / 3.8e-3 and 1.4e-3 / 1.1e-3.) So fp8 caches add less
# error than bf16 arithmetic itself has; the bound is 3x the largest measured value.
FP8_KV_TOLERANCE = 0.02


@pytest.mark.parametrize("set_dir", fixture_sets("dit_streaming"))
def test_parity_fp8_caches_stay_close_to_bf16_caches(set_dir):
    expected = load_tensors(set_dir, "dit_streaming", prefix="outputs.")
    (first8, latents8), (first16, latents16) = fixture_run(set_dir, True), fixture_run(set_dir, False)
    assert relative_l2(first8, first16) < FP8_KV_TOLERANCE
    assert relative_l2(latents8, latents16) < FP8_KV_TOLERANCE
    assert relative_l2(first8, expected["first_block_first_step_prediction"]) < FP8_KV_TOLERANCE
    assert relative_l2(latents8, expected["clean_latents"]) < FP8_KV_TOLERANCE


def test_fp8_is_the_default_cache_for_16_bit_models():
    from liveavatar.sampler import StreamSettings, _sixteen_bit
    assert StreamSettings().kv_fp8 is None
    model = fixture_model(SET)
    assert not _sixteen_bit(model)
    assert _sixteen_bit(model.to(torch.bfloat16))


# ---- the fused dequantise / merge kernels (Triton interpreter on CPU) ---------------------------
def test_dequantize_and_merge_kernels_match_their_references(monkeypatch):
    pytest.importorskip("triton")
    import os
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and Triton's interpreter not selected")
    from test_kernels import exact_interpreter_casts
    fx = Kernels("on")
    if not torch.cuda.is_available():
        exact_interpreter_casts(monkeypatch)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert fx.active_for(torch.zeros(1, device=device)), fx.status()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 6, 3, 40, generator=g)
    scales = x.abs().amax(dim=(-2, -1)) / 448.0
    stored = (x / scales[..., None, None]).to(torch.float8_e4m3fn).to(device)
    buffer = torch.zeros(2, 9, 3, 40, dtype=torch.bfloat16, device=device)
    fx.dequantize_tokens(stored, scales.to(device), buffer[:, 2:8])  # broadcast into a slice
    want = (stored.float() * scales.to(device)[..., None, None]).to(torch.bfloat16)
    assert torch.equal(buffer[:, 2:8], want.expand(2, -1, -1, -1))
    assert (buffer[:, :2] == 0).all() and (buffer[:, 8:] == 0).all()
    outs = [torch.randn(2, 5, 3, 40, generator=g).to(device, torch.bfloat16) for _ in range(2)]
    lses = [(torch.randn(2, 3, 5, generator=g) * 4).to(device) for _ in range(2)]
    got = fx.merge_attention([(outs[0], lses[0]), (outs[1].transpose(0, 0), lses[1])])
    want = kernels.merge_attention_reference(list(zip(outs, lses)))
    assert (got.float() - want.float()).abs().max() <= want.float().abs().max() * 2 ** -7


@pytest.mark.parametrize("real, count", [(5, 19), (5, 1), (0, 24), (24, 0)])
def test_prompt_padding_kept_once_attends_like_every_padding_row(monkeypatch, real, count):
    """The prompt's keys/values with one padding row standing for `count` identical rows give
    the attention over all of them (what the original computes on the zero-padded prompt);
    also through the fallback without a log-sum-exp attention."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(7, 2, 16, generator=g)
    k, v = torch.randn(real + (count > 0), 2, 16, generator=g), torch.randn(real + (count > 0), 2, 16, generator=g)
    full_k = torch.cat([k[:real], k[real:].expand(count, -1, -1)])
    full_v = torch.cat([v[:real], v[real:].expand(count, -1, -1)])
    want = softmax_attention(q, full_k, full_v)
    torch.testing.assert_close(attention.attend_repeated_last(q, k, v, count, Kernels()).double(), want, rtol=1e-5,
                               atol=1e-5)
    monkeypatch.setattr(attention, "_has_lse", lambda q, kernels: False)
    torch.testing.assert_close(attention.attend_repeated_last(q, k, v, count, Kernels()).double(), want, rtol=1e-5,
                               atol=1e-5)
