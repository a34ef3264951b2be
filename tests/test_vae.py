"""Wan2.1 VAE against the original's fixtures, file layouts, and streaming memory."""
import pytest
import torch
from safetensors.torch import save_file

from conftest import fixture_sets, load_manifest, load_tensors, relative_l2
from liveavatar.vae import WanVAE

SETS = fixture_sets("vae")


def fixture_vae(set_dir, **kwargs) -> WanVAE:
    constants = load_tensors(set_dir, "vae", prefix="constants.")
    return WanVAE.from_state_dict(load_tensors(set_dir, "vae", prefix="weights."), mean=constants["latent_mean"],
                                  std=constants["latent_std"], **kwargs)


def tolerance(set_dir):
    return load_manifest(set_dir, "vae")["tolerance"]["relative_l2"]


def outputs(set_dir):
    return load_tensors(set_dir, "vae", prefix="outputs.")


@pytest.mark.parametrize("set_dir", SETS)
def test_parity_vae_encode(set_dir):
    video = load_tensors(set_dir, "vae", prefix="inputs.")["video"]
    assert relative_l2(fixture_vae(set_dir).encode(video), outputs(set_dir)["latents"]) < tolerance(set_dir)


@pytest.mark.parametrize("set_dir", SETS)
def test_parity_vae_full_decode(set_dir):
    decoded = fixture_vae(set_dir).decode(outputs(set_dir)["latents"])
    assert relative_l2(decoded, outputs(set_dir)["decoded"]) < tolerance(set_dir)


@pytest.mark.parametrize("set_dir", SETS)
def test_parity_vae_stream_decode_one_then_threes(set_dir):
    latents = outputs(set_dir)["latents"]
    decoder = fixture_vae(set_dir).stream_decoder()
    chunks = [decoder.decode(latents[:, :1], clamp=False)]
    chunks += [decoder.decode(latents[:, i:i + 3], clamp=False) for i in range(1, latents.shape[1], 3)]
    assert [c.shape[1] for c in chunks] == [1] + [4 * latents[:, i:i + 3].shape[1] for i in range(1, latents.shape[1], 3)]
    stream = torch.cat(chunks, dim=1)
    assert relative_l2(stream, outputs(set_dir)["stream_decoded"]) < tolerance(set_dir)
    assert relative_l2(stream, outputs(set_dir)["decoded"]) < tolerance(set_dir)


@pytest.mark.parametrize("set_dir", SETS)
def test_parity_vae_reference_and_motion_latents(set_dir):
    portrait = load_tensors(set_dir, "vae", prefix="inputs.")["portrait"]
    ref, motion = fixture_vae(set_dir).encode_portrait(portrait)
    assert relative_l2(ref, outputs(set_dir)["ref_latent"]) < tolerance(set_dir)
    assert relative_l2(motion, outputs(set_dir)["motion_latents"]) < tolerance(set_dir)
    assert motion.shape[1] == 19


@pytest.mark.parametrize("layout", ["pth", "comfy-safetensors", "prefixed"])
def test_vae_file_layouts(layout, tmp_path):
    set_dir = SETS[0].values[0]
    weights = load_tensors(set_dir, "vae", prefix="weights.")
    if layout == "pth":
        path = tmp_path / "Wan2.1_VAE.pth"
        torch.save(weights, path)
    else:
        prefix = "first_stage_model." if layout == "prefixed" else ""
        path = tmp_path / "wan_2.1_vae.safetensors"
        save_file({prefix + k: v for k, v in weights.items()}, str(path))
    constants = load_tensors(set_dir, "vae", prefix="constants.")
    vae = WanVAE.load(path)
    vae.mean, vae.std = constants["latent_mean"].view(-1, 1, 1, 1), constants["latent_std"].view(-1, 1, 1, 1)
    video = load_tensors(set_dir, "vae", prefix="inputs.")["video"]
    assert relative_l2(vae.encode(video), outputs(set_dir)["latents"]) < tolerance(set_dir)


def test_bf16_vae_follows_fp32():
    set_dir = SETS[0].values[0]
    latents = outputs(set_dir)["latents"]
    bf16 = fixture_vae(set_dir, dtype=torch.bfloat16).decode(latents)
    assert bf16.dtype == torch.float32 and relative_l2(bf16, outputs(set_dir)["decoded"]) < 0.05


def test_not_a_wan21_vae_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="not a Wan2.1 VAE"):
        WanVAE.from_state_dict({"encoder.weight": torch.zeros(1)})
    with pytest.raises(FileNotFoundError):
        WanVAE.load(tmp_path / "missing.safetensors")


def _held_bytes(decoder) -> int:
    return sum(t.numel() * t.element_size() for t in decoder.cache.slots if isinstance(t, torch.Tensor))


def test_streaming_decoder_memory_flat_from_2_to_20_blocks():
    """What the decoder carries between calls (its causal cache) is the same after 2 and
    after 20 blocks, and each call's output is one block of frames: memory does not grow."""
    set_dir = SETS[0].values[0]
    vae = fixture_vae(set_dir)
    torch.manual_seed(0)
    latents = torch.randn(16, 1 + 3 * 20, 2, 2)
    decoder = vae.stream_decoder()
    decoder.decode(latents[:, :1])
    held, sizes = [], []
    for block in range(20):
        frames = decoder.decode(latents[:, 1 + 3 * block:4 + 3 * block])
        sizes.append(frames.shape[1])
        held.append(_held_bytes(decoder))
    assert sizes == [12] * 20
    assert held[1] == held[19] and held[1] > 0
