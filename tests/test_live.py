"""Live view: the fragmented MP4 grows block by block and plays; the Live Video node gives the
same frames and latents as Sampler -> Decode, and reports its progress to the browser."""
import struct

import av
import numpy as np
import pytest
import torch

from liveavatar.audio import Wav2Vec2Encoder
from liveavatar.settings import RunOptions
from liveavatar.testing import write_tiny_dit, write_tiny_lora, write_tiny_vae, write_tiny_wav2vec2
from liveavatar.vae import WanVAE
from nodes import host
from nodes.audio import LiveAvatarAudioEncode
from nodes.decode import LiveAvatarDecode
from nodes.live import LIVE_EVENT, LiveAvatarLiveVideo
from nodes.live_mp4 import FragmentedMp4Writer
from nodes.video_writer import prepare_audio
from nodes.loader import LiveAvatarModelLoader
from nodes.sampler import LiveAvatarSampler

RATE = 16000


def speech(seconds=1.2):
    t = np.arange(int(seconds * RATE)) / RATE
    wave = 0.2 * np.sin(2 * np.pi * 180 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
    return {"waveform": torch.from_numpy(wave.astype(np.float32))[None, None], "sample_rate": RATE}


def top_level_boxes(path):
    data, boxes, i = path.read_bytes(), [], 0
    while i + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[i:i + 8])
        boxes.append(kind.decode())
        i += size
    return boxes


def test_fragmented_mp4_has_each_block_on_disk_when_written(tmp_path):
    path = tmp_path / "live.mp4"
    writer = FragmentedMp4Writer(path, 25, 64, 48, prepare_audio(speech(2.0))[0])
    sizes, blocks = [], [9, 12, 12]
    for n in blocks:
        sizes.append(writer.write_block(torch.rand(n, 48, 64, 3)))
        # all frames of the blocks so far but the last one are in complete fragments
        with av.open(str(path)) as partial:
            assert sum(1 for p in partial.demux(video=0) if p.size) == sum(blocks[:len(sizes)]) - 1
    writer.close()
    assert sizes == sorted(sizes) and sizes[0] > 1000
    boxes = top_level_boxes(path)
    assert boxes[:3] == ["ftyp", "moov", "moof"] and boxes.count("moof") >= len(blocks)
    with av.open(str(path)) as video:
        times = [p.pts * p.time_base for p in video.demux(video=0) if p.size]
        assert len(times) == sum(blocks)
        assert [float(t) for t in times] == pytest.approx([i / 25 for i in range(sum(blocks))])
        assert video.streams.audio[0].codec_context.name == "aac"
    assert writer.mime_type.startswith('video/mp4; codecs="avc1.')


def encoded_once(encode):
    """The portrait's encoding, computed for the first run and reused by the runs that follow
    (they must pass the same portrait)."""
    memo = {}

    def encode_portrait(portrait, on_step=None):
        if "portrait" not in memo:
            memo["portrait"], memo["result"] = portrait.clone(), encode(portrait)
        assert torch.equal(portrait, memo["portrait"])
        return memo["result"]
    return encode_portrait


def tiny_models(root, mp) -> dict:
    """The tiny DiT (through the loader), VAE and wav2vec2 written under `root` (the pack's model
    and output folders pointed there with `mp`), a prompt CONDITIONING and a portrait IMAGE."""
    for folder in ("diffusion_models", "loras"):
        (root / folder).mkdir()
    write_tiny_dit(root / "diffusion_models" / "dit.safetensors")
    write_tiny_lora(root / "loras" / "lora.safetensors")
    mp.setenv("LIVEAVATAR_MODELS", str(root))
    mp.setenv("LIVEAVATAR_OUTPUT", str(root / "output"))
    model = LiveAvatarModelLoader().load("dit.safetensors", "lora.safetensors", 1.0, "fp32", "one GPU", 0, "auto")[0]
    vae = WanVAE.load(write_tiny_vae(root / "vae.safetensors"))
    mp.setattr(vae, "encode_portrait", encoded_once(vae.encode_portrait))  # the slowest part on CPU
    encoder = Wav2Vec2Encoder.load(write_tiny_wav2vec2(root / "wav2vec2.safetensors"))
    cond = torch.zeros(1, 512, 4096)
    cond[0, :6] = torch.randn(6, 4096, generator=torch.Generator().manual_seed(0)) * 0.2
    image = torch.rand(1, 96, 128, 3, generator=torch.Generator().manual_seed(1))
    return dict(model=model, vae=vae, encoder=encoder, positive=[[cond, {}]], image=image)


@pytest.fixture(scope="module")
def tiny_graph(tmp_path_factory):
    root = tmp_path_factory.mktemp("live")
    with pytest.MonkeyPatch.context() as mp:
        m = tiny_models(root, mp)
        audio = speech(0.9)  # one clip of 24 frames: two blocks
        features = LiveAvatarAudioEncode().encode(audio, m["encoder"], 24)[0]
        inputs = dict(model=m["model"], positive=m["positive"], image=m["image"], vae=m["vae"], audio_features=features,
                      size="custom", width=64, height=64, infer_frames=24, num_clip=0, sample_steps=2, seed=7)
        yield inputs, audio, root / "output", mp


def test_live_node_equals_sampler_then_decode(tiny_graph):
    inputs, audio, output, mp = tiny_graph
    messages = []
    mp.setattr(host, "send_to_browser", lambda event, data: messages.append((event, data)))
    live = LiveAvatarLiveVideo().generate(**inputs, audio=audio, filename_prefix="live", return_frames=True)
    frames, fps, latents = live["result"]
    latents_ref = LiveAvatarSampler().sample(**inputs)["result"][0]
    frames_ref = LiveAvatarDecode().decode(latents_ref, inputs["vae"], False, True, "x")["result"][0]
    assert torch.equal(latents["samples"], latents_ref["samples"])
    # the decode node gets the latents through LATENT's raw <-> normalised round trip
    assert frames.shape == frames_ref.shape and torch.allclose(frames, frames_ref, atol=1e-4) and fps == 25.0

    path = output / live["ui"]["live_video"][0]["filename"]
    with av.open(str(path)) as video:
        assert sum(1 for p in video.demux(video=0) if p.size) == len(frames)
    assert all(event == LIVE_EVENT for event, _ in messages)
    updates = [data for _, data in messages]
    start, blocks, last = updates[0], [u for u in updates if u["frames"]], updates[-1]
    # the first message comes before any work, so the browser drops the previous run's video
    assert (start["status"], start["frames"], start["bytes"], start["done"]) == ("running", 0, 0, False)
    assert [u["status"] for u in updates] == ["running"] * (len(updates) - 1) + ["finished"]
    done = [u["done"] for u in updates]
    assert done == sorted(done) and done[-1]  # once the file is complete it stays so
    assert last["frames"] == last["total_frames"] == len(frames) and last["reason"] == ""
    assert [u["frames"] for u in blocks] == sorted(u["frames"] for u in blocks)
    assert blocks[0]["frames"] == 9 and blocks[1]["frames"] == 21  # first block drops 3 frames, then 12 each
    assert all(a["bytes"] <= b["bytes"] for a, b in zip(updates, updates[1:]))
    assert last["bytes"] == path.stat().st_size and last["seconds_left"] == 0
    assert start["filename"] == path.name and start["type"] == "output" and blocks[0]["fps"] > 0


def test_warm_up_on_load_leaves_the_model_as_it_was(tiny_graph, monkeypatch):
    """The loader's warm_up: a throw-away run at the chosen size (2 clips of 48 frames, 4 steps:
    2 * 4 blocks * 4 block-steps), once per size and run options for the same weights; afterwards
    a run gives exactly what the model gave before, and no caches of the warm-up are left."""
    import gc
    import weakref
    from liveavatar import sampler as engine
    from nodes import loader as loader_module
    inputs, _, _, _ = tiny_graph
    before = LiveAvatarSampler().sample(**inputs)["result"][0]["samples"]
    runs, streamers = [], []
    real = engine.Streamer

    class Recorded(real):
        def blocks(self, on_step=None):
            streamers.append(weakref.ref(self))
            return super().blocks(on_step)

    monkeypatch.setattr(engine, "Streamer", Recorded)
    monkeypatch.setattr(loader_module, "warm_up",
                        lambda *a, **k: runs.append((a[1], a[2], k["clips"])) or engine.warm_up(*a, **k))
    loader = LiveAvatarModelLoader()
    for size in ("384*256", "384*256", "off", "auto"):  # auto: nothing on the CPU
        model = loader.load("dit.safetensors", "lora.safetensors", 1.0, "fp32", "one GPU", 0, "auto", warm_up=size)[0]
    assert runs == [(256, 384, 2)]
    gc.collect()
    assert len(streamers) == 1 and streamers[0]() is None
    assert model.weights.warmed == {(256, 384, RunOptions())}
    after = LiveAvatarSampler().sample(**dict(inputs, model=model))["result"][0]["samples"]
    assert torch.equal(after, before)
    loader.load("dit.safetensors", "lora.safetensors", 1.0, "fp32", "one GPU", 0, "auto", warm_up="384*256",
                attention="gather")
    assert runs == [(256, 384, 2)] * 2  # other options: warmed again, for what they use
    with pytest.raises(ValueError, match="warm_up must be one of"):
        loader.load("dit.safetensors", "lora.safetensors", 1.0, "fp32", "one GPU", 0, "auto", warm_up="999*1")
    with pytest.raises(ValueError, match="memory_cap_gib must be"):
        loader.load("dit.safetensors", "lora.safetensors", 1.0, "fp32", "one GPU", 0, "auto", memory_cap_gib=float("nan"))
    # weights that alone exceed the cap: said before loading, naming the placement that fits
    with pytest.raises(ValueError, match="weights alone take .* above memory_cap_gib 0.001. To fit: pick 'offload bl"):
        LiveAvatarModelLoader().load("dit.safetensors", "lora.safetensors", 1.0, "fp32", "one GPU", 0, "auto",
                                     memory_cap_gib=0.001)
    with pytest.raises(ValueError, match="To fit: raise offload_blocks"):
        LiveAvatarModelLoader().load("dit.safetensors", "lora.safetensors", 1.0, "fp32", "offload blocks to CPU", 0,
                                     "auto", memory_cap_gib=0.001)


def test_live_video_leaves_the_vae_decode_its_memory_and_the_sampler_does_not(tiny_graph, monkeypatch):
    """Live Video decodes alongside the DiT: its memory plan reserves the streaming decode's working
    memory on the main device (memory.vae_decode_bytes at the portrait's size); the Sampler node,
    whose decode comes later in another node, reserves nothing."""
    from liveavatar import sampler
    from liveavatar.memory import vae_decode_bytes
    inputs, audio, _, _ = tiny_graph
    reserves, plan_memory = [], sampler.plan_memory

    def recording_plan(model, shape, kv_fp8, cap=None, reserve_bytes=0, *args, **kwargs):
        plan = plan_memory(model, shape, kv_fp8, cap, reserve_bytes, *args, **kwargs)
        reserves.append((reserve_bytes, plan.devices[0].parts.get("caller (VAE, audio)", 0)))
        return plan

    monkeypatch.setattr(sampler, "plan_memory", recording_plan)
    LiveAvatarLiveVideo().generate(**inputs, audio=audio, filename_prefix="live", return_frames=False)
    LiveAvatarSampler().sample(**inputs)
    expected = vae_decode_bytes(inputs["width"], inputs["height"])
    assert reserves == [(expected, expected), (0, 0)]


def test_a_node_encodes_the_same_portrait_once(tiny_graph, monkeypatch):
    """A node object keeps its last portrait encoding: the same VAE and portrait again take its
    latents (the run's output unchanged); another node object, or another portrait, encode."""
    inputs, _, _, _ = tiny_graph
    vae = inputs["vae"]
    calls = []
    memoised, real = vae.encode_portrait, WanVAE.encode_portrait.__get__(vae)  # (the fixture's memo: one portrait)

    def counted(portrait, on_step=None):
        calls.append(portrait.shape)
        return (memoised if len(calls) < 3 else real)(portrait, on_step)
    monkeypatch.setattr(vae, "encode_portrait", counted)
    node = LiveAvatarSampler()
    first = node.sample(**inputs)["result"][0]["samples"]
    again = node.sample(**inputs)["result"][0]["samples"]
    assert len(calls) == 1 and torch.equal(first, again)
    LiveAvatarSampler().sample(**inputs)
    assert len(calls) == 2
    node.sample(**dict(inputs, image=inputs["image"].flip(2)))
    assert len(calls) == 3
