"""One copy of each model: our streaming VAE and wav2vec2 built around the core loaders' own
parameters (the very tensors, which the core's model management moves), computing in their
own dtype. The core objects are stand-ins with the attributes ComfyUI's have
(`first_stage_model`, `model`, `patcher`); tests/comfyui_memory_check.py checks the real ones."""
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import relative_l2
from liveavatar.audio import Wav2Vec2Encoder, encode_audio
from liveavatar.shared_weights import bind_parameters, computing_in
from liveavatar.testing import write_tiny_vae, write_tiny_wav2vec2
from liveavatar.vae import VideoVAE, WanVAE, config_from_state_dict
from liveavatar.weights import read_state_dict, safetensors_config
from nodes.vae_adapter import audio_encoder, streaming_vae


def shares_every_parameter(engine_module: nn.Module, core_module: nn.Module):
    core = dict(core_module.named_parameters())
    ours = dict(engine_module.named_parameters())
    assert ours, "no parameters"
    for name, param in ours.items():
        assert param is core[name] and param.data_ptr() == core[name].data_ptr(), name
    return len(ours)


@pytest.fixture(scope="module")
def vae_file(tmp_path_factory):
    return write_tiny_vae(tmp_path_factory.mktemp("vae") / "vae.safetensors")


def core_vae(path):
    """What VAELoader returns, as far as we use it: the network (loaded as ComfyUI loads it,
    in its own module) and its patcher (none outside ComfyUI)."""
    sd = read_state_dict(path)
    with torch.device("meta"):
        network = VideoVAE(**config_from_state_dict(sd))
    network.load_state_dict({k: v.float() for k, v in sd.items()}, assign=True)
    return SimpleNamespace(first_stage_model=network, patcher=None)


def test_streaming_vae_is_the_core_vae_without_a_copy(vae_file):
    core = core_vae(vae_file)
    engine = streaming_vae(core)
    assert shares_every_parameter(engine.net, core.first_stage_model) > 0
    assert (engine.device, engine.dtype) == (torch.device("cpu"), torch.float32)
    owned = WanVAE.load(vae_file)  # the engine's own copy of the same weights
    latents = torch.randn(16, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(engine.decode(latents), owned.decode(latents))
    video = torch.rand(3, 5, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert torch.equal(engine.encode(video), owned.encode(video))


def test_the_owner_moving_its_vae_moves_ours(vae_file):
    """ComfyUI loads and offloads its VAE with Module.to, which keeps each Parameter object
    and swaps its data: the engine built before sees the new tensors."""
    core = core_vae(vae_file)
    engine = streaming_vae(core)
    core.first_stage_model.to(torch.float64)  # a move/cast by the owner (a device move on a GPU machine)
    assert shares_every_parameter(engine.net, core.first_stage_model) > 0
    assert all(p.dtype == torch.float64 for p in engine.net.parameters())


def test_a_vae_that_is_not_wan21_is_named(vae_file):
    with pytest.raises(ValueError, match="VAELoader"):
        streaming_vae(SimpleNamespace(patcher=None))
    sd = {k: v for k, v in read_state_dict(vae_file).items() if not k.startswith("decoder.head")}
    with pytest.raises(ValueError, match="not a Wan2.1 VAE"):
        WanVAE.sharing(sd)


@pytest.fixture(scope="module")
def wav2vec2_file(tmp_path_factory):
    return write_tiny_wav2vec2(tmp_path_factory.mktemp("w2v") / "wav2vec2.safetensors")


def core_audio_encoder(path):
    """What AudioEncoderLoader returns, as far as we use it: wav2vec2 in Hugging Face naming,
    stored in fp16 as ComfyUI stores it, except the positional convolution, which ComfyUI
    builds in fp32."""
    model, sd = _hf_model(read_state_dict(path), safetensors_config(path))
    model.load_state_dict(sd, assign=True)
    model.encoder.pos_conv_embed.float()
    return SimpleNamespace(model=model, patcher=None)


def _hf_model(sd, config):
    from liveavatar.audio import _meta_model, hf_state_dict
    return _meta_model(hf_state_dict(sd), config)


def speech_wave(seconds=0.5):
    t = torch.arange(int(seconds * 16000)) / 16000
    return 0.3 * torch.sin(2 * torch.pi * 210 * t) * (0.6 + 0.4 * torch.sin(2 * torch.pi * 4 * t))


def test_wav2vec2_is_the_core_encoder_without_a_copy(wav2vec2_file):
    """Every parameter is the core's own; on the CPU it computes in fp32 from the fp16-stored
    weights (cast one layer at a time, never stored), giving what our own fp32 copy of the
    same values gives; the stored weights stay as they were."""
    core = core_audio_encoder(wav2vec2_file)
    stored = {n: (p.dtype, p.data_ptr()) for n, p in core.model.named_parameters()}
    encoder = audio_encoder(core)
    assert shares_every_parameter(encoder.model, core.model) == len(stored)
    assert encoder.dtype == torch.float32 and not encoder.owned
    ours = encode_audio(encoder, speech_wave()).features_30hz
    reference = encode_audio(Wav2Vec2Encoder.load(wav2vec2_file), speech_wave()).features_30hz
    assert relative_l2(ours, reference) < 1e-6
    assert {n: (p.dtype, p.data_ptr()) for n, p in core.model.named_parameters()} == stored
    assert {p.dtype for p in core.model.parameters()} == {torch.float16, torch.float32}


def test_wav2vec2_runs_in_half_precision_on_a_gpu():
    """On CUDA the shared encoder computes in fp16 (ComfyUI stores it in fp16 there too)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    from liveavatar.testing import WAV2VEC2_TINY
    from transformers import Wav2Vec2Config, Wav2Vec2Model
    model = Wav2Vec2Model(Wav2Vec2Config(**WAV2VEC2_TINY)).half().cuda()
    encoder = Wav2Vec2Encoder.sharing(dict(model.named_parameters()))
    assert encoder.dtype == torch.float16 and encoder.device.type == "cuda"
    assert torch.isfinite(encoder.hidden_states(speech_wave())).all()


def test_an_audio_encoder_that_is_not_wav2vec2_is_named():
    with pytest.raises(ValueError, match="AudioEncoderLoader"):
        audio_encoder(SimpleNamespace(get_sd=lambda: {}))
    whisper = nn.Module()
    whisper.register_parameter("model_encoder_stub", nn.Parameter(torch.zeros(1)))
    with pytest.raises(ValueError, match="not a wav2vec2 checkpoint"):
        audio_encoder(SimpleNamespace(model=whisper, patcher=None))


# ---- the two mechanisms ---------------------------------------------------------------------
def test_computing_in_casts_per_call_and_restores_even_after_an_error():
    layer = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3)).half()
    weights = {n: p for n, p in layer.named_parameters()}
    x = torch.randn(2, 4)
    expected = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    expected.load_state_dict({k: v.float() for k, v in layer.state_dict().items()})
    with computing_in(layer, torch.float32):
        assert torch.equal(layer(x), expected(x))
    assert {n: p for n, p in layer.named_parameters()} == weights and layer[0].weight.dtype == torch.float16
    with pytest.raises(RuntimeError):
        with computing_in(layer, torch.float32):
            layer(torch.randn(2, 5))  # wrong width: the Linear raises inside its call
    assert {n: p for n, p in layer.named_parameters()} == weights


def test_bind_parameters_names_what_does_not_fit():
    with torch.device("meta"):
        module = nn.Linear(4, 3)
    with pytest.raises(ValueError, match=r"VAE weights do not fit.*missing \['bias'\]"):
        bind_parameters(module, {"weight": torch.zeros(3, 4)}, "VAE")
    with pytest.raises(ValueError, match="wrong shapes"):
        bind_parameters(module, {"weight": torch.zeros(4, 4), "bias": torch.zeros(3)}, "VAE")
