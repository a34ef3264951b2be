"""Memory management: LoRA strength changes that give the weights of a fresh load bit for bit
(engine and loader node), the loader reusing loaded weights, and, when ComfyUI is importable,
our DiT in ComfyUI's model management."""
import math
import random

import pytest
import torch

from conftest import fixture_sets, load_manifest, load_tensors, relative_l2
from dit_fixture import fixture_config, fixture_weights, write_checkpoint
from liveavatar.loading import Checkpoint, Lora, load_dit, quantize_fp8, set_lora_strength
from liveavatar.placement import Offload, StepPerGPU

SETS = fixture_sets("lora_merge")
STORAGES = ["bf16", "fp16", "fp32", "fp8"]


def bits(model) -> dict:
    """Every tensor of a model as its raw bytes (bit-for-bit comparison, any dtype, NaN too)."""
    return {name: t.detach().reshape(-1).contiguous().view(torch.uint8).clone() for name, t in model.state_dict().items()}


def same_bits(a: dict, b: dict) -> list:
    """Names whose bytes differ (or that only one side has)."""
    return sorted(n for n in set(a) | set(b) if n not in a or n not in b or not torch.equal(a[n], b[n]))


def sources(set_dir, tmp_path, fp8_scaled=False):
    """The fixture DiT as a checkpoint file (optionally in ComfyUI's fp8_scaled layout: the
    LoRA targets stored as fp8 + scale_weight) and its LoRA with the fixture's alpha."""
    manifest = load_manifest(set_dir, "lora_merge")
    path = tmp_path / ("dit_fp8_scaled.safetensors" if fp8_scaled else "dit.safetensors")
    if not path.exists():
        weights = fixture_weights(set_dir)
        if fp8_scaled:
            lora_targets = set(load_tensors(set_dir, "lora_merged", prefix="merged."))
            for name in lora_targets:
                weights[name], scale = quantize_fp8(weights[name])
                weights[name[:-len(".weight")] + ".scale_weight"] = scale
        write_checkpoint(weights, path)
    return Checkpoint.open(path), Lora.read(set_dir / "lora.safetensors", alpha=manifest["alpha"])


def fresh(set_dir, checkpoint, lora, strength, storage, placement=None):
    return load_dit(checkpoint, lora=lora, lora_strength=strength, storage=storage, config=fixture_config(set_dir),
                    placement=placement)


def offload(set_dir):
    """Some blocks in CPU memory, the rest on the main device (a CPU stand-in): each weight is
    derived where a fresh load derives it."""
    return Offload("cpu", blocks=1, num_layers=fixture_config(set_dir).num_layers)


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("set_dir", SETS)
def test_strength_changes_give_a_fresh_load_bit_for_bit(set_dir, storage, tmp_path):
    """41 random strength changes, then the weights (and fp8 scales) equal a fresh load at the
    last strength bit for bit; the parameters keep their tensors."""
    checkpoint, lora = sources(set_dir, tmp_path)
    rng = random.Random(storage)
    model = fresh(set_dir, checkpoint, lora, 1.0, storage, offload(set_dir))
    pointers = {n: p.data_ptr() for n, p in model.named_parameters()}
    strengths = [round(rng.uniform(0.0, 2.0), 3) for _ in range(41)]
    for strength in strengths:
        assert set_lora_strength(model, checkpoint, lora, strength) == len(lora.pairs)
    assert same_bits(bits(model), bits(fresh(set_dir, checkpoint, lora, strengths[-1], storage))) == []
    assert pointers == {n: p.data_ptr() for n, p in model.named_parameters()}


@pytest.mark.parametrize("set_dir", SETS)
def test_fp8_scaled_checkpoint_strength_changes_bit_for_bit(set_dir, tmp_path):
    """ComfyUI's fp8_scaled layout (LoRA targets stored as fp8 + per-tensor scale): every
    change derives from the stored fp8 values and their scale, as a fresh load does."""
    checkpoint, lora = sources(set_dir, tmp_path, fp8_scaled=True)
    model = fresh(set_dir, checkpoint, lora, 0.0, "fp8")
    for strength in (2.0, 0.7, 1.3, 0.25):
        set_lora_strength(model, checkpoint, lora, strength)
    assert same_bits(bits(model), bits(fresh(set_dir, checkpoint, lora, 0.25, "fp8"))) == []


@pytest.mark.parametrize("set_dir", SETS)
def test_strength_changes_reach_every_gpu_copy_bit_for_bit(set_dir, tmp_path):
    """'one denoising step per GPU' keeps a copy per GPU (CPU stand-ins here): after 40
    changes every copy equals the same copy of a fresh load, bit for bit."""
    checkpoint, lora = sources(set_dir, tmp_path)
    model = fresh(set_dir, checkpoint, lora, 0.3, "bf16", StepPerGPU(["cpu", "cpu", "cpu"]))
    rng = random.Random(1)
    for _ in range(40):
        set_lora_strength(model, checkpoint, lora, rng.uniform(0.0, 2.0))
    set_lora_strength(model, checkpoint, lora, 1.0)
    reference = fresh(set_dir, checkpoint, lora, 1.0, "bf16", StepPerGPU(["cpu", "cpu", "cpu"]))
    assert len(model.copies()) == 3
    for copy, same in zip(model.copies(), reference.copies()):
        assert same_bits(bits(copy), bits(same)) == []


@pytest.mark.parametrize("set_dir", SETS)
def test_a_changed_strength_still_equals_peft(set_dir, tmp_path):
    """The merge at 1.0 after other strengths is still peft's merge (the reference fixture);
    the weights the LoRA does not touch are the checkpoint's."""
    manifest = load_manifest(set_dir, "lora_merge")
    checkpoint, lora = sources(set_dir, tmp_path)
    model = fresh(set_dir, checkpoint, lora, 0.3, "fp32")
    set_lora_strength(model, checkpoint, lora, 1.7)
    set_lora_strength(model, checkpoint, lora, 1.0)
    state, merged = model.state_dict(), load_tensors(set_dir, "lora_merged", prefix="merged.")
    assert len(merged) == manifest["num_changed_weights"] == len(lora.pairs)
    for name, expected in merged.items():
        assert relative_l2(state[name], expected) < manifest["tolerance"]["relative_l2"], name
    base = fixture_weights(set_dir)
    assert all(torch.equal(state[n], base[n]) for n in base if n not in merged)


@pytest.mark.parametrize("strength", [math.nan, math.inf, -math.inf])
def test_engine_refuses_a_strength_that_is_not_finite(strength, tmp_path):
    set_dir = SETS[0].values[0]
    checkpoint, lora = sources(set_dir, tmp_path)
    model = fresh(set_dir, checkpoint, lora, 1.0, "fp32")
    before = bits(model)
    with pytest.raises(ValueError, match="lora_strength must be a finite number"):
        set_lora_strength(model, checkpoint, lora, strength)
    with pytest.raises(ValueError, match="lora_strength must be a finite number"):
        fresh(set_dir, checkpoint, lora, strength, "fp32")
    assert same_bits(bits(model), before) == []


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
    settings = dict(model_name="dit.safetensors", lora_name="lora.safetensors", weight_dtype="bf16",
                    placement="one GPU", offload_blocks=0, kv_cache="auto")
    loader = loader_module.LiveAvatarModelLoader()
    weak = loader.load(lora_strength=0.25, **settings)[0]
    opened = []
    monkeypatch.setattr(loader_module.Checkpoint, "open",
                        classmethod(lambda cls, path, real=loader_module.Checkpoint.open: opened.append(path) or real(path)))
    strong = loader.load(lora_strength=1.0, **settings)[0]
    for strength in (0.6, 1.9, 0.05, 1.0):  # outputs of the loader at other strengths, run in turn
        loader.load(lora_strength=strength, **settings)[0].prepare()
    strong.prepare()
    assert not opened and strong.dit is weak.dit and strong.weights is weak.weights
    folder = tiny_model_folders
    for output, strength in ((strong, 1.0), (weak, 0.25)):
        output.prepare()  # an older cached output gets its own strength again
        reference = load_dit(folder / "diffusion_models" / "dit.safetensors", lora=folder / "loras" / "lora.safetensors",
                             lora_strength=strength, storage="bf16", placement=loader_module.make_placement("one GPU", 0, None))
        assert output.weights.strength == strength and same_bits(bits(output.dit), bits(reference)) == []
    assert loader.load(lora_strength=1.0, **{**settings, "weight_dtype": "fp32"})[0].dit is not weak.dit
    assert repr(strong) == "LiveAvatarModel(dit.safetensors + lora.safetensors @ 1.0 (bf16, one GPU))"


@pytest.mark.parametrize("strength", [math.nan, math.inf, -0.05, 2.05, "1.0", True])
def test_loader_refuses_a_strength_before_any_work(strength, tiny_model_folders, monkeypatch):
    """Not a number in the declared range (0 to 2): a clear error before the checkpoint is
    even opened (a NaN strength would otherwise make every later run NaN)."""
    import nodes.loader as loader_module
    opened = []
    monkeypatch.setattr(loader_module.Checkpoint, "open", classmethod(lambda cls, path: opened.append(path)))
    spec = loader_module.LiveAvatarModelLoader.INPUT_TYPES()["required"]["lora_strength"][1]
    with pytest.raises(ValueError, match="lora_strength must be a number from 0.0 to 2.0") as error:
        loader_module.LiveAvatarModelLoader().load("dit.safetensors", "lora.safetensors", strength, "fp32",
                                                   "one GPU", 0, "auto")
    assert repr(strength) in str(error.value) and not opened and (spec["min"], spec["max"]) == (0.0, 2.0)


def test_resident_modules_follow_the_placement():
    """What ComfyUI manages is what the placement puts on its main device ('meta' stands in
    for the GPU): the whole DiT on one device or per step copy, all but the CPU-resident
    blocks with 'offload blocks to CPU', the first GPU's blocks (and what goes with them)
    when sharded."""
    import nodes.loader as loader_module
    from liveavatar.dit import LiveAvatarDiT
    from liveavatar.placement import OneDevice, Sharded
    from liveavatar.testing import tiny_dit_config
    config = tiny_dit_config()
    dit = LiveAvatarDiT(config)

    def resident(placement):
        placement.bind(config)
        return loader_module.resident_modules(dit, placement)

    assert resident(OneDevice("meta")) == [dit] and resident(StepPerGPU(["meta", "cpu"])) == [dit]
    parts = resident(Offload("meta", blocks=1, num_layers=config.num_layers))
    assert dit.blocks[2] not in parts and dit.blocks[0] in parts and dit.blocks[1] in parts and dit not in parts
    assert sum(p.numel() for m in parts for p in m.parameters()) == \
        sum(p.numel() for p in dit.parameters()) - sum(p.numel() for p in dit.blocks[2].parameters())
    sharded = resident(Sharded(["meta", "cpu"], config.num_layers))  # blocks 0, 1 on the first, 2 on the second
    injector_of_layer_2 = dit.audio_injector.injector[config.audio_inject_layers.index(2)]
    assert dit.blocks[2] not in sharded and injector_of_layer_2 not in sharded and dit.head in sharded
    # what ComfyUI is told to make room for: those modules' bytes in the storage dtype
    where = Offload("meta", blocks=1, num_layers=config.num_layers)
    where.bind(config)
    total, per_block = (sum(p.numel() for p in m.parameters()) for m in (dit, dit.blocks[2]))
    assert per_block > 0 and loader_module.resident_bytes(config, "bf16", where) == 2 * (total - per_block)
    nothing_offloaded = Offload("meta", 0, config.num_layers)
    nothing_offloaded.bind(config)
    assert loader_module.resident_bytes(config, "fp32", nothing_offloaded) == 4 * total


# ---- the real ComfyUI (marked integration: run by .ci/run, see docs/testing.md) ------------------
def comfyui_root():
    import os
    from pathlib import Path
    path = os.environ.get("COMFYUI_PATH")
    return Path(path) if path and (Path(path) / "comfy" / "model_management.py").exists() else None


@pytest.mark.integration
def test_in_comfyui_model_management():
    """tests/comfyui_memory_check.py in the real ComfyUI (CPU): our DiT and a core VAE accounted,
    offloaded and freed by ComfyUI's model management, kept states dropped on unload, LoRA
    strength changes bit for bit, VAE and wav2vec2 on the core objects' own parameters."""
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
