"""Weight loading: checkpoint layouts, LoRA merge (against peft's own merge), fp8, errors."""
import json

import pytest
import torch
from safetensors.torch import save_file

from conftest import fixture_sets, load_manifest, load_tensors, relative_l2
from dit_fixture import fixture_config, fixture_inputs, fixture_settings, fixture_weights, stream_clips, write_checkpoint
from liveavatar import loading
from liveavatar.loading import CheckpointError, load_dit

SETS = fixture_sets("lora_merge")


def lora_files(set_dir):
    return load_tensors(set_dir, "lora"), load_manifest(set_dir, "lora_merge")


@pytest.mark.parametrize("set_dir", SETS)
def test_parity_lora_merge_equals_peft(set_dir, tmp_path):
    manifest = load_manifest(set_dir, "lora_merge")
    checkpoint = write_checkpoint(fixture_weights(set_dir), tmp_path / "dit.safetensors")
    model = load_dit(checkpoint, lora=set_dir / "lora.safetensors", lora_alpha=manifest["alpha"], storage="fp32",
                     config=fixture_config(set_dir))
    merged = load_tensors(set_dir, "lora_merged", prefix="merged.")
    assert len(merged) == manifest["num_changed_weights"]
    state = model.state_dict()
    for name, expected in merged.items():
        assert relative_l2(state[name], expected) < manifest["tolerance"]["relative_l2"], name
    base = fixture_weights(set_dir)
    untouched = [n for n in base if n not in merged]
    assert all(torch.equal(state[n], base[n]) for n in untouched)


def _rename_lora(lora: dict, rename) -> dict:
    return {rename(k): v for k, v in lora.items()}


LORA_VARIANTS = {
    "peft-prefixed": lambda k: "base_model.model." + k,
    "no-adapter-name": lambda k: k.replace(".default", ""),
    "comfy-diffusion-model": lambda k: "diffusion_model." + k.replace(".default", ""),
    "kohya-down-up": lambda k: k.replace("lora_A.default", "lora_down").replace("lora_B.default", "lora_up"),
}


@pytest.mark.parametrize("variant", sorted(LORA_VARIANTS))
def test_lora_naming_variants_merge_the_same(variant, tmp_path):
    set_dir = SETS[0].values[0]
    lora, manifest = lora_files(set_dir)
    save_file(_rename_lora(lora, LORA_VARIANTS[variant]), str(tmp_path / "lora.safetensors"))
    checkpoint = write_checkpoint(fixture_weights(set_dir), tmp_path / "dit.safetensors")
    model = load_dit(checkpoint, lora=tmp_path / "lora.safetensors", lora_alpha=manifest["alpha"], storage="fp32",
                     config=fixture_config(set_dir))
    for name, expected in load_tensors(set_dir, "lora_merged", prefix="merged.").items():
        assert relative_l2(model.state_dict()[name], expected) < 1e-6


def test_lora_alpha_key_and_strength(tmp_path):
    """An `.alpha` tensor in the file overrides the default; strength scales the delta."""
    set_dir = SETS[0].values[0]
    lora, manifest = lora_files(set_dir)
    renamed = _rename_lora(lora, LORA_VARIANTS["kohya-down-up"])
    rank = manifest["rank"]
    for module in {k.rsplit(".lora_", 1)[0] for k in renamed}:
        renamed[module + ".alpha"] = torch.tensor(float(manifest["alpha"]) * 2)  # twice the trained scale
    save_file(renamed, str(tmp_path / "lora.safetensors"))
    checkpoint = write_checkpoint(fixture_weights(set_dir), tmp_path / "dit.safetensors")
    model = load_dit(checkpoint, lora=tmp_path / "lora.safetensors", lora_strength=0.5, storage="fp32",
                     config=fixture_config(set_dir))
    # 2x alpha at strength 0.5 is the trained merge again: W + (alpha/rank) B A
    for name, expected in load_tensors(set_dir, "lora_merged", prefix="merged.").items():
        assert relative_l2(model.state_dict()[name], expected) < 1e-6
    assert rank == next(v for k, v in lora.items() if "lora_A" in k).shape[0]


def test_lora_key_matching_no_module_is_an_error(tmp_path):
    set_dir = SETS[0].values[0]
    lora, _ = lora_files(set_dir)
    a = next(v for k, v in lora.items() if "lora_A" in k)
    b = next(v for k, v in lora.items() if "lora_B" in k)
    lora["blocks.99.self_attn.q.lora_A.default.weight"] = a.clone()
    lora["blocks.99.self_attn.q.lora_B.default.weight"] = b.clone()
    save_file(lora, str(tmp_path / "lora.safetensors"))
    checkpoint = write_checkpoint(fixture_weights(set_dir), tmp_path / "dit.safetensors")
    with pytest.raises(CheckpointError, match="blocks.99.self_attn.q.weight"):
        load_dit(checkpoint, lora=tmp_path / "lora.safetensors", config=fixture_config(set_dir))


@pytest.mark.parametrize("layout", ["single", "comfy-prefix", "sharded", "pth"])
def test_checkpoint_layouts_load_identically(layout, tmp_path):
    set_dir = fixture_sets("dit_streaming")[0].values[0]
    weights = fixture_weights(set_dir)
    if layout == "single":
        path = write_checkpoint(weights, tmp_path / "dit.safetensors")
    elif layout == "comfy-prefix":
        path = write_checkpoint(weights, tmp_path / "dit.safetensors", prefix="model.diffusion_model.")
    elif layout == "pth":
        path = tmp_path / "dit.pth"
        torch.save(weights, path)
    else:
        path = tmp_path / "sharded"
        path.mkdir()
        names = sorted(weights)
        halves = {"diffusion_pytorch_model-00001-of-00002.safetensors": names[::2],
                  "diffusion_pytorch_model-00002-of-00002.safetensors": names[1::2]}
        for file, keys in halves.items():
            save_file({k: weights[k] for k in keys}, str(path / file))
        index = {"weight_map": {k: f for f, keys in halves.items() for k in keys}}
        (path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
        manifest = load_manifest(set_dir, "dit_streaming")
        (path / "config.json").write_text(json.dumps(manifest["config"]))
    config = None if layout == "sharded" else fixture_config(set_dir)  # sharded: from its config.json
    model = load_dit(path, storage="fp32", config=config)
    assert model.cfg == fixture_config(set_dir)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in weights.items())


def test_not_an_s2v_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"encoder.conv1.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(CheckpointError, match="not a Wan2.2-S2V diffusion model"):
        load_dit(path)
    with pytest.raises(CheckpointError, match="not found"):
        load_dit(tmp_path / "missing.safetensors")


def test_missing_unexpected_and_misshaped_keys_listed_together(tmp_path):
    set_dir = fixture_sets("dit_streaming")[0].values[0]
    weights = fixture_weights(set_dir)
    weights.pop("head.head.bias")
    weights["blocks.0.extra.weight"] = torch.zeros(1)
    weights["blocks.0.ffn.0.weight"] = torch.zeros(3, 3)
    path = write_checkpoint(weights, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError) as error:
        load_dit(path, config=fixture_config(set_dir))
    message = str(error.value)
    assert "missing: head.head.bias" in message
    assert "unexpected: blocks.0.extra.weight" in message
    assert "blocks.0.ffn.0.weight: file (3, 3)" in message


def test_config_inferred_from_shapes_needs_injector_layout(tmp_path):
    """Without config.json a tiny model cannot say where its audio injectors sit."""
    set_dir = fixture_sets("dit_streaming")[0].values[0]
    path = write_checkpoint(fixture_weights(set_dir), tmp_path / "dit.safetensors")
    with pytest.raises(CheckpointError, match="audio_inject_layers"):
        load_dit(path)


@pytest.mark.parametrize("set_dir", fixture_sets("wan22_s2v_14b_keys"))
def test_14b_config_inferred_from_real_shapes(set_dir):
    official = load_manifest(set_dir, "wan22_s2v_14b_keys")

    class Shapes:  # stands in for the 34 GB file: only shapes are read
        def __init__(self, keys):
            self.keys_ = keys

        def keys(self):
            return list(self.keys_)

        def shape(self, key):
            return tuple(self.keys_[key]["shape"])

    checkpoint = loading.Checkpoint(Shapes(official["keys"]), "", set_dir / "no-config-here.safetensors")
    inferred = checkpoint.infer_config(audio_layers=checkpoint.shape("casual_audio_encoder.weights")[1])
    from liveavatar.dit import DiTConfig
    assert inferred == DiTConfig.from_dict(official["config"], audio_layers=inferred.audio_layers)


def test_bf16_and_comfy_fp8_scaled_follow_fp32(tmp_path):
    """Same first clip from fp32, bf16 and ComfyUI's fp8_scaled layout, within their precision."""
    set_dir = fixture_sets("dit_streaming")[0].values[0]
    weights = fixture_weights(set_dir)
    cfg = fixture_config(set_dir)
    fp8 = {}
    for name, w in weights.items():
        if loading._fp8_eligible(name.rpartition(".")[0], _linear_probe(name), name.rpartition(".")[2]):
            stored, scale = loading.quantize_fp8(w)
            fp8[name], fp8[name[:-len("weight")] + "scale_weight"] = stored, scale
        else:
            fp8[name] = w.to(torch.bfloat16)
    fp8["scaled_fp8"] = torch.zeros(2, dtype=torch.float8_e4m3fn)
    path32 = write_checkpoint(weights, tmp_path / "fp32.safetensors")
    path8 = write_checkpoint(fp8, tmp_path / "fp8.safetensors", prefix="model.diffusion_model.")
    inputs, settings = fixture_inputs(set_dir), fixture_settings(set_dir)
    settings.num_clip = 1
    reference = stream_clips(load_dit(path32, storage="fp32", config=cfg), inputs, settings)
    bf16 = stream_clips(load_dit(path32, storage="bf16", config=cfg), inputs, settings)
    fp8_kept = load_dit(path8, storage="fp8", config=cfg)
    assert fp8_kept.blocks[0].ffn[0].weight.dtype == torch.float8_e4m3fn
    assert relative_l2(bf16, reference) < 0.05
    assert relative_l2(stream_clips(fp8_kept, inputs, settings), reference) < 0.15
    assert relative_l2(stream_clips(load_dit(path8, storage="bf16", config=cfg), inputs, settings), reference) < 0.15


def _linear_probe(name):
    from liveavatar.layers import Linear
    return Linear(1, 1) if name.endswith("weight") and any(
        s in name for s in (".q.", ".k.", ".v.", ".o.", ".ffn.")) else None
