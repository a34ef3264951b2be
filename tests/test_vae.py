"""Wan2.1 VAE against the original's fixtures, file layouts, errors, streaming memory.

Config, sizes and tolerance come from each fixture set's vae.json."""
import pytest
import torch
from safetensors.torch import save_file

from conftest import fixture_sets, kernels_switched_on, load_manifest, load_tensors, relative_l2
from liveavatar import vae as vae_module
from liveavatar.vae import (LATENT_MEAN, LATENT_STD, MOTION_FRAMES, VideoVAE, WanVAE, config_from_state_dict,
                            normalised_to_raw, raw_to_normalised)

SETS = fixture_sets("vae")
BF16_BOUND = 0.05  # bf16 compute against the fp32 fixture: a few 1e-3 typical


def manifest(set_dir):
    return load_manifest(set_dir, "vae")


def tolerance(set_dir):
    return manifest(set_dir)["tolerance"]["relative_l2"]


def weights(set_dir):
    return load_tensors(set_dir, "vae", prefix="weights.")


def inputs(set_dir):
    return load_tensors(set_dir, "vae", prefix="inputs.")


def outputs(set_dir):
    return load_tensors(set_dir, "vae", prefix="outputs.")


def latent_stats(set_dir) -> dict:
    """The set's normalisation constants where it ships them, else Wan2.1's."""
    constants = load_tensors(set_dir, "vae", prefix="constants.")
    return {"mean": constants.get("latent_mean", LATENT_MEAN), "std": constants.get("latent_std", LATENT_STD)}


def fixture_vae(set_dir, state_dict=None, **kwargs) -> WanVAE:
    return WanVAE.from_state_dict(weights(set_dir) if state_dict is None else state_dict,
                                  config=manifest(set_dir)["config"], **latent_stats(set_dir), **kwargs)


def test_shipped_constants_are_wan21s():
    for set_dir in SETS:
        stats = latent_stats(set_dir.values[0])
        torch.testing.assert_close(torch.as_tensor(stats["mean"]), torch.tensor(LATENT_MEAN))
        torch.testing.assert_close(torch.as_tensor(stats["std"]), torch.tensor(LATENT_STD))


# ---- parity -------------------------------------------------------------------------------------
@pytest.mark.parametrize("set_dir", SETS)
def test_parity_vae_latents(set_dir):
    video = inputs(set_dir)["video"]
    latents = fixture_vae(set_dir).encode(video)
    assert latents.shape == (16, 1 + (video.shape[1] - 1) // 4, video.shape[2] // 8, video.shape[3] // 8)
    assert relative_l2(latents, outputs(set_dir)["latents"]) < tolerance(set_dir)


@pytest.mark.parametrize("set_dir", SETS)
def test_parity_vae_full_decode(set_dir):
    decoded = fixture_vae(set_dir).decode(outputs(set_dir)["latents"], clamp=False)
    assert relative_l2(decoded, outputs(set_dir)["decoded"]) < tolerance(set_dir)


@pytest.mark.parametrize("set_dir", SETS)
def test_parity_vae_stream_decode_one_then_threes(set_dir):
    latents = outputs(set_dir)["latents"]
    decoder = fixture_vae(set_dir).stream_decoder()
    chunks = [latents[:, :1]] + [latents[:, i:i + 3] for i in range(1, latents.shape[1], 3)]
    frames = [decoder.decode(chunk, clamp=False) for chunk in chunks]
    assert [f.shape[1] for f in frames] == [1] + [4 * c.shape[1] for c in chunks[1:]]
    stream = torch.cat(frames, dim=1)
    assert relative_l2(stream, outputs(set_dir)["stream_decoded"]) < tolerance(set_dir)
    assert relative_l2(stream, outputs(set_dir)["decoded"]) < tolerance(set_dir)
    decoder.reset()  # a new stream starts over with a single-frame latent
    assert relative_l2(decoder.decode(latents[:, :1], clamp=False), outputs(set_dir)["decoded"][:, :1]) < tolerance(set_dir)


@pytest.mark.parametrize("latents_per_pass", [1, 2, 3])  # and encoder chunks per pass
@pytest.mark.parametrize("set_dir", SETS)
def test_parity_vae_channels_last_and_any_pass_size(set_dir, latents_per_pass, monkeypatch):
    """The GPU's way (activations channels-last, a block's latents in one decoder pass, the
    norms + SiLU fused: Triton's interpreter runs the kernel here), run on the CPU: the same
    encode and decode as the fixture, whatever the pass size."""
    monkeypatch.setattr(vae_module, "LATENTS_PER_PASS", latents_per_pass)
    monkeypatch.setattr(vae_module, "CHUNKS_PER_PASS", latents_per_pass)  # the encoder's 4-frame chunks
    vae = fixture_vae(set_dir, kernels=kernels_switched_on())
    vae.set_layout(torch.channels_last_3d)
    latents = vae.encode(inputs(set_dir)["video"])
    assert relative_l2(latents, outputs(set_dir)["latents"]) < tolerance(set_dir)
    decoded = vae.decode(outputs(set_dir)["latents"], clamp=False)
    assert decoded.shape == outputs(set_dir)["decoded"].shape
    assert relative_l2(decoded, outputs(set_dir)["decoded"]) < tolerance(set_dir)


@pytest.mark.parametrize("set_dir", SETS)
def test_parity_vae_ref_and_motion_latents(set_dir):
    ref, motion = fixture_vae(set_dir).encode_portrait(inputs(set_dir)["portrait"])
    assert motion.shape[1] == 1 + (MOTION_FRAMES - 1) // 4 == 19
    assert relative_l2(ref, outputs(set_dir)["ref_latent"]) < tolerance(set_dir)
    assert relative_l2(motion, outputs(set_dir)["motion_latents"]) < tolerance(set_dir)


# ---- file layouts -------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["Wan2.1_VAE.pth", "wan_2.1_vae.safetensors", "first_stage_model.safetensors"])
@pytest.mark.parametrize("set_dir", SETS)
def test_parity_vae_file_layouts(set_dir, layout, tmp_path):
    """The original .pth (fp32), ComfyUI's single file (same names, half precision, as
    comfy/ldm/wan/vae.py names them) and a first_stage_model.-prefixed state dict, all
    with the config inferred from the shapes."""
    sd = weights(set_dir)
    path = tmp_path / layout
    if layout.endswith(".pth"):
        torch.save(sd, path)
        reference = fixture_vae(set_dir)
    else:
        prefix = "first_stage_model." if layout.startswith("first_stage_model") else ""
        save_file({prefix + k: v.to(torch.bfloat16) for k, v in sd.items()}, str(path))
        reference = fixture_vae(set_dir, {k: v.to(torch.bfloat16).float() for k, v in sd.items()})
    loaded = WanVAE.load(path)
    loaded.mean, loaded.std = reference.mean, reference.std
    video = inputs(set_dir)["video"]
    assert relative_l2(loaded.encode(video), reference.encode(video)) < tolerance(set_dir)
    if layout.endswith(".pth"):
        assert relative_l2(loaded.encode(video), outputs(set_dir)["latents"]) < tolerance(set_dir)


@pytest.mark.parametrize("set_dir", SETS)
def test_vae_config_inferred_matches_manifest(set_dir):
    config = manifest(set_dir)["config"]
    inferred = config_from_state_dict(weights(set_dir))
    assert inferred == dict(dim=config["dim"], z_dim=config["z_dim"], dim_mult=tuple(config["dim_mult"]),
                            num_res_blocks=config["num_res_blocks"],
                            temporal_downsample=tuple(config["temperal_downsample"]))


def test_real_wan21_config_inferred_from_shapes():
    with torch.device("meta"):
        sd = VideoVAE(dim=96).state_dict()
    assert config_from_state_dict(sd) == dict(dim=96, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=2,
                                              temporal_downsample=(False, True, True))


def test_bf16_vae_follows_fp32():
    set_dir = SETS[0].values[0]
    vae = fixture_vae(set_dir, dtype=torch.bfloat16)
    latents = vae.encode(inputs(set_dir)["video"])
    assert latents.dtype == torch.float32 and relative_l2(latents, outputs(set_dir)["latents"]) < BF16_BOUND
    decoded = vae.decode(outputs(set_dir)["latents"][:, :2], clamp=False)
    assert decoded.dtype == torch.float32 and relative_l2(decoded, outputs(set_dir)["decoded"][:, :5]) < BF16_BOUND


def test_raw_latents_for_comfyui_round_trip():
    """ComfyUI's LATENT holds raw VAE means: (mu - mean) / std is what encode returns."""
    raw = torch.randn(2, 16, 3, 4, 4)
    torch.testing.assert_close(normalised_to_raw(raw_to_normalised(raw)), raw)
    mean = torch.tensor(LATENT_MEAN).view(16, 1, 1, 1).expand(16, 2, 3, 3)
    assert raw_to_normalised(mean).abs().max() < 1e-6


# ---- errors -------------------------------------------------------------------------------------
def test_not_a_wan21_vae_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="not a Wan2.1 VAE"):
        WanVAE.from_state_dict({"encoder.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="Wan2.2"):
        WanVAE.from_state_dict({"decoder.upsamples.0.upsamples.0.residual.2.weight": torch.zeros(1)})
    set_dir = SETS[0].values[0]
    with pytest.raises(ValueError, match="do not fit"):
        WanVAE.from_state_dict(weights(set_dir), config={**manifest(set_dir)["config"], "dim": 8})
    with pytest.raises(FileNotFoundError):
        WanVAE.load(tmp_path / "missing.safetensors")
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read"):
        WanVAE.load(broken)


def test_bad_vae_inputs_are_clear_errors():
    vae = WanVAE(VideoVAE(dim=4))
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        vae.encode(torch.zeros(3, 4, 16, 16))
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode(torch.zeros(3, 1, 20, 16))
    with pytest.raises(ValueError, match=r"\[3, frames, H, W\]"):
        vae.encode(torch.zeros(1, 3, 1, 16, 16))
    with pytest.raises(ValueError, match=r"\[16, frames"):
        vae.decode(torch.zeros(4, 2, 2, 2))
    with pytest.raises(ValueError, match=r"\[3, 1, H, W\]"):
        vae.encode_portrait(torch.zeros(3, 16, 16))


# ---- streaming memory ---------------------------------------------------------------------------
def test_streaming_decoder_memory_flat_from_2_to_20_blocks():
    """What the decoder holds between calls (its causal cache, counted by storage so views
    of bigger tensors would show) is the same after 2 and after 20 blocks, and each call
    returns one block of frames: memory does not grow with the video."""
    torch.manual_seed(0)
    vae = WanVAE(VideoVAE(dim=4))  # tiny random network: memory is about structure, not weights
    latents = torch.randn(16, 1 + 3 * 20, 2, 2)
    decoder = vae.stream_decoder()
    assert decoder.decode(latents[:, :1]).shape[1] == 1
    held, sizes = [], []
    for block in range(20):
        frames = decoder.decode(latents[:, 1 + 3 * block:4 + 3 * block])
        sizes.append(frames.shape[1])
        held.append(decoder.cache_bytes)
    assert sizes == [12] * 20
    assert held[1] > 0 and max(held[1:]) == held[1] == held[-1]
