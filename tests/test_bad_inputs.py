"""Bad inputs and faults (issue 9): every case gets a clear outcome.

Each test is one row of docs/reliability.md: either an error of a fitting type whose
message names the input or file (and says what to do), or the correct output. Cases that
already behaved well are kept here as guards. Tiny random models only; CPU; fast.
"""
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import nodes
from liveavatar.loading import Checkpoint, CheckpointError, load_dit, read_lora
from liveavatar.testing import tiny_dit_config, write_tiny_dit, write_tiny_lora
from liveavatar.weights import read_state_dict


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    """A tiny DiT (config in its metadata) and its LoRA, written once."""
    root = tmp_path_factory.mktemp("tiny")
    return {"dit": write_tiny_dit(root / "dit.safetensors"), "lora": write_tiny_lora(root / "lora.safetensors")}


def damaged_copies(source: Path, folder: Path) -> dict:
    """The three likeliest broken downloads of `source`: cut in half, empty, random bytes."""
    data = source.read_bytes()
    files = {"truncated": data[:len(data) // 2], "zero-byte": b"",
             "random-bytes": np.random.default_rng(0).bytes(4096)}
    paths = {}
    for kind, content in files.items():
        paths[kind] = folder / f"{kind}.safetensors"
        paths[kind].write_bytes(content)
    return paths


# ---- damaged weight files ----------------------------------------------------------------
@pytest.mark.parametrize("kind", ["truncated", "zero-byte", "random-bytes"])
def test_damaged_model_file_is_named(kind, tiny_files, tmp_path):
    path = damaged_copies(tiny_files["dit"], tmp_path)[kind]
    with pytest.raises(CheckpointError) as error:
        load_dit(path)
    assert str(path) in str(error.value) and "download it again" in str(error.value)


@pytest.mark.parametrize("kind", ["truncated", "zero-byte", "random-bytes"])
def test_damaged_lora_file_is_named(kind, tiny_files, tmp_path):
    path = damaged_copies(tiny_files["lora"], tmp_path)[kind]
    with pytest.raises(CheckpointError) as error:
        load_dit(tiny_files["dit"], lora=path)
    assert str(path) in str(error.value) and "download it again" in str(error.value)


def models_folder(tmp_path, monkeypatch, dit: Path, lora: Path | None = None):
    """ComfyUI-style model folders holding these files (by symlink), for the loader node."""
    for folder, file in (("diffusion_models", dit), ("loras", lora)):
        (tmp_path / folder).mkdir(exist_ok=True)
        if file is not None:
            (tmp_path / folder / file.name).symlink_to(file)
    monkeypatch.setenv("LIVEAVATAR_MODELS", str(tmp_path))


def load_node(model_name, lora_name="None"):
    return nodes.LiveAvatarModelLoader().load(model_name, lora_name, 1.0, "fp32", "one GPU", 0, "auto", False)


@pytest.mark.parametrize("slot", ["model", "lora"])
def test_loader_node_reports_damaged_files_by_name(slot, tiny_files, tmp_path, monkeypatch):
    damaged = damaged_copies(tiny_files[slot if slot == "lora" else "dit"], tmp_path)["truncated"]
    if slot == "model":
        models_folder(tmp_path, monkeypatch, damaged)
        call = lambda: load_node(damaged.name)  # noqa: E731
    else:
        models_folder(tmp_path, monkeypatch, tiny_files["dit"], damaged)
        call = lambda: load_node(tiny_files["dit"].name, damaged.name)  # noqa: E731
    with pytest.raises(ValueError, match="LiveAvatar model loader") as error:
        call()
    assert damaged.name in str(error.value) and "download it again" in str(error.value)


def sharded_folder(tmp_path, index_text: str) -> Path:
    folder = tmp_path / "Wan2.2-S2V-14B"
    folder.mkdir()
    save_file({"x": torch.zeros(1)}, str(folder / "diffusion_pytorch_model-00001-of-00001.safetensors"))
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(index_text)
    return folder


@pytest.mark.parametrize("index_text, says", [("{not json", "not a valid sharded-checkpoint index"),
                                              ('{"metadata": {}}', "has no 'weight_map'")])
def test_broken_sharded_index_is_named(index_text, says, tmp_path):
    folder = sharded_folder(tmp_path, index_text)
    with pytest.raises(CheckpointError, match=says) as error:
        load_dit(folder)
    assert "diffusion_pytorch_model.safetensors.index.json" in str(error.value)


def test_old_format_pth_loads(tmp_path):
    """torch.save's pre-1.6 (non-zip) format cannot be memory-mapped; it is read fully instead."""
    path = tmp_path / "old.pth"
    torch.save({"w": torch.arange(6.0)}, path, _use_new_zipfile_serialization=False)
    assert torch.equal(read_state_dict(path, mmap=True)["w"], torch.arange(6.0))


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch /tmp/liveavatar_pickle_ran",))


def test_pickle_is_refused_without_advice_to_run_it(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"w": RunsCode()}, path)
    with pytest.raises(CheckpointError) as error:
        read_state_dict(path)
    message = str(error.value)
    assert str(path) in message and "safetensors" in message
    assert "weights_only" not in message and "Re-running" not in message
    assert not Path("/tmp/liveavatar_pickle_ran").exists()


# ---- LoRA slot holding the wrong thing -------------------------------------------------
def test_empty_safetensors_as_lora_is_an_error(tiny_files, tmp_path):
    path = tmp_path / "empty.safetensors"
    save_file({}, str(path))
    with pytest.raises(CheckpointError, match="holds no tensors") as error:
        load_dit(tiny_files["dit"], lora=path)
    assert str(path) in str(error.value)


def test_whole_model_as_lora_is_an_error_before_reading_it(tiny_files, monkeypatch):
    from liveavatar import loading
    loaded = []
    monkeypatch.setattr(loading.TensorSource, "load", lambda self, key: loaded.append(key))
    with pytest.raises(CheckpointError, match="whole diffusion model") as error:
        read_lora(tiny_files["dit"])
    assert str(tiny_files["dit"]) in str(error.value) and loaded == []


# ---- crafted config metadata -----------------------------------------------------------
def with_config(tiny_files, tmp_path, **changes) -> Path:
    """The tiny DiT with its stored config changed."""
    from safetensors import safe_open
    with safe_open(str(tiny_files["dit"]), framework="pt") as f:
        config = {**json.loads(f.metadata()["config"]), **changes}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    path = tmp_path / "crafted.safetensors"
    save_file(tensors, str(path), metadata={"config": json.dumps(config)})
    return path


@pytest.mark.parametrize("changes, says", [
    ({"num_layers": 20000}, "num_layers=20000 but the file has 3 blocks"),
    ({"audio_inject_layers": [0, 7]}, "audio_inject_layers [7] are outside layers 0..2"),
    ({"num_heads": 0}, "num_heads=0 must be a positive divisor"),
])
def test_crafted_config_is_refused_before_building(changes, says, tiny_files, tmp_path, monkeypatch):
    from liveavatar import loading
    built = []
    monkeypatch.setattr(loading, "expected_tensors", lambda cfg: built.append(cfg))
    path = with_config(tiny_files, tmp_path, **changes)
    with pytest.raises(CheckpointError, match=re.escape(says)) as error:
        load_dit(path)
    assert str(path) in str(error.value) and built == []


def test_config_passed_in_is_checked_against_the_file(tiny_files):
    from dataclasses import replace
    with pytest.raises(CheckpointError, match="num_layers=5 but the file has 3 blocks"):
        load_dit(tiny_files["dit"], config=replace(tiny_dit_config(), num_layers=5))


# ---- sampler -------------------------------------------------------------------------------
def test_largest_seed_wraps_for_later_clips():
    """seed + clip wraps modulo 2**64: seed 2**64 - 1, clip 1 is seed 0."""
    from liveavatar.sampler import clip_noise
    expected = torch.randn((2, 3), generator=torch.Generator().manual_seed(0))
    assert torch.equal(clip_noise(2 ** 64 - 1, 1, (2, 3), "cpu"), expected)
