"""Memory management: changing the LoRA strength in place (engine), the loader reusing loaded
weights, and, when ComfyUI is importable, our DiT in ComfyUI's model management."""

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


# ---- the loader node: strength changes re-merge, nothing else reloads ---------------------
@pytest.fixture
def tiny_model_folders(tmp_path, monkeypatch):
    from liveavatar.testing import write_tiny_dit, write_tiny_lora
    for folder in ("diffusion_models", "loras"):
        (tmp_path / folder).mkdir()
    write_tiny_dit(tmp_path / "diffusion_models" / "dit.safetensors")
    write_tiny_lora(tmp_path / "loras" / "lora.safetensors")
    monkeypatch.setenv("LIVEAVATAR_MODELS", str(tmp_path))
    return tmp_path


def test_loader_changes_strength_without_reloading(tiny_model_folders, monkeypatch):
    import nodes.loader as loader_module
    settings = dict(model_name="dit.safetensors", lora_name="lora.safetensors", weight_dtype="fp32",
                    placement="one GPU", offload_blocks=0, kv_cache="auto")
    loader = loader_module.LiveAvatarModelLoader()
    weak = loader.load(lora_strength=0.25, **settings)[0]
    opened = []
    monkeypatch.setattr(loader_module.Checkpoint, "open",
                        classmethod(lambda cls, path, real=loader_module.Checkpoint.open: opened.append(path) or real(path)))
    strong = loader.load(lora_strength=1.0, **settings)[0]
    strong.prepare()
    assert not opened and strong.dit is weak.dit and strong.weights is weak.weights
    fresh = load_dit(tiny_model_folders / "diffusion_models" / "dit.safetensors",
                     lora=tiny_model_folders / "loras" / "lora.safetensors", lora_strength=1.0, storage="fp32")
    changed = 0
    for name, value in fresh.state_dict().items():
        assert relative_l2(strong.dit.state_dict()[name], value) < 1e-6, name
        changed += "blocks.0.self_attn.q" in name
    assert changed
    weak.prepare()  # an older cached output: its own strength again
    assert weak.weights.strength == 0.25
    assert loader.load(lora_strength=1.0, **{**settings, "weight_dtype": "bf16"})[0].dit is not weak.dit
    assert repr(strong) == "LiveAvatarModel(dit.safetensors + lora.safetensors @ 1.0 (fp32, one GPU))"


def test_resident_modules_follow_the_placement(tiny_model_folders):
    """Outside ComfyUI nothing is managed; the part ComfyUI would manage is the DiT for one
    device and everything but the offloaded blocks with 'offload blocks to CPU'."""
    import nodes.loader as loader_module
    from liveavatar.testing import tiny_dit_config
    from liveavatar.dit import LiveAvatarDiT
    dit = LiveAvatarDiT(tiny_dit_config())
    assert loader_module.resident_modules(dit, "cpu") == [dit]
    dit.blocks[2].to("meta")  # "elsewhere", as an offloaded block in CPU memory is for a GPU
    parts = loader_module.resident_modules(dit, "cpu")
    assert dit.blocks[2] not in parts and dit.blocks[0] in parts and dit.blocks[1] in parts and dit not in parts
    assert sum(p.numel() for m in parts for p in m.parameters()) == \
        sum(p.numel() for p in dit.parameters()) - sum(p.numel() for p in dit.blocks[2].parameters())
    config = tiny_dit_config()
    where = Offload("meta", blocks=1, num_layers=config.num_layers)  # main device 'meta', offloaded to CPU
    where.bind(config)
    per_block = sum(t.numel() for n, t in loading_expected(config).items() if n.startswith("blocks.2."))
    total = sum(t.numel() for t in loading_expected(config).values())
    assert per_block > 0
    assert loader_module.resident_bytes(config, "bf16", where) == 2 * (total - per_block)
    nothing_offloaded = Offload("meta", 0, config.num_layers)
    nothing_offloaded.bind(config)
    assert loader_module.resident_bytes(config, "fp32", nothing_offloaded) == 4 * total


def loading_expected(config):
    from liveavatar.loading import expected_tensors
    return expected_tensors(config)


# ---- the real ComfyUI (marked integration: run by .ci/run, see docs/testing.md) ------------------
def comfyui_root():
    import os
    from pathlib import Path
    path = os.environ.get("COMFYUI_PATH")
    return Path(path) if path and (Path(path) / "comfy" / "model_management.py").exists() else None


@pytest.mark.integration
def test_in_comfyui_model_management():
    """tests/comfyui_memory_check.py in the real ComfyUI (CPU): our DiT and a core VAE accounted,
    partially and fully offloaded by free_memory, loaded back by the sampler, strength re-merged."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    if comfyui_root() is None:
        reason = "set COMFYUI_PATH and COMFYUI_PYTHON to a ComfyUI checkout (tests/integration/setup_comfyui.sh)"
        if os.environ.get("LIVEAVATAR_INTEGRATION") == "required":
            pytest.fail(reason)
        pytest.skip(reason)
    script = Path(__file__).with_name("comfyui_memory_check.py")
    result = subprocess.run([os.environ.get("COMFYUI_PYTHON", sys.executable), str(script)], cwd=comfyui_root(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "ALL OK" in result.stdout, result.stdout + result.stderr[-3000:]


@pytest.mark.parametrize("set_dir", SETS)
def test_strength_change_reaches_every_gpu_copy(set_dir, tmp_path):
    """'one denoising step per GPU' keeps a copy per GPU: a LoRA strength change re-merges
    each copy (CPU 'devices' here), and they all equal a fresh merge."""
    from liveavatar.placement import StepPerGPU
    from nodes.loader import LoadedWeights
    manifest = load_manifest(set_dir, "lora_merge")
    model = merged_model(set_dir, tmp_path, 0.3, placement=StepPerGPU(["cpu", "cpu", "cpu"]))
    weights = LoadedWeights(model, set_dir / "lora.safetensors", 0.3)
    import liveavatar.loading as loading
    original = loading.remerge_lora
    with pytest.MonkeyPatch.context() as patch:  # the manifest's alpha, as the fixture was merged with it
        patch.setattr("nodes.loader.remerge_lora",
                      lambda m, lora, old, new: original(m, lora, old, new, lora_alpha=manifest["alpha"]))
        weights.set_lora_strength(1.0)
    fresh = merged_model(set_dir, tmp_path, 1.0).state_dict()
    assert len(model.copies()) == 3
    for copy in model.copies():
        for name, value in copy.state_dict().items():
            assert relative_l2(value, fresh[name]) < 1e-6, name


@pytest.mark.parametrize("close", [True, False])
def test_a_runs_caches_are_freed_at_once(close):
    """The KV caches and sinks (most of a run's GPU memory) go as soon as the run is closed or
    dropped, not whenever Python's garbage collector next runs (no reference cycles)."""
    import gc
    import weakref

    from dit_fixture import fixture_inputs, fixture_model, fixture_settings
    from liveavatar.sampler import Streamer

    set_dir = fixture_sets("dit_streaming")[0].values[0]
    model = fixture_model(set_dir)
    gc.collect()
    gc.disable()
    try:
        streamer = Streamer(model, fixture_inputs(set_dir), fixture_settings(set_dir))
        blocks = list(streamer.blocks())
        held = [weakref.ref(t) for t in (streamer.caches[0].group.keys[0], streamer.replicas[0].sinks[1].ref_keys[0])]
        if close:
            streamer.close()
        del streamer
        assert blocks and all(ref() is None for ref in held)
    finally:
        gc.enable()
