"""CUDA-only: the fp8, offload and sharded modes against plain bf16 on one GPU (tiny config).

Skipped cleanly without a GPU (CI); run on the GPU machine with `pytest tests/test_cuda.py`.
"""
import pytest
import torch

from conftest import fixture_sets, relative_l2
from dit_fixture import fixture_config, fixture_inputs, fixture_settings, fixture_weights, stream_clips, write_checkpoint
from liveavatar.loading import load_dit
from liveavatar.placement import Offload, OneDevice, Sharded, StepPerGPU
from liveavatar.settings import RunOptions

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
SET = fixture_sets("dit_streaming")[0].values[0] if torch.cuda.is_available() else None


def run(checkpoint, storage, placement, kv_fp8=False, options=RunOptions()):
    model = load_dit(checkpoint, storage=storage, placement=placement, config=fixture_config(SET), options=options)
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


def test_two_models_with_kernels_on_and_off_interleaved_on_gpu(checkpoint, bf16, monkeypatch):
    """A kernels-auto and a kernels-off model, blocks made alternately: each gives its blocks made
    alone, bit for bit; the Triton kernels launch for the first model's blocks only (every tick
    queued kernel by kernel: a replayed CUDA graph launches none from Python)."""
    from test_settings import count_launches
    from liveavatar.sampler import stream
    models = {name: load_dit(checkpoint, storage="bf16", placement=OneDevice("cuda"), config=fixture_config(SET),
                             options=RunOptions(kernels=name, cuda_graphs="off")) for name in ("auto", "off")}
    launches = count_launches(monkeypatch)
    alone = {name: [b.latents.cpu() for b in stream(m, fixture_inputs(SET), fixture_settings(SET))]
             for name, m in models.items()}
    runs = {name: stream(m, fixture_inputs(SET), fixture_settings(SET)) for name, m in models.items()}
    for i in range(len(alone["auto"])):
        for name in ("auto", "off"):
            before = len(launches)
            assert torch.equal(next(runs[name]).latents.cpu(), alone[name][i]), (name, i)
            assert (len(launches) > before) == (name == "auto"), (name, i)
    assert relative_l2(torch.cat(alone["off"], 1).float(), torch.cat(alone["auto"], 1).float()) < 1e-2
    assert models["auto"].kernels.status().startswith("fused kernels: on")


def test_fp8_compute_dequantize_skips_the_fp8_products(checkpoint, bf16, monkeypatch):
    """fp8 weights, fp8_compute dequantize: no torch._scaled_mm call at all (auto: the fp8
    products, on a GPU that has them), and as close to the bf16 model as auto."""
    products = []
    real = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: (products.append(1), real(*a, **k))[1])
    dequantized = run(checkpoint, "fp8", OneDevice("cuda"), options=RunOptions(fp8_compute="dequantize"))
    assert products == []
    fp8 = run(checkpoint, "fp8", OneDevice("cuda"))
    if torch.cuda.get_device_capability() >= (8, 9):
        assert products
    assert relative_l2(dequantized, bf16) < 0.15 and relative_l2(dequantized, fp8) < 0.15


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
    """As Live Video runs it: the decoder primed on the side stream before the first block is
    asked for, each block's frames and clean latents brought to pinned CPU memory there."""
    from liveavatar.decoding import VideoDecoder
    from liveavatar.overlap import decode_alongside
    from liveavatar.sampler import Block
    from liveavatar.vae import VideoVAE, WanVAE
    torch.manual_seed(0)
    with torch.device("cuda"):
        vae = WanVAE(VideoVAE(dim=8, z_dim=16), "cuda", torch.float32)
    motion, latents = torch.randn(16, 19, 8, 8, device="cuda"), torch.randn(16, 9, 8, 8, device="cuda")
    blocks = [Block(0, i, latents[:, 3 * i:3 * i + 3]) for i in range(3)]
    inline = VideoDecoder(vae, motion)
    expected = [inline.decode(b.latents).cpu() for b in blocks]
    overlapped = VideoDecoder(vae, motion)
    got = list(decode_alongside(iter(blocks), lambda x: (overlapped.decode(x), x.float()), "cuda", overlapped.prime))
    assert [b.index for b, _ in got] == [0, 1, 2]
    for (block, (frames, clean)), want in zip(got, expected):
        assert frames.device.type == clean.device.type == "cpu" and frames.is_pinned()
        assert torch.equal(frames, want) and torch.equal(clean, block.latents.cpu())


def test_latents_reach_the_cpu_one_block_behind_on_gpu():
    """The Sampler node's copies: each block's latents in pinned CPU memory, equal to a plain
    .cpu(), handed over only once the next block was asked for (the first at once)."""
    from liveavatar.overlap import latents_on_cpu
    from liveavatar.sampler import Block
    latents = torch.randn(3, 16, 3, 8, 8, device="cuda", dtype=torch.bfloat16)
    asked = []

    def blocks():
        for i in range(3):
            asked.append(i)
            yield Block(0, i, latents[i] * 1)  # a fresh tensor per block, as the sampler's

    handed = []  # (block handed over, last block asked for by then)
    for block in latents_on_cpu(blocks()):
        handed.append((block.index, asked[-1]))
        assert block.latents.device.type == "cpu" and block.latents.is_pinned()
        assert torch.equal(block.latents, latents[block.index].float().cpu())
    assert handed == [(0, 0), (1, 2), (2, 2)]


def test_session_decode_queue_hands_each_block_over_when_decoded_on_gpu():
    """A live session's DecodeQueue on CUDA: the inline frames, in order; a block's frames come out
    without the next block (ready(wait=False) once its side-stream decode is done)."""
    import time
    from liveavatar.decoding import VideoDecoder
    from liveavatar.overlap import DecodeQueue
    from liveavatar.sampler import Block
    from liveavatar.vae import VideoVAE, WanVAE
    torch.manual_seed(0)
    with torch.device("cuda"):
        vae = WanVAE(VideoVAE(dim=8, z_dim=16), "cuda", torch.float32)
    motion, latents = torch.randn(16, 19, 8, 8, device="cuda"), torch.randn(16, 9, 8, 8, device="cuda")
    blocks = [Block(0, i, latents[:, 3 * i:3 * i + 3]) for i in range(3)]
    inline = VideoDecoder(vae, motion)
    expected = [inline.decode(b.latents).cpu() for b in blocks]
    queued = VideoDecoder(vae, motion)
    queue = DecodeQueue(queued.decode, "cuda", prepare=queued.prime)  # primed while no block is there yet
    got = []
    for block in blocks:
        queue.put(block)
        deadline = time.time() + 30
        while len(got) <= block.index and time.time() < deadline:  # no next block needed
            got += queue.ready()
        assert len(got) == block.index + 1
    assert queue.ready(wait=True) == []
    for (block, frames), want in zip(got, expected):
        assert torch.equal(frames, want)


# ---- issue 19: LoRA strength and shared weights on a GPU ---------------------------------------
def strength_model(checkpoint, storage, placement, strength, lora, config):
    """Built as the loader builds it inside ComfyUI: computed on the GPU, kept on the CPU (its
    offload device), then moved in (what ComfyUI's load_models_gpu does)."""
    from nodes.loader import resident_modules
    model = load_dit(checkpoint, lora=lora, lora_strength=strength, storage=storage, placement=placement,
                     config=config, offload_device="cpu")
    for module in resident_modules(model, placement):
        module.to(placement.device)
    return model


@pytest.mark.parametrize("storage", ["bf16", "fp8"])
@pytest.mark.parametrize("where", ["one GPU", "offload", "per GPU"])
def test_strength_changes_bit_for_bit_on_gpu(storage, where, tmp_path):
    import random
    from conftest import load_manifest
    from liveavatar.loading import Checkpoint, Lora, set_lora_strength
    if where == "per GPU" and torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    lora_set = fixture_sets("lora_merge")[0].values[0]  # its base: the dit_streaming weights of its own folder
    lora = Lora.read(lora_set / "lora.safetensors", alpha=load_manifest(lora_set, "lora_merge")["alpha"])
    checkpoint = write_checkpoint(fixture_weights(lora_set), tmp_path / "dit.safetensors")
    config = fixture_config(lora_set)
    layers = config.num_layers
    place = {"one GPU": lambda: OneDevice("cuda"), "offload": lambda: Offload("cuda", blocks=1, num_layers=layers),
             "per GPU": lambda: StepPerGPU(["cuda:0", "cuda:1"])}[where]
    opened = Checkpoint.open(checkpoint)
    model = strength_model(opened, storage, place(), 1.0, lora, config)
    rng = random.Random(0)
    strengths = [rng.uniform(0.0, 2.0) for _ in range(41)]
    for strength in strengths:
        set_lora_strength(model, opened, lora, strength)
    fresh = strength_model(opened, storage, place(), strengths[-1], lora, config)
    for copy, same in zip(model.copies(), fresh.copies()):
        mine, theirs = copy.state_dict(), same.state_dict()
        differ = [n for n in theirs if not torch.equal(mine[n].cpu().reshape(-1).view(torch.uint8),
                                                        theirs[n].cpu().reshape(-1).view(torch.uint8))]
        assert differ == []


def test_shared_vae_and_wav2vec2_on_gpu(tmp_path):
    """Around a GPU owner's weights: the VAE in its bf16, wav2vec2 computing in fp16 from fp16
    weights (its positional convolution fp32, as ComfyUI keeps it), close to our fp32 copy."""
    from liveavatar.audio import Wav2Vec2Encoder, _meta_model, hf_state_dict
    from liveavatar.testing import write_tiny_vae, write_tiny_wav2vec2
    from liveavatar.vae import WanVAE
    from liveavatar.weights import read_state_dict, safetensors_config
    owner = WanVAE.load(write_tiny_vae(tmp_path / "vae.safetensors"), device="cuda", dtype=torch.bfloat16)
    shared = WanVAE.sharing(dict(owner.net.named_parameters()))
    latents = torch.randn(16, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    assert (shared.device.type, shared.dtype) == ("cuda", torch.bfloat16)
    assert torch.equal(shared.decode(latents), owner.decode(latents))
    path = write_tiny_wav2vec2(tmp_path / "w2v.safetensors")
    model, sd = _meta_model(hf_state_dict(read_state_dict(path)), safetensors_config(path))
    model.load_state_dict(sd, assign=True)
    model = model.cuda()
    model.encoder.pos_conv_embed.float()
    encoder = Wav2Vec2Encoder.sharing(dict(model.named_parameters()), {"num_attention_heads": 2})
    t = torch.arange(8000) / 16000
    wave = 0.3 * torch.sin(2 * torch.pi * 220 * t)
    assert encoder.dtype == torch.float16
    assert relative_l2(encoder.hidden_states(wave), Wav2Vec2Encoder.load(path).hidden_states(wave)) < 5e-3


@pytest.mark.parametrize("fp8", [False, True])
def test_attention_over_cache_segments_on_gpu(fp8):
    """bf16 caches: the ring attended in place (cuDNN / flash with log-sum-exp) merged with the
    copied sink parts by the merge kernel; fp8 caches: all dequantised into one buffer by the
    dequantise kernel. Both against softmax attention over the concatenated tokens in fp32."""
    from test_kvcache import expected, random_segments
    from liveavatar import attention
    from liveavatar.kernels import Kernels

    def on_gpu(t):  # fp8 tokens and their fp32 scales as they are; float tokens as bf16
        if t is None:
            return None
        return t.cuda() if t.dtype == torch.float8_e4m3fn or t.dim() == 2 else t.to("cuda", torch.bfloat16)

    segments = [attention.KV(*(on_gpu(t) for t in (s.k, s.v, s.k_scale, s.v_scale)))
                for s in random_segments(3, fp8, head_dim=128, heads=4)]
    q = torch.randn(3, 6, 4, 128, generator=torch.Generator().manual_seed(1)).to("cuda", torch.bfloat16)
    got = attention.attend(q, segments, Kernels())
    want = expected(q.float().cpu(), [attention.KV(*(t.cpu() if t is not None else None for t in
                                                      (s.k, s.v, s.k_scale, s.v_scale))) for s in segments])
    assert relative_l2(got.float().cpu(), want) < 1e-2


def test_prompt_padding_kept_once_on_gpu():
    from liveavatar import attention
    from liveavatar.kernels import Kernels
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(n, 40, 128, generator=g).to("cuda", torch.bfloat16) for n in (300, 21, 21))
    full = [torch.cat([t[:-1], t[-1:].expand(492, -1, -1)]) for t in (k, v)]
    want = torch.nn.functional.scaled_dot_product_attention(*(t.float().transpose(0, 1) for t in (q, *full)))
    got = attention.attend_repeated_last(q, k, v, 492, Kernels())
    assert relative_l2(got.float(), want.transpose(0, 1)) < 1e-2


def test_other_tensors_on_the_gpu_count_against_the_cap(checkpoint):
    """memory_cap_gib stands for the whole card: tensors of other models in the process (wav2vec2,
    the VAE, ...) leave the run that much less; the model's own weights are not counted twice."""
    from liveavatar.memory import GIB, RunShape, plan_memory
    model = load_dit(checkpoint, storage="bf16", placement=OneDevice("cuda"), config=fixture_config(SET))
    inputs, settings = fixture_inputs(SET), fixture_settings(SET)
    shape = RunShape(*inputs.ref_latent.shape[-2:], settings.infer_frames, settings.steps,
                     text_tokens=inputs.text.shape[0] + 1)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    alone = plan_memory(model, shape, False, memory_cap_gib=4.0).devices[0].limit
    other = torch.empty(GIB // 4, dtype=torch.uint8, device="cuda")
    beside = plan_memory(model, shape, False, memory_cap_gib=4.0).devices[0].limit
    own = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    assert alone == 4 * GIB - (before - own)
    assert alone - beside == other.numel()


def test_streaming_audio_after_warm_up_runs_on_its_own_stream_on_gpu():
    """After warm_up a live session's wav2vec2 runs on a CUDA stream of its own, so reading its
    features back does not wait for the DiT work queued on the current stream; the features are
    those of a stream without it (same kernels, another stream)."""
    from conftest import load_manifest, load_tensors
    from liveavatar.audio import Wav2Vec2Encoder
    from liveavatar.audio_stream import StreamingAudioEncoder
    from liveavatar.testing import speech_like
    audio_set = fixture_sets("audio")[0].values[0]
    encoder = Wav2Vec2Encoder.from_state_dict(load_tensors(audio_set, "audio", prefix="weights."),
                                              load_manifest(audio_set, "audio")["config"], device="cuda")
    wave = torch.from_numpy(speech_like(3.0, seed=3))
    runs = {}
    for warm in (True, False):
        stream = StreamingAudioEncoder(encoder, left_context_s=0.5, lookahead_s=0.26)
        if warm:
            stream.warm_up()
            assert stream.cuda_stream is not None and stream.cuda_stream != torch.cuda.current_stream()
        busy = torch.randn(4096, 4096, device="cuda")
        for _ in range(20):  # queued on the current stream while the audio is encoded
            busy = busy @ busy / 64
        runs[warm] = [b for start in range(0, wave.numel(), 1600) for b in stream.feed(wave[start:start + 1600])]
        runs[warm] += stream.flush()
    assert len(runs[True]) == len(runs[False])
    assert all(relative_l2(a, b) < 1e-6 for a, b in zip(runs[True], runs[False]))


@pytest.mark.parametrize("storage, kv_fp8", [("bf16", False), ("fp8", True)])
def test_cuda_graphs_give_the_run_kernel_by_kernel(checkpoint, storage, kv_fp8):
    """6 clips on one GPU (liveavatar/graphs.py): the steady ticks captured and replayed, the
    latents those of the same run with cuda_graphs off; the graphs' memory back after each run
    (the first run leaves the capture stream's library workspaces, kept with the model)."""
    import gc
    from liveavatar.sampler import StreamSettings, Streamer
    from test_graphs import inputs_for
    model = load_dit(checkpoint, storage=storage, placement=OneDevice("cuda"), config=fixture_config(SET))
    settings = StreamSettings(infer_frames=24, steps=4, seed=5, kv_fp8=kv_fp8)

    def once(cuda_graphs, first=False):
        model.use_options(RunOptions(cuda_graphs=cuda_graphs))
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        streamer = Streamer(model, inputs_for(6, 24), settings)
        latents = torch.cat([block.latents for block in streamer.blocks()], dim=1).float().cpu()
        replays = streamer.graphs.replays if streamer.graphs is not None else 0
        streamer.close()
        del streamer
        gc.collect()
        torch.cuda.synchronize()
        assert first or torch.cuda.memory_allocated() == before
        return latents, replays

    once("auto", first=True)
    graphed, replays = once("auto")
    plain, none = once("off")
    assert replays > 0 and none == 0
    assert relative_l2(graphed, plain) < 1e-6
