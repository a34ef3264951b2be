"""Bad inputs and faults: every case gets a clear outcome.

Each test is one row of docs/reliability.md: either an error of a fitting type whose
message names the input or file (and says what to do), or the correct output. Cases that
already behaved well are kept here as guards. The Live Video node's cases are in
test_live_faults.py. Tiny random models only; CPU; fast.
"""
import json
import os
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import nodes
from liveavatar.loading import CheckpointError, load_dit, read_lora
from liveavatar.testing import tiny_dit_config, write_tiny_dit, write_tiny_lora
from liveavatar.weights import read_state_dict


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors gain nothing from threads, and on a busy 2-core runner OpenMP's waiting
    makes each tiny VAE call 100x slower; restored afterwards for the other modules."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


@pytest.mark.parametrize("slot, name, says", [
    ("model_name", "../../elsewhere/x.safetensors", "leads outside the diffusion_models model folder"),
    ("model_name", "ABSOLUTE", "leads outside the diffusion_models model folder"),
    ("model_name", "dit\x00.safetensors", "is not a file name"),
    ("model_name", "notes.txt", "is not a weights file"),
    ("model_name", "missing.safetensors", "is not in the diffusion_models model folder"),
    ("lora_name", "../../elsewhere/x.safetensors", "leads outside the loras model folder"),
])
def test_loader_takes_only_files_of_its_model_folders(slot, name, says, tiny_files, tmp_path, monkeypatch):
    """ComfyUI's prompt validation stops such names; a script or another pack calling the node
    does not go through it. A real weights file sits where '../..' and the absolute name lead."""
    from liveavatar.loading import Checkpoint
    root = tmp_path / "comfy" / "models"
    root.mkdir(parents=True)
    models_folder(root, monkeypatch, tiny_files["dit"], tiny_files["lora"])
    outside = tmp_path / "comfy" / "elsewhere" / "x.safetensors"
    outside.parent.mkdir()
    outside.symlink_to(tiny_files["dit"])
    name = str(outside) if name == "ABSOLUTE" else name
    opened = []
    monkeypatch.setattr(Checkpoint, "open", classmethod(lambda cls, path: opened.append(path)))
    model, lora = (name, "None") if slot == "model_name" else (tiny_files["dit"].name, name)
    with pytest.raises((ValueError, FileNotFoundError), match=re.escape(says)) as error:
        load_node(model, lora)
    assert f"{slot} {name!r}" in str(error.value) and opened == []


def test_loader_takes_a_model_in_a_subfolder(tiny_files, tmp_path, monkeypatch):
    models_folder(tmp_path, monkeypatch, tiny_files["dit"])
    (tmp_path / "diffusion_models" / "wan").mkdir()
    (tmp_path / "diffusion_models" / "wan" / "dit.safetensors").symlink_to(tiny_files["dit"])
    assert load_node("wan/dit.safetensors")[0].dit.cfg.num_layers == 3


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
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def test_pickle_is_refused_without_advice_to_run_it(tmp_path):
    path = tmp_path / "evil.pth"
    marker = tmp_path / "pickle_ran"
    torch.save({"w": RunsCode(marker)}, path)
    with pytest.raises(CheckpointError) as error:
        read_state_dict(path)
    message = str(error.value)
    assert str(path) in message and "safetensors" in message
    assert "weights_only" not in message and "Re-running" not in message
    assert not marker.exists()


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


# ---- decode node: output path, audio, frames -------------------------------------------------
LATENT_HW = (2, 2)  # 16x16 pixel frames: every decode below takes a fraction of a second
FPS = 25


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    from liveavatar.testing import write_tiny_vae
    from liveavatar.vae import WanVAE
    return WanVAE.load(write_tiny_vae(tmp_path_factory.mktemp("vae") / "vae.safetensors"))


def latent_input(latent_frames: int, spoken_frames: int | None = None, seed: int = 0) -> dict:
    """A LATENT as LiveAvatar Sampler returns it (raw VAE means, motion latents, spoken frames)."""
    g = torch.Generator().manual_seed(seed)
    info = {"motion_latents": torch.randn(16, 19, *LATENT_HW, generator=g), "fps": FPS}
    if spoken_frames is not None:
        info["video_frames"] = spoken_frames
    return {"samples": torch.randn(1, 16, latent_frames, *LATENT_HW, generator=g), "liveavatar": info}


@pytest.fixture
def output_dir(tmp_path, monkeypatch):
    out = tmp_path / "output"
    monkeypatch.setenv("LIVEAVATAR_OUTPUT", str(out))
    return out


def decode_node(vae, latents, save_mp4=True, return_frames=True, prefix="LiveAvatar", audio=None):
    result = nodes.LiveAvatarDecode().decode(latents, vae, save_mp4, return_frames, prefix, audio=audio)
    return result["result"], result["ui"]


def files_under(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize("prefix", ["../escaped", "sub/../../escaped", "ABSOLUTE"])
def test_prefix_outside_the_output_folder_is_refused(prefix, tiny_vae, output_dir, tmp_path):
    prefix = str(tmp_path / "escaped") if prefix == "ABSOLUTE" else prefix
    with pytest.raises(ValueError, match="points outside the output folder") as error:
        decode_node(tiny_vae, latent_input(3, 9), prefix=prefix)
    assert repr(prefix) in str(error.value)
    assert [f for f in files_under(tmp_path) if "escaped" in f] == []


@pytest.mark.parametrize("prefix, says", [
    ("clip\x00name", "characters a file name cannot"),
    ("two\nlines", "characters a file name cannot"),
    ("", "has no file name"),
    ("x" * 300, "longer than 255 bytes"),
], ids=["nul", "newline", "empty", "too-long"])
def test_prefix_no_file_name_can_hold_is_refused_before_decoding(prefix, says, tiny_vae, output_dir, monkeypatch):
    """Before: 'clip\x00name' ended in "ValueError: Could not determine output format"."""
    from liveavatar.vae import StreamDecoder
    decoded = []
    monkeypatch.setattr(StreamDecoder, "decode", lambda *a, **k: decoded.append(1))
    with pytest.raises(ValueError, match=says) as error:
        decode_node(tiny_vae, latent_input(3, 9), prefix=prefix)
    assert repr(prefix) in str(error.value) and decoded == [] and files_under(output_dir) == []


def test_full_disk_is_named_before_decoding(tiny_vae, output_dir, monkeypatch):
    """The folder check writes 64 KiB and syncs it; a full disk fails there (ENOSPC), so the
    error comes before decoding and says to free space, not to fix permissions."""
    import errno
    from liveavatar.vae import StreamDecoder
    from nodes import host

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    decoded = []
    monkeypatch.setattr(StreamDecoder, "decode", lambda *a, **k: decoded.append(1))
    monkeypatch.setattr(host.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left on device. Free space on that disk") as error:
        decode_node(tiny_vae, latent_input(3, 9))
    assert not isinstance(error.value, PermissionError) and str(output_dir) in str(error.value) and decoded == []


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_disk_full_while_writing_is_named(tiny_vae, output_dir):
    """The mp4 being written is a link to /dev/full, where every write fails as on a full disk."""
    import errno
    output_dir.mkdir()
    partial = output_dir / "LiveAvatar_00001.partial.mp4"
    partial.symlink_to("/dev/full")
    with pytest.raises(OSError) as error:
        decode_node(tiny_vae, latent_input(9, SPOKEN), audio=sine_audio(48000))
    assert error.value.errno == errno.ENOSPC and str(partial) in str(error.value)
    assert "Free space on that disk" in str(error.value)
    assert files_under(output_dir) == []  # the unplayable partial file is not left behind


def test_prefix_with_subfolders_creates_them(tiny_vae, output_dir):
    (frames, _), ui = decode_node(tiny_vae, latent_input(3, 9), prefix="sub/dir/name")
    assert files_under(output_dir) == ["sub/dir/name_00001.mp4"]
    assert ui["text"] == [str(output_dir / "sub/dir/name_00001.mp4")] and len(frames) == 9


def test_unwritable_output_folder_is_named_before_decoding(tiny_vae, tmp_path, monkeypatch):
    """A file where the folder should be stands in for a read-only disk (the tests run as root,
    which permissions do not stop)."""
    from liveavatar.vae import StreamDecoder
    blocked = tmp_path / "not_a_folder"
    blocked.write_text("")
    monkeypatch.setenv("LIVEAVATAR_OUTPUT", str(blocked / "output"))
    decoded = []
    monkeypatch.setattr(StreamDecoder, "decode", lambda *a, **k: decoded.append(1))
    with pytest.raises(PermissionError, match="cannot write into the output folder") as error:
        decode_node(tiny_vae, latent_input(3, 9))
    assert str(blocked / "output") in str(error.value) and decoded == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permissions")
def test_read_only_output_folder_is_named(tiny_vae, output_dir):
    output_dir.mkdir()
    output_dir.chmod(0o500)
    with pytest.raises(PermissionError, match=re.escape(str(output_dir))):
        decode_node(tiny_vae, latent_input(3, 9))


def test_inside_comfyui_its_save_rules_decide(tiny_vae, tmp_path, monkeypatch):
    """With ComfyUI's folder_paths present, its get_save_image_path decides; its refusal (a
    bare Exception) becomes our ValueError, its folder and counter are used."""
    import sys
    import types
    calls = []

    def get_save_image_path(prefix, output_dir, width=0, height=0):
        calls.append((prefix, output_dir))
        if prefix.startswith(".."):
            raise Exception("**** ERROR: Saving image outside the output folder is not allowed.")
        return str(tmp_path / "out" / "comfy_sub"), "clip", 7, "comfy_sub", prefix

    stub = types.SimpleNamespace(get_output_directory=lambda: str(tmp_path / "out"),
                                 get_save_image_path=get_save_image_path)
    monkeypatch.setitem(sys.modules, "folder_paths", stub)
    with pytest.raises(ValueError, match="points outside the output folder"):
        decode_node(tiny_vae, latent_input(3, 9), prefix="../x")
    _, ui = decode_node(tiny_vae, latent_input(3, 9), prefix="comfy_sub/clip")
    assert ui["text"] == [str(tmp_path / "out" / "comfy_sub" / "clip_00007.mp4")]
    assert calls == [("../x", str(tmp_path / "out")), ("comfy_sub/clip", str(tmp_path / "out"))]


def test_zero_frame_latent_is_an_error(tiny_vae, output_dir):
    empty = latent_input(3, 9)
    empty["samples"] = empty["samples"][:, :, :0]
    with pytest.raises(ValueError, match=re.escape("the latents input is empty ((1, 16, 0, 2, 2))")):
        decode_node(tiny_vae, empty, save_mp4=False)


def mp4_contents(path: Path) -> dict:
    """Frames, audio rate and decoded audio samples (mono mix) of an mp4."""
    import av
    with av.open(str(path)) as container:
        frames = sum(1 for _ in container.decode(video=0))
    with av.open(str(path)) as container:
        if not container.streams.audio:
            return {"frames": frames, "rate": None, "audio": None}
        rate = container.streams.audio[0].rate
        audio = np.concatenate([f.to_ndarray().reshape(f.to_ndarray().shape[0], -1).mean(0)
                                if f.format.is_planar else f.to_ndarray().reshape(-1, len(f.layout.channels)).mean(1)
                                for f in container.decode(audio=0)])
    return {"frames": frames, "rate": rate, "audio": audio}


def sine_audio(rate: int, amplitude=0.5, dtype=torch.float32, seconds=1.0) -> dict:
    t = torch.arange(int(seconds * rate)) / rate
    wave = amplitude * torch.sin(2 * torch.pi * 440 * t)
    return {"waveform": wave.to(dtype)[None, None], "sample_rate": rate}


SPOKEN = 21  # 3 blocks of latents give 9 + 12 + 12 frames; the speech covers 21 of them


@pytest.mark.parametrize("rate", [7000, 192000])
def test_rates_aac_refuses_are_resampled(rate, tiny_vae, output_dir):
    (frames, _), ui = decode_node(tiny_vae, latent_input(9, SPOKEN), audio=sine_audio(rate))
    mp4 = mp4_contents(output_dir / "LiveAvatar_00001.mp4")
    assert (mp4["frames"], mp4["rate"], len(frames)) == (SPOKEN, 48000, SPOKEN)
    assert ui["text"] == [str(output_dir / "LiveAvatar_00001.mp4")]


@pytest.mark.parametrize("dtype, amplitude, expected_mean_level", [
    (torch.int16, 16384, 0.5 * 2 / np.pi),  # int16 at half scale: a sine of amplitude 0.5
    (torch.float32, 4.0, 2 / np.pi),  # too loud: scaled to peak 1, a sine, not a square wave
], ids=["int16", "float-too-loud"])
def test_int_and_loud_pcm_are_scaled_not_clipped(dtype, amplitude, expected_mean_level, tiny_vae, output_dir):
    decode_node(tiny_vae, latent_input(9, SPOKEN), audio=sine_audio(48000, amplitude, dtype))
    audio = mp4_contents(output_dir / "LiveAvatar_00001.mp4")["audio"]
    steady = audio[len(audio) // 4: 3 * len(audio) // 4]  # clear of AAC's start-up and the cut
    assert abs(np.abs(steady).mean() - expected_mean_level) < 0.1  # a clipped square wave would give ~0.95


def test_nan_audio_is_muxed_as_silence_and_said(tiny_vae, output_dir):
    audio = sine_audio(48000)
    audio["waveform"][..., :100] = float("nan")
    (frames, _), ui = decode_node(tiny_vae, latent_input(9, SPOKEN), audio=audio)
    mp4 = mp4_contents(output_dir / "LiveAvatar_00001.mp4")
    assert (mp4["frames"], mp4["rate"]) == (SPOKEN, 48000) and np.isfinite(mp4["audio"]).all()
    assert any("NaN" in note for note in ui["text"][1:])


def test_empty_audio_keeps_the_video_and_says_so(tiny_vae, output_dir):
    audio = {"waveform": torch.zeros(1, 1, 0), "sample_rate": 48000}
    (frames, _), ui = decode_node(tiny_vae, latent_input(9, SPOKEN), audio=audio)
    assert mp4_contents(output_dir / "LiveAvatar_00001.mp4") == {"frames": SPOKEN, "rate": None, "audio": None}
    assert "the audio input is empty" in ui["text"][1] and "no sound" in ui["text"][1]


def test_muxing_failure_keeps_the_video_without_sound(tiny_vae, output_dir, monkeypatch):
    from nodes.video_writer import Mp4Writer

    def broken_mux(self):
        raise RuntimeError("encoder exploded")

    monkeypatch.setattr(Mp4Writer, "_mux_audio", broken_mux)
    (frames, _), ui = decode_node(tiny_vae, latent_input(9, SPOKEN), audio=sine_audio(48000))
    assert files_under(output_dir) == ["LiveAvatar_00001.mp4"]
    assert mp4_contents(output_dir / "LiveAvatar_00001.mp4")["frames"] == SPOKEN
    assert "encoder exploded" in ui["text"][1] and "without sound" in ui["text"][1]


def test_return_frames_off_gives_one_frame_per_second(tiny_vae, output_dir):
    """12 latents -> 45 frames, cut to 40 spoken: frames 0 and 25 at 1 fps (2 s, as the audio)."""
    latents = latent_input(12, 40)
    (every, fps), _ = decode_node(tiny_vae, latents, save_mp4=False)
    (preview, preview_fps), ui = decode_node(tiny_vae, latents, return_frames=False)
    assert (len(every), fps, preview_fps) == (40, 25.0, 1.0)
    assert torch.equal(preview, every[[0, 25]])
    assert "frames is a preview, 2 frames (one per second of the 40-frame video) at fps 1" in ui["text"][1]


def test_short_video_with_return_frames_off_says_what_frames_holds(tiny_vae, output_dir):
    """Under a second of video: one frame at fps 1.0 (a 1 s preview), and the node says so and
    where the video is, instead of handing on a 1-frame IMAGE silently."""
    (preview, fps), ui = decode_node(tiny_vae, latent_input(3, 9), return_frames=False)
    assert (len(preview), fps) == (1, 1.0)
    video = str(output_dir / "LiveAvatar_00001.mp4")
    assert ui["text"][0] == video and f"The full video is {video}" in ui["text"][1]
    assert mp4_contents(output_dir / "LiveAvatar_00001.mp4")["frames"] == 9


def test_audio_without_save_mp4_is_said_to_be_unused(tiny_vae, output_dir, monkeypatch):
    from nodes import host
    shown = []
    monkeypatch.setattr(host, "show_text", shown.append)
    (frames, _), ui = decode_node(tiny_vae, latent_input(3, 9), save_mp4=False, audio=sine_audio(48000))
    assert len(frames) == 9 and ui == {} and files_under(output_dir) == []
    assert shown == ["the audio input goes only into the mp4, and save_mp4 is off: it is not used"]


def test_return_frames_and_save_mp4_both_off_is_an_error_before_decoding(tiny_vae, output_dir, monkeypatch):
    from liveavatar.vae import StreamDecoder
    decoded = []
    monkeypatch.setattr(StreamDecoder, "decode", lambda *a, **k: decoded.append(1))
    with pytest.raises(ValueError, match="save_mp4 and return_frames are both off"):
        decode_node(tiny_vae, latent_input(3, 9), save_mp4=False, return_frames=False)
    assert decoded == []


def test_node_and_engine_give_the_frames_liveavatar_shows(tiny_vae, output_dir):
    """Priming with the 7 oldest motion latents, first 3 frames dropped, cut to the speech:
    spelled out on the plain stream decoder, against the node and liveavatar.decoding."""
    from liveavatar.decoding import VideoDecoder
    from liveavatar.vae import raw_to_normalised
    latents = latent_input(6, 14)
    normalised, motion = raw_to_normalised(latents["samples"][0]), latents["liveavatar"]["motion_latents"]
    plain = tiny_vae.stream_decoder()
    plain.decode(motion[:, :7])
    expected = torch.cat([plain.decode(normalised[:, :3])[:, 3:], plain.decode(normalised[:, 3:])], dim=1)[:, :14]
    engine = VideoDecoder(tiny_vae, motion, spoken_frames=14)
    from_engine = torch.cat([engine.decode(normalised[:, :3]), engine.decode(normalised[:, 3:])], dim=1)
    (from_node, _), _ = decode_node(tiny_vae, latents, save_mp4=False)
    assert expected.shape[1] == 14 and engine.finished
    assert torch.equal(from_engine, expected)
    assert torch.allclose(from_node, ((expected.permute(1, 2, 3, 0) + 1) / 2).clamp(0, 1))


def test_decode_progress_ends_at_total_with_a_newline(tiny_vae, output_dir, capsys):
    """6 latents, 5 spoken frames: the first block (3 latents) gives 9 frames, enough, so the
    VAE decodes 7 priming + 3 latents = 10; before, the line stopped at 1/2 blocks."""
    decode_node(tiny_vae, latent_input(6, 5), save_mp4=False)
    err = capsys.readouterr().err
    assert err.endswith("LiveAvatar decoding: 10/10\n")


def test_progress_printer_finishes_an_early_stop(capsys):
    from nodes.host import Progress
    progress = Progress(8, "work")
    for _ in range(7):
        progress.step()
    progress.finish()
    progress.close()
    print("next log line", file=__import__("sys").stderr)
    lines = capsys.readouterr().err.split("\r")
    assert lines[-1] == "work: 8/8\nnext log line\n"


def test_priming_can_be_cancelled(tiny_vae, output_dir, monkeypatch):
    """Cancel is checked after every latent the VAE decodes, the 7 priming ones included."""
    from nodes import host

    class Cancelled(Exception):
        pass

    calls = []

    def cancel_on_third():
        calls.append(1)
        if len(calls) == 3:
            raise Cancelled()

    monkeypatch.setattr(host, "check_interrupted", cancel_on_third)
    with pytest.raises(Cancelled):
        decode_node(tiny_vae, latent_input(6, 14), save_mp4=False)
    assert len(calls) == 3


def test_decode_cancelled_keeps_the_frames_so_far_in_the_mp4(tiny_vae, output_dir, monkeypatch):
    """Cancel after the first block (9 frames) is written: the mp4 is finished with those
    frames and their speech, no partial file is left."""
    from nodes import host
    from nodes.video_writer import Mp4Writer
    written = []
    write = Mp4Writer.write
    monkeypatch.setattr(Mp4Writer, "write", lambda self, frames: (write(self, frames), written.append(len(frames))))

    def cancel_after_first_block():
        if written:
            raise KeyboardInterrupt

    monkeypatch.setattr(host, "check_interrupted", cancel_after_first_block)
    with pytest.raises(KeyboardInterrupt):
        decode_node(tiny_vae, latent_input(9, SPOKEN), audio=sine_audio(48000))
    assert files_under(output_dir) == ["LiveAvatar_00001.mp4"] and written == [9]
    mp4 = mp4_contents(output_dir / "LiveAvatar_00001.mp4")
    assert (mp4["frames"], mp4["rate"]) == (9, 48000) and len(mp4["audio"]) >= 9 / FPS * 48000


def test_portrait_encode_shows_progress_and_can_be_cancelled(tiny_vae, monkeypatch, capsys):
    """The portrait alone (1 chunk), then 73 still frames: 1 + 18 chunks of 4 -> 20 steps."""
    from nodes import host
    from nodes.vae_adapter import encode_portrait
    portrait = torch.zeros(3, 1, 16, 16)
    ref, motion = encode_portrait(tiny_vae, portrait)
    assert (ref.shape[1], motion.shape[1]) == (1, 19)
    assert capsys.readouterr().err.endswith("LiveAvatar portrait encode: 20/20\n")
    calls = []

    def cancel_on_fifth():
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(host, "check_interrupted", cancel_on_fifth)
    with pytest.raises(KeyboardInterrupt):
        encode_portrait(tiny_vae, portrait)
    assert len(calls) == 5 and capsys.readouterr().err.endswith("\n")


# ---- sampler inputs --------------------------------------------------------------------
def test_empty_image_batch_is_an_error():
    from nodes.conditioning import image_tensor
    with pytest.raises(ValueError, match=re.escape("the image input (portrait) is an empty batch (0, 64, 64, 3)")):
        image_tensor(torch.zeros(0, 64, 64, 3))


@pytest.mark.parametrize("height, width", [(1, 1), (15, 400)])
def test_tiny_image_is_an_error(height, width):
    from liveavatar.portrait import prepare_portrait
    with pytest.raises(ValueError, match=f"the portrait image is {width}x{height} pixels"):
        prepare_portrait(torch.rand(1, height, width, 3), "384*256")


def test_smallest_accepted_image_still_works():
    from liveavatar.portrait import prepare_portrait
    assert prepare_portrait(torch.ones(1, 16, 16, 3), "384*256").shape == (3, 1, 64, 64)


def test_combined_conditioning_is_an_error():
    from nodes.conditioning import text_embeddings
    one = [torch.randn(1, 8, 4096), {}]
    with pytest.raises(ValueError, match="has 2 entries .e.g. from ConditioningCombine."):
        text_embeddings([one, one], 512)


@pytest.mark.parametrize("kind", ["0..255", "uint8", "-1..1"])
def test_image_in_another_range_is_converted_and_said(kind):
    """Before: a 0..255 IMAGE was clamped to a flat white picture, silently."""
    from nodes.conditioning import image_tensor
    from nodes.host import NodeNotes
    unit = (torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(0)) * 255).round() / 255
    image = {"0..255": unit * 255, "uint8": (unit * 255).round().to(torch.uint8), "-1..1": unit * 2 - 1}[kind]
    notes = NodeNotes()
    assert torch.allclose(image_tensor(image, notes), unit[0], atol=1e-6)
    assert len(notes.lines) == 1 and "the image input (portrait)" in notes.lines[0]


@pytest.mark.parametrize("image, says", [
    (torch.full((1, 32, 32, 3), 1000.0), "pixel values from 1000 to 1000"),
    (torch.full((1, 32, 32, 3), float("nan")), "NaN or infinite pixels"),
    (torch.zeros(1, 3, 32, 32), "looks channels-first"),
    (torch.zeros(1, 32, 32, 3, dtype=torch.int32), "holds torch.int32 values"),
], ids=["out-of-range", "nan", "channels-first", "int32"])
def test_image_no_range_fits_is_an_error(image, says):
    from nodes.conditioning import image_tensor
    with pytest.raises(ValueError, match=re.escape(says)):
        image_tensor(image)


def test_grey_image_becomes_rgb():
    from nodes.conditioning import image_tensor
    grey = torch.rand(1, 32, 32, 1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(image_tensor(grey), grey[0].expand(32, 32, 3))


def test_stereo_whose_channels_cancel_uses_one_and_says_so(tmp_path, monkeypatch):
    """[L, -L] averaged to mono is exactly silence; the encoder now takes L and the node says
    why, on the node (ComfyUI's progress text) and in the log."""
    import sys
    import types
    from liveavatar.audio import Wav2Vec2Encoder, load_audio
    from liveavatar.testing import write_tiny_wav2vec2
    from nodes import host
    voice = sine_audio(16000)["waveform"][0, 0] * torch.linspace(0.2, 1, 16000)
    mono = {"waveform": voice[None, None], "sample_rate": 16000}
    stereo = {"waveform": torch.stack([voice, -voice])[None], "sample_rate": 16000}
    assert torch.equal(load_audio(stereo), load_audio(mono))
    shown = []
    server = types.SimpleNamespace(client_id="c", send_progress_text=lambda text, node, sid: shown.append((node, text)))
    monkeypatch.setitem(sys.modules, "server", types.SimpleNamespace(PromptServer=types.SimpleNamespace(instance=server)))
    monkeypatch.setattr(host, "executing_node_id", lambda: "7")
    encoder = Wav2Vec2Encoder.load(write_tiny_wav2vec2(tmp_path / "wav2vec2.safetensors"))
    features = nodes.LiveAvatarAudioEncode().encode(stereo, encoder, 24)[0]
    expected = nodes.LiveAvatarAudioEncode().encode(mono, encoder, 24)[0]
    assert torch.equal(features.features_30hz, expected.features_30hz)
    assert len(shown) == 1 and shown[0][0] == "7" and "channels cancel out" in shown[0][1]


def test_stereo_with_one_silent_channel_is_still_mixed():
    """Not every quiet mix is a cancelling one: one silent channel halves the level, no more."""
    from liveavatar.audio import mono_mix
    voice = torch.sin(torch.arange(1000.0))
    mix, note = mono_mix(torch.stack([voice, torch.zeros(1000)]))
    assert torch.equal(mix, voice / 2) and note is None


@pytest.mark.parametrize("audio, says", [
    ({"waveform": torch.zeros(1, 1, 16000, dtype=torch.bool), "sample_rate": 16000}, "holds torch.bool values"),
    ({"waveform": torch.zeros(1, 16000, 2), "sample_rate": 16000}, "swap the last two dimensions"),
    ({"waveform": torch.zeros(2, 16000), "sample_rate": 16000}, "add the batch dimension"),
    ({"waveform": torch.zeros(1, 1, 16000), "sample_rate": "fast"}, "sample_rate is 'fast'"),
    ({"waveform": torch.zeros(1, 1, 16000)}, "the audio input is not a ComfyUI AUDIO"),
], ids=["bool", "channels-last", "no-batch", "text-rate", "no-rate"])
def test_audio_that_is_no_audio_is_an_error_for_every_node(audio, says, tiny_vae, output_dir):
    """The same checks for Audio Encode (load_audio) and for muxing (Decode, Live Video)."""
    from liveavatar.audio import load_audio
    with pytest.raises(ValueError, match=re.escape(says)):
        load_audio(audio)
    with pytest.raises(ValueError, match=re.escape(says)):
        decode_node(tiny_vae, latent_input(3, 9), audio=audio)
    assert files_under(output_dir) == []


def test_audio_batch_and_surround_are_used_and_said():
    """A batch of clips: the first, with a note. 5.1: the mono mix of all six channels for the
    features; the front left and right for the mp4."""
    from liveavatar.audio import load_audio
    from nodes.video_writer import prepare_audio
    waves = torch.rand(2, 6, 48000, generator=torch.Generator().manual_seed(0)) - 0.5
    notes = []
    mono = load_audio({"waveform": waves, "sample_rate": 48000}, notes)
    assert notes == ["the audio input holds a batch of 2 clips; the first is used"]
    assert torch.equal(mono, load_audio({"waveform": waves[:1].mean(1, keepdim=True), "sample_rate": 48000}))
    mux, mux_notes = prepare_audio({"waveform": waves, "sample_rate": 48000})
    assert np.array_equal(mux.wave, waves[0, :2].numpy()) and mux_notes == notes


def test_a_block_sampled_before_an_error_is_still_decoded():
    """decode_alongside's CUDA path hands a block over only once the next is queued; when the
    sampler stops (cancel, error) the block already queued still comes out, then the error."""
    from liveavatar.overlap import one_behind

    def blocks():
        yield "block 0"
        yield "block 1"
        raise KeyboardInterrupt

    out = []
    with pytest.raises(KeyboardInterrupt):
        for item in one_behind(blocks(), lambda block: f"decoded {block}", lambda block, work: work):
            out.append(item)
    assert out == ["decoded block 0", "decoded block 1"]
    # a consumer that stops early closes it cleanly, with nothing more handed over
    stream = one_behind(iter(["a", "b", "c"]), str.upper, lambda item, work: work)
    assert next(stream) == "A"
    stream.close()


def test_the_first_block_is_handed_over_at_once():
    """With first_at_once (decode_alongside on CUDA) block 0 comes out before block 1 is asked
    for (the time to the first frame); the later ones one behind, as before."""
    from liveavatar.overlap import one_behind
    produced = []

    def blocks():
        for name in ("a", "b", "c"):
            produced.append(name)
            yield name

    started = []
    stream = one_behind(blocks(), lambda item: started.append(item) or item.upper(), lambda item, work: work,
                        first_at_once=True)
    assert (next(stream), produced) == ("A", ["a"])
    assert (next(stream), produced) == ("B", ["a", "b", "c"])  # b handed over once c is started
    assert list(stream) == ["C"] and started == ["a", "b", "c"]


def test_comfyui_interrupt_is_a_cancel(monkeypatch):
    import sys
    import types
    from nodes import host

    class InterruptProcessingException(Exception):
        pass

    comfy = types.ModuleType("comfy")
    comfy.model_management = types.SimpleNamespace(InterruptProcessingException=InterruptProcessingException)
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.model_management", comfy.model_management)
    assert host.is_cancel(InterruptProcessingException()) and host.is_cancel(KeyboardInterrupt())
    assert not host.is_cancel(RuntimeError("out of memory"))


# ---- already good: guards --------------------------------------------------------------
def test_guard_missing_key_is_named(tiny_files, tmp_path):
    from safetensors import safe_open
    with safe_open(str(tiny_files["dit"]), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "head.head.bias"}
        metadata = f.metadata()
    path = tmp_path / "missing.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(CheckpointError, match="missing: head.head.bias") as error:
        load_dit(path)
    assert str(path) in str(error.value)


def test_guard_nan_audio_is_refused_for_features():
    from liveavatar.audio import load_audio
    audio = sine_audio(16000)
    audio["waveform"][..., 5] = float("nan")
    with pytest.raises(ValueError, match="the audio contains NaN"):
        load_audio(audio)


def test_guard_decoder_memory_flat_over_blocks(tiny_vae):
    decoder = tiny_vae.stream_decoder()
    held = []
    for block in range(6):
        decoder.decode(torch.randn(16, 3, *LATENT_HW, generator=torch.Generator().manual_seed(block)))
        held.append(decoder.cache_bytes)
    assert held[1] == held[-1]


# ---- streaming sampler (fixture DiT) --------------------------------------------------------
@pytest.fixture(scope="module")
def fixture_run():
    from conftest import fixture_sets
    from dit_fixture import fixture_inputs, fixture_model, fixture_settings
    set_dir = fixture_sets("dit_streaming")[0].values[0]
    return fixture_model(set_dir), fixture_inputs(set_dir), fixture_settings(set_dir)


def test_largest_seed_runs_several_clips(fixture_run):
    """The node's maximum seed with 2 clips: clip 1's noise is that of seed 0 (wrapped)."""
    from dataclasses import replace
    from liveavatar.sampler import Streamer
    model, inputs, settings = fixture_run
    streamer = Streamer(model, inputs, replace(settings, noise=None, seed=2 ** 64 - 1, num_clip=2))
    assert streamer.num_clips == 2
    shape = (16, streamer.latent_frames, *streamer.latent_size)
    assert torch.equal(streamer.clip_noise(1), torch.randn(shape, generator=torch.Generator().manual_seed(0)))
    assert sum(1 for _ in streamer.blocks()) == 2 * streamer.blocks_per_clip


def test_guard_cancel_frees_the_caches(fixture_run, monkeypatch):
    from nodes import host
    from nodes.sampler import run_stream
    from liveavatar import sampler
    model, inputs, settings = fixture_run
    streamers = []
    original_init = sampler.Streamer.__init__
    monkeypatch.setattr(sampler.Streamer, "__init__",
                        lambda self, *a: (streamers.append(self), original_init(self, *a))[1])
    monkeypatch.setattr(host, "check_interrupted", lambda: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        run_stream(sampler.Streamer(model, inputs, settings))
    assert len(streamers) == 1 and streamers[0].caches == [] and streamers[0].replicas == []  # sinks live there


def test_streamer_reused_after_an_error_says_to_build_a_new_one(fixture_run):
    """A Streamer stopped by an error or a cancel refuses a second blocks() (its caches are
    inconsistent): build a new one."""
    from liveavatar.sampler import Streamer
    model, inputs, settings = fixture_run
    streamer = Streamer(model, inputs, settings)
    calls = []

    def fail_on_second_step():
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        list(streamer.blocks(fail_on_second_step))
    with pytest.raises(RuntimeError, match="new Streamer"):
        list(streamer.blocks())
