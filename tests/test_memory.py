"""Memory management: changing the LoRA strength in place (engine), the loader reusing loaded
weights, and, when ComfyUI is importable, our DiT in ComfyUI's model management."""
import importlib.util

import pytest
import torch

from conftest import fixture_sets, load_manifest, load_tensors, relative_l2
from dit_fixture import fixture_config, fixture_weights, write_checkpoint
from liveavatar.loading import load_dit, quantize_fp8, read_lora, remerge_lora
from liveavatar.placement import Offload

SETS = fixture_sets("lora_merge")


def merged_model(set_dir, tmp_path, strength, storage="fp32", placement=None):
    manifest = load_manifest(set_dir, "lora_merge")
    checkpoint = tmp_path / "dit.safetensors"
    if not checkpoint.exists():
        write_checkpoint(fixture_weights(set_dir), checkpoint)
    return load_dit(checkpoint, lora=set_dir / "lora.safetensors", lora_strength=strength, lora_alpha=manifest["alpha"],
                    storage=storage, config=fixture_config(set_dir), placement=placement)


@pytest.mark.parametrize("set_dir", SETS)
def test_remerge_equals_fresh_merge_and_reference(set_dir, tmp_path):
    """Merge at 0.3, re-merge at 1.0 == fresh merge at 1.0 == peft's merge (the fixture);
    then back to 0.3 == fresh merge at 0.3; the weights keep their tensors."""
    manifest = load_manifest(set_dir, "lora_merge")
    model = merged_model(set_dir, tmp_path, 0.3)
    pointers = {n: p.data_ptr() for n, p in model.named_parameters()}
    changed = remerge_lora(model, set_dir / "lora.safetensors", 0.3, 1.0, lora_alpha=manifest["alpha"])
    assert changed == manifest["num_changed_weights"]
    state = model.state_dict()
    fresh = merged_model(set_dir, tmp_path, 1.0).state_dict()
    peft = load_tensors(set_dir, "lora_merged", prefix="merged.")
    for name, expected in peft.items():
        assert relative_l2(state[name], expected) < manifest["tolerance"]["relative_l2"], name
    for name, value in fresh.items():
        assert relative_l2(state[name], value) < 1e-6, name
    remerge_lora(model, read_lora(set_dir / "lora.safetensors")[0], 1.0, 0.3, lora_alpha=manifest["alpha"])
    fresh = merged_model(set_dir, tmp_path, 0.3).state_dict()
    for name, value in model.state_dict().items():
        assert relative_l2(value, fresh[name]) < 1e-6, name
    assert pointers == {n: p.data_ptr() for n, p in model.named_parameters()}


@pytest.mark.parametrize("set_dir", SETS)
def test_remerge_in_bf16_and_fp8_within_one_rounding(set_dir, tmp_path):
    """Stored in bf16 (offloaded blocks) or fp8: the re-merged weights are within about one
    rounding of the storage dtype of a fresh merge."""
    manifest = load_manifest(set_dir, "lora_merge")
    for storage, tolerance in (("bf16", 1e-2), ("fp8", 8e-2)):
        layers = fixture_config(set_dir).num_layers
        model = merged_model(set_dir, tmp_path, 0.0, storage, Offload("cpu", blocks=1, num_layers=layers))
        remerge_lora(model, set_dir / "lora.safetensors", 0.0, 1.0, lora_alpha=manifest["alpha"])
        fresh = merged_model(set_dir, tmp_path, 1.0, storage)
        for name in load_tensors(set_dir, "lora_merged", prefix="merged."):
            module = name.rsplit(".", 1)[0]
            actual, expected = (m.get_submodule(module).weight_as(torch.float32) for m in (model, fresh))
            assert relative_l2(actual, expected) < tolerance, (storage, name)


def test_quantize_fp8_round_trip_scale():
    weight = torch.randn(8, 8)
    stored, scale = quantize_fp8(weight)
    assert float(stored.float().abs().max()) == pytest.approx(448.0)
    assert relative_l2(stored.float() * scale, weight) < 0.05
