"""Every placement mode runs the same streaming loop and gives the same latents."""
import pytest
import torch

from conftest import fixture_sets, relative_l2
from dit_fixture import fixture_config, fixture_inputs, fixture_settings, fixture_weights, stream_clips, write_checkpoint
from liveavatar.loading import load_dit
from liveavatar.placement import Offload, OneDevice, Sharded

SET = fixture_sets("dit_streaming")[0].values[0]


def run(path, placement):
    model = load_dit(path, storage="fp32", placement=placement, config=fixture_config(SET))
    settings = fixture_settings(SET)
    settings.num_clip = 2
    return model, stream_clips(model, fixture_inputs(SET), settings)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(fixture_weights(SET), tmp_path_factory.mktemp("ckpt") / "dit.safetensors")


@pytest.fixture(scope="module")
def reference(checkpoint):
    return run(checkpoint, OneDevice("cpu"))[1]


@pytest.mark.parametrize("blocks, slots", [(1, 3), (2, 3), (3, 3), (3, 2)])
def test_offloaded_blocks_give_identical_latents(checkpoint, reference, blocks, slots):
    """slots < blocks: the slots are refilled in turn every forward."""
    layers = fixture_config(SET).num_layers
    model, latents = run(checkpoint, Offload("cpu", blocks=min(blocks, layers), num_layers=layers, slots=slots))
    assert torch.equal(latents, reference)
    # offloaded weights are back in their host tensors after the run
    assert all(p.data_ptr() not in {s.data_ptr() for slot in model.placement.slots for s in slot}
               for p in model.blocks.parameters())


def test_sharded_layers_give_identical_latents(checkpoint, reference):
    cfg = fixture_config(SET)
    placement = Sharded(["cpu", "cpu"], cfg.num_layers)
    assert placement.layer_device(0) == placement.devices[0]
    assert placement.layer_device(cfg.num_layers - 1) == placement.devices[-1]
    # a tick's block-steps go through one by one here (batched in the reference): same math,
    # other matrix shapes, so equal up to float rounding
    assert relative_l2(run(checkpoint, placement)[1], reference) < 1e-5


def test_sharding_assigns_whole_blocks_and_their_injectors():
    """The injectors' devices are known when the weights are placed, before the model is
    attached to the placement (build_dit binds the config first)."""
    from liveavatar.dit import DiTConfig
    placement = Sharded(["cuda:0", "cuda:1"], num_layers=40)
    placement.bind(DiTConfig())  # the 14B layout: injectors after layers 0, 4, ..., 24, 27, ..., 39
    assert placement.model is None
    assert placement.device_for("blocks.19.ffn.0.weight") == torch.device("cuda:0")
    assert placement.device_for("blocks.20.ffn.0.weight") == torch.device("cuda:1")
    assert placement.device_for("audio_injector.injector.6.q.weight") == torch.device("cuda:1")  # after layer 24
    assert placement.device_for("audio_injector.injector_adain_layers.5.linear.weight") == torch.device("cuda:1")
    assert placement.device_for("audio_injector.injector.4.q.weight") == torch.device("cuda:0")  # after layer 16
    assert placement.device_for("head.head.weight") == torch.device("cuda:0")


def test_offload_keeps_only_offloaded_blocks_on_host():
    placement = Offload("cuda:0", blocks=10, num_layers=40)
    assert placement.device_for("blocks.29.ffn.0.weight") == torch.device("cuda:0")
    assert placement.device_for("blocks.30.ffn.0.weight") == torch.device("cpu")
    assert placement.device_for("patch_embedding.weight") == torch.device("cuda:0")
    with pytest.raises(ValueError, match="offload 0 to 40"):
        Offload("cuda:0", blocks=41, num_layers=40)


def test_fp8_kv_cache_stays_close(checkpoint, reference):
    """fp8 keys/values (per-token scales) change the latents only slightly."""
    model = load_dit(checkpoint, storage="fp32", config=fixture_config(SET))
    settings = fixture_settings(SET)
    settings.num_clip, settings.kv_fp8 = 2, True
    latents = stream_clips(model, fixture_inputs(SET), settings)
    assert relative_l2(latents, reference) < 0.05


def test_offloaded_fp8_blocks_stream_fp8_and_compute_as_in_place(checkpoint):
    """fp8 storage: the weights cross as fp8 and compute as fp8 in the slot; the result is
    what the fp8 model computes when nothing is offloaded."""
    layers = fixture_config(SET).num_layers
    settings = fixture_settings(SET)
    settings.num_clip = 1
    in_place = load_dit(checkpoint, storage="fp8", placement=OneDevice("cpu"), config=fixture_config(SET))
    offloaded = load_dit(checkpoint, storage="fp8", placement=Offload("cpu", blocks=layers, num_layers=layers),
                         config=fixture_config(SET))
    assert offloaded.blocks[0].ffn[0].weight.dtype == torch.float8_e4m3fn  # host copy stays fp8
    slot = offloaded.placement.slots[0]
    assert any(s.dtype == torch.float8_e4m3fn for s in slot)  # what crosses the bus and computes
    expected = stream_clips(in_place, fixture_inputs(SET), settings)
    assert torch.equal(stream_clips(offloaded, fixture_inputs(SET), settings), expected)
