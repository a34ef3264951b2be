"""CUDA-only: the fp8, offload and sharded modes against plain bf16 on one GPU (tiny config).

Skipped cleanly without a GPU (CI); run on the GPU machine with `pytest tests/test_cuda.py`.
"""
import pytest
import torch

from conftest import fixture_sets, relative_l2
from dit_fixture import fixture_config, fixture_inputs, fixture_settings, fixture_weights, stream_clips, write_checkpoint
from liveavatar.loading import load_dit
from liveavatar.placement import Offload, OneDevice, Sharded, StepPerGPU

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
SET = fixture_sets("dit_streaming")[0].values[0] if torch.cuda.is_available() else None


def run(checkpoint, storage, placement, kv_fp8=False):
    model = load_dit(checkpoint, storage=storage, placement=placement, config=fixture_config(SET))
    settings = fixture_settings(SET)
    settings.kv_fp8 = kv_fp8
    torch.cuda.reset_peak_memory_stats()
    latents = stream_clips(model, fixture_inputs(SET), settings)
    return latents.float().cpu()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(fixture_weights(SET), tmp_path_factory.mktemp("ckpt") / "dit.safetensors")


@pytest.fixture(scope="module")
def bf16(checkpoint):
    return run(checkpoint, "bf16", OneDevice("cuda"))


def test_bf16_on_gpu_follows_fp32_cpu(checkpoint, bf16):
    reference = run_cpu_fp32(checkpoint)
    assert relative_l2(bf16, reference) < 0.05


def run_cpu_fp32(checkpoint):
    model = load_dit(checkpoint, storage="fp32", config=fixture_config(SET))
    return stream_clips(model, fixture_inputs(SET), fixture_settings(SET))


def test_fp8_weights_close_to_bf16(checkpoint, bf16):
    assert relative_l2(run(checkpoint, "fp8", OneDevice("cuda")), bf16) < 0.15


def test_fp8_kv_cache_close_to_bf16(checkpoint, bf16):
    assert relative_l2(run(checkpoint, "bf16", OneDevice("cuda"), kv_fp8=True), bf16) < 0.05


@pytest.mark.parametrize("blocks", [1, 3])
def test_offload_equals_bf16(checkpoint, bf16, blocks):
    layers = fixture_config(SET).num_layers
    latents = run(checkpoint, "bf16", Offload("cuda", blocks=min(blocks, layers), num_layers=layers))
    assert torch.equal(latents, bf16)


def test_offloaded_fp8_storage_close_to_bf16(checkpoint, bf16):
    layers = fixture_config(SET).num_layers
    latents = run(checkpoint, "fp8", Offload("cuda", blocks=layers, num_layers=layers))
    assert relative_l2(latents, bf16) < 0.15


@pytest.mark.parametrize("slots", [2, 3])
def test_offloaded_fp8_computes_as_in_place_fp8(checkpoint, slots):
    """fp8 weights streamed into the slots run the same fp8 kernels as fp8 weights kept on the GPU."""
    layers = fixture_config(SET).num_layers
    in_place = run(checkpoint, "fp8", OneDevice("cuda"))
    offloaded = run(checkpoint, "fp8", Offload("cuda", blocks=layers, num_layers=layers, slots=slots))
    assert torch.equal(offloaded, in_place), f"relative L2 {relative_l2(offloaded, in_place):.2e}"


def test_ffn_gelu_in_the_matmul_epilogue_is_linear_then_tanh_gelu():
    from liveavatar.layers import Linear
    g = torch.Generator().manual_seed(0)
    linear = Linear(256, 512).to("cuda", torch.bfloat16)
    x = torch.randn(100, 256, generator=g).to("cuda", torch.bfloat16)
    want = torch.nn.functional.gelu(linear(x).float(), approximate="tanh")
    assert relative_l2(linear.forward_gelu(x).float(), want) < 1e-2


def test_sharded_equals_bf16(checkpoint, bf16):
    cfg = fixture_config(SET)
    devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.device_count() > 1 else ["cuda:0", "cuda:0"]
    latents = run(checkpoint, "bf16", Sharded(devices, cfg.num_layers))
    assert relative_l2(latents, bf16) < 1e-3


def test_one_step_per_gpu_equals_one_gpu(checkpoint, bf16):
    """Real GPUs when there are two or more, else two copies on the one GPU (same code path)."""
    count = torch.cuda.device_count()
    devices = [f"cuda:{i}" for i in range(count)] if count > 1 else ["cuda:0", "cuda:0"]
    latents = run(checkpoint, "bf16", StepPerGPU(devices[:fixture_settings(SET).steps]))
    assert relative_l2(latents, bf16) < 1e-2


def test_pipelined_equals_sequential_on_gpu(checkpoint, bf16):
    model = load_dit(checkpoint, storage="bf16", placement=OneDevice("cuda"), config=fixture_config(SET))
    settings = fixture_settings(SET)
    settings.pipelined = False
    sequential = stream_clips(model, fixture_inputs(SET), settings).float().cpu()
    assert relative_l2(sequential, bf16) < 1e-2


def test_decode_alongside_gives_the_inline_frames():
    from liveavatar.overlap import decode_alongside
    from liveavatar.sampler import Block
    from liveavatar.vae import VideoVAE, WanVAE
    torch.manual_seed(0)
    with torch.device("cuda"):
        vae = WanVAE(VideoVAE(dim=8, z_dim=16), "cuda", torch.float32)
    latents = torch.randn(16, 10, 8, 8, device="cuda")
    blocks = [Block(0, i, latents[:, 1 + 3 * i:4 + 3 * i]) for i in range(3)]
    inline = vae.stream_decoder()
    inline.decode(latents[:, :1])
    expected = [inline.decode(b.latents).cpu() for b in blocks]
    overlapped = vae.stream_decoder()
    overlapped.decode(latents[:, :1])
    got = list(decode_alongside(iter(blocks), overlapped.decode, "cuda"))
    assert [b.index for b, _ in got] == [0, 1, 2]
    for (_, frames), want in zip(got, expected):
        assert torch.equal(frames, want)


@pytest.mark.parametrize("fp8", [False, True])
def test_attention_over_cache_segments_on_gpu(fp8):
    """bf16 caches: the ring attended in place (cuDNN / flash with log-sum-exp) merged with the
    copied sink parts by the merge kernel; fp8 caches: all dequantised into one buffer by the
    dequantise kernel. Both against softmax attention over the concatenated tokens in fp32."""
    from test_kvcache import expected, random_segments
    from liveavatar import attention

    def on_gpu(t):  # fp8 tokens and their fp32 scales as they are; float tokens as bf16
        if t is None:
            return None
        return t.cuda() if t.dtype == torch.float8_e4m3fn or t.dim() == 2 else t.to("cuda", torch.bfloat16)

    segments = [attention.KV(*(on_gpu(t) for t in (s.k, s.v, s.k_scale, s.v_scale)))
                for s in random_segments(3, fp8, head_dim=128, heads=4)]
    q = torch.randn(3, 6, 4, 128, generator=torch.Generator().manual_seed(1)).to("cuda", torch.bfloat16)
    got = attention.attend(q, segments)
    want = expected(q.float().cpu(), [attention.KV(*(t.cpu() if t is not None else None for t in
                                                      (s.k, s.v, s.k_scale, s.v_scale))) for s in segments])
    assert relative_l2(got.float().cpu(), want) < 1e-2


def test_prompt_padding_kept_once_on_gpu():
    from liveavatar import attention
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(n, 40, 128, generator=g).to("cuda", torch.bfloat16) for n in (300, 21, 21))
    full = [torch.cat([t[:-1], t[-1:].expand(492, -1, -1)]) for t in (k, v)]
    want = torch.nn.functional.scaled_dot_product_attention(*(t.float().transpose(0, 1) for t in (q, *full)))
    got = attention.attend_repeated_last(q, k, v, 492)
    assert relative_l2(got.float(), want.transpose(0, 1)) < 1e-2
