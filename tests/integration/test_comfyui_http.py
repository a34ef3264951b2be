"""The pack inside the real ComfyUI (CPU), driven through its HTTP API and websocket as the
frontend drives it: the shipped workflows queued with POST /prompt, their outputs read back;
cancel through /interrupt; /free; the continue workflow; the live view's messages.

What differs from a user's run of a shipped workflow (api_prompt.py): the core CLIPLoader and
VAELoader are swapped for the test loaders (same widgets, tiny umt5 / tiny-width Wan VAE built
with ComfyUI's own classes), and the generator nodes run at the smallest area (custom 128*128);
every other node and value is the shipped one. The square 256x256 portrait at a 128*128 budget
gives a 128x128 video (scale 1/2, sides already multiples of 64)."""
from __future__ import annotations

import time
import urllib.request

import pytest
import torch
from safetensors.torch import load_file

from .api_prompt import cpu_sized, nodes_of, to_api, with_test_loaders
from .media import DROPPED_FIRST, FPS, probe, video_frames
from .model_files import PART1_SECONDS, PART2_SECONDS, SPEECH_SECONDS

VIDEO_HW = (128, 128)

PACK_NODES = {"LiveAvatarModelLoader", "LiveAvatarAudioEncode", "LiveAvatarSampler", "LiveAvatarDecode",
              "LiveAvatarLiveVideo", "LiveAvatarSession"}


def prompt_for(comfyui, shipped, name: str, **audio) -> dict:
    """The shipped workflow as an API prompt with the test loaders at the CPU size;
    audio={node id: file} sets LoadAudio files."""
    prompt = cpu_sized(with_test_loaders(to_api(shipped[name], comfyui.object_info())))
    for node_id, file in audio.items():
        prompt[node_id]["inputs"]["audio"] = file
    return prompt


def succeeded(comfyui, run) -> dict:
    history = comfyui.history(run.prompt_id)
    errors = run.of("execution_error")
    assert run.outcome == "execution_success", (errors[0].get("exception_message"), errors[0].get("traceback")) \
        if errors else run.messages[-5:]
    assert history["status"]["status_str"] == "success" and history["status"]["completed"] is True
    return history


def check_mp4(path, seconds: float, frames: int):
    info = probe(path)
    assert info["video_codec"] == "h264" and info["audio_codec"] == "aac", info
    assert (info["height"], info["width"]) == VIDEO_HW, info
    assert info["frames"] == frames, info
    assert info["fps"] == FPS
    assert abs(info["audio_seconds"] - seconds) < 0.1, info  # the whole speech is muxed (AAC pads < 1 frame)
    return info


def test_comfyui_loads_the_pack(comfyui):
    info = comfyui.object_info()
    assert PACK_NODES <= set(info)
    assert {info[n]["python_module"] for n in PACK_NODES} == {"custom_nodes.ComfyUI-LiveAvatar"}
    assert "IMPORT FAILED" not in comfyui.log()
    extensions = comfyui.get("/extensions")
    assert {f"/extensions/ComfyUI-LiveAvatar/js/{name}.js"
            for name in ("live_view", "session", "loader_upgrade")} <= set(extensions)


@pytest.mark.parametrize("name", ["fast", "quality"])
def test_shipped_workflow_makes_the_video(comfyui, shipped, name):
    """SaveVideo's mp4: H.264 + AAC, 128x128 (quality's 2x upscale node is bypassed as
    shipped), a frame for each 25 fps frame of the speech, the whole speech as sound."""
    prompt = prompt_for(comfyui, shipped, name)
    assert not nodes_of(prompt, "ImageScaleBy")  # bypassed: not sent
    history = succeeded(comfyui, comfyui.run(prompt))
    saved = history["outputs"][nodes_of(prompt, "SaveVideo")[0]]["images"]
    assert len(saved) == 1 and saved[0]["filename"].endswith(".mp4")
    check_mp4(comfyui.output_file(saved[0]), SPEECH_SECONDS, video_frames(SPEECH_SECONDS))
    assert "missing audio encoder" not in comfyui.log()  # ComfyUI took every wav2vec2 weight


def test_live_view_messages_and_file(comfyui, shipped):
    """The Live Video node's websocket messages: 'running' when the run starts (the page drops
    the last video), one per block with bytes and frames growing, 'done' once the file is
    complete, and last 'finished' with every frame; the file they name is the node's output,
    complete, and /view serves byte ranges of it (what the browser's player fetches)."""
    prompt = prompt_for(comfyui, shipped, "live")
    live_id = nodes_of(prompt, "LiveAvatarLiveVideo")[0]
    run = comfyui.run(prompt)
    history = succeeded(comfyui, run)
    events = run.of("liveavatar.live")
    frames = video_frames(SPEECH_SECONDS)
    assert len(events) >= 4 and all(e["node"] == live_id for e in events)
    assert [e["status"] for e in events] == ["running"] * (len(events) - 1) + ["finished"]
    assert (events[0]["frames"], events[0]["bytes"], events[0]["done"]) == (0, 0, False)
    done = [e["done"] for e in events]
    assert done == sorted(done) and done[-1]  # once complete, it stays complete
    assert all(b["bytes"] >= a["bytes"] and b["frames"] >= a["frames"] for a, b in zip(events, events[1:]))
    blocks = [e for e in events if e["frames"]]
    assert len(blocks) >= 2 and 0 < blocks[0]["frames"] < blocks[1]["frames"] and events[-1]["frames"] == frames
    assert all(e["total_frames"] == frames and e["video_fps"] == FPS for e in blocks)
    assert events[0]["mime"].startswith("video/mp4")
    file = history["outputs"][live_id]["live_video"][0]
    assert {k: events[-1][k] for k in ("filename", "subfolder", "type")} == file
    path = comfyui.output_file(file)
    data = path.read_bytes()
    assert len(data) == events[-1]["bytes"]
    check_mp4(path, SPEECH_SECONDS, frames)
    query = f"/view?filename={file['filename']}&subfolder={file['subfolder']}&type=output"
    for start, end in ((0, 99), (blocks[0]["bytes"], len(data) - 1)):
        with comfyui.request(query, headers={"Range": f"bytes={start}-{end}"}) as response:
            assert response.status == 206
            assert response.headers["Content-Range"] == f"bytes {start}-{end}/{len(data)}"
            assert response.read() == data[start:end + 1]


def test_interrupt_stops_the_run_and_the_next_run_works(comfyui, shipped):
    """POST /interrupt as soon as our sampler reports progress: the run ends interrupted in our
    node, as history says, with no output of it and no continuation state left; the same prompt
    queued again then runs to the end."""
    prompt = prompt_for(comfyui, shipped, "fast")
    prompt[nodes_of(prompt, "LiveAvatarSampler")[0]]["inputs"]["seed"] = 7  # not a cached result
    sampler = nodes_of(prompt, "LiveAvatarSampler")[0]
    sent = []

    def interrupt_mid_run(run, kind, data):
        if kind == "progress" and data.get("node") == sampler and not sent:
            sent.append(data)
            comfyui.post("/interrupt", {})

    run = comfyui.run(prompt, on_message=interrupt_mid_run)
    assert sent and sent[0]["value"] < sent[0]["max"]
    assert run.outcome == "execution_interrupted", run.messages[-5:]
    interrupted = run.of("execution_interrupted")[0]
    assert (interrupted["node_id"], interrupted["node_type"]) == (sampler, "LiveAvatarSampler")
    history = comfyui.history(run.prompt_id)
    assert history["status"]["status_str"] == "error" and history["status"]["completed"] is False
    assert "execution_interrupted" in [m[0] for m in history["status"]["messages"]]
    assert not history["outputs"]
    assert comfyui.memory()["pack_kept_states"] == 0
    history = succeeded(comfyui, comfyui.run(prompt))
    saved = history["outputs"][nodes_of(prompt, "SaveVideo")[0]]["images"][0]
    check_mp4(comfyui.output_file(saved), SPEECH_SECONDS, video_frames(SPEECH_SECONDS))


def test_free_releases_our_model(comfyui, shipped):
    """After a run our DiT is in ComfyUI's current_loaded_models and the pack holds it, and no
    copy of the VAE or wav2vec2 (ours run on the core loaders' parameters, built per use);
    POST /free (unload_models, free_memory) leaves nothing of ours; then a run works again."""
    prompt = prompt_for(comfyui, shipped, "fast")
    succeeded(comfyui, comfyui.run(prompt))  # (may come from ComfyUI's cache: the models stay loaded then too)
    before = comfyui.memory()
    assert "ResidentWeights" in [m["class"] for m in before["current_loaded_models"]], before
    assert before["pack_loaded_dits"] == 1 and before["pack_engine_copies"] == 0, before
    comfyui.post("/free", {"unload_models": True, "free_memory": True})
    deadline, after = time.time() + 60, None
    while time.time() < deadline:
        after = comfyui.memory()
        if not after["current_loaded_models"] and after["pack_loaded_dits"] == 0 and after["pack_engine_copies"] == 0:
            break
        time.sleep(1)
    assert after["current_loaded_models"] == [] and after["pack_loaded_dits"] == 0, after
    assert after["pack_engine_copies"] == 0 and after["pack_kept_states"] == 0, after
    run = comfyui.run(prompt)
    succeeded(comfyui, run)
    assert {d["node"] for d in run.of("executing") if d["node"]} >= set(prompt)  # every node ran again
    assert comfyui.memory()["pack_loaded_dits"] == 1


def saved_latents(comfyui, history, node_id) -> torch.Tensor:
    file = history["outputs"][node_id]["latents"][0]
    return load_file(str(comfyui.output_file(file)))["latent_tensor"]


def with_saved_latents(prompt: dict, sampler_ids: list[str]) -> dict:
    """Core SaveLatent nodes on the samplers' LATENT outputs (added by the test, nothing else changes)."""
    for sampler in sampler_ids:
        prompt[f"save_{sampler}"] = {"class_type": "SaveLatent",
                                     "inputs": {"samples": [sampler, 0], "filename_prefix": f"latents/sampler_{sampler}"}}
    return prompt


@pytest.fixture(scope="module")
def continued(comfyui, shipped):
    """One run of the continue workflow, with core SaveLatent nodes on both samplers."""
    prompt = prompt_for(comfyui, shipped, "continue")
    first, second = sorted(nodes_of(prompt, "LiveAvatarSampler"), key=lambda s: "continue_from" in prompt[s]["inputs"])
    history = succeeded(comfyui, comfyui.run(with_saved_latents(prompt, [first, second])))
    kept_after = comfyui.memory()["pack_kept_states"]
    return prompt, history, first, second, kept_after


def test_continue_workflow_writes_both_parts(comfyui, continued):
    """Part 1 (keep_state on) and part 2 (continue_from part 1) each write their mp4, 128x128,
    and no speech falls between them: part 1's video ends 3 frames (0.12 s) before its speech
    (LiveAvatar drops a video's first 3 frames), so its mp4 holds the speech up to its last
    frame and part 2's opens with the rest, over 3 more frames (a continuation drops none);
    part 2 used part 1's kept state up."""
    prompt, history, first, second, kept_after = continued
    decodes = {prompt[d]["inputs"]["latents"][0]: d for d in nodes_of(prompt, "LiveAvatarDecode")}
    lead = DROPPED_FIRST / FPS
    parts = ((first, PART1_SECONDS - lead, video_frames(PART1_SECONDS)),
             (second, lead + PART2_SECONDS, video_frames(PART2_SECONDS, continues=True) + DROPPED_FIRST))
    for sampler, seconds, frames in parts:
        path = history["outputs"][decodes[sampler]]["text"][0]
        check_mp4(path, seconds, frames)
    part1, part2 = saved_latents(comfyui, history, f"save_{first}"), saved_latents(comfyui, history, f"save_{second}")
    assert part1.shape[2] == part2.shape[2] == 48 // 4  # one clip each, 4 frames per latent
    assert kept_after == 0


@pytest.mark.xfail(strict=True, reason=(
    "through the graph the parts cannot equal one run: LiveAvatar Audio Encode runs wav2vec2 on each "
    "part's audio alone, and wav2vec2's features of a frame depend on all the audio it is given "
    "(positional convolution, global self-attention), so the parts' features differ from the same "
    "frames' features in one encoding of the whole speech; the exact continuation (kept streaming state) "
    "equals one run only for the same features (tests/test_continue.py feeds the same features)"))
def test_continue_workflow_equals_one_run_over_the_whole_speech(comfyui, shipped, continued):
    """The continue workflow's two parts == the fast workflow (same sampler settings) over the
    whole speech: the LATENT of part 1 followed by part 2's equals the single run's LATENT."""
    _, history, first, second, _ = continued
    joined = torch.cat([saved_latents(comfyui, history, f"save_{first}"),
                        saved_latents(comfyui, history, f"save_{second}")], dim=2)
    whole = prompt_for(comfyui, shipped, "fast", **{"2": "speech_whole.wav"})
    sampler = nodes_of(whole, "LiveAvatarSampler")[0]
    whole = with_saved_latents(whole, [sampler])
    for node in ("10", "12", "13"):  # only the LATENT is compared: no decode
        whole.pop(node)
    single = saved_latents(comfyui, succeeded(comfyui, comfyui.run(whole)), f"save_{sampler}")
    assert joined.shape == single.shape
    assert float((joined - single).norm() / single.norm()) <= 1e-5


def test_real_size_vae_through_the_core_vae_loader(comfyui):
    """The core VAELoader takes a Wan2.1 VAE in the real layout at its real size (width 96) and
    LiveAvatar Decode decodes with it: a small latent video (EmptyHunyuanLatentVideo, 16 channels,
    3 latents of 8x8) gives the 1 + 4 * 2 = 9 frames of 64x64 the causal VAE makes of 3 latents
    (a LATENT from elsewhere: no LiveAvatar priming, so no frame dropped)."""
    from liveavatar.testing import write_tiny_vae
    write_tiny_vae(comfyui.base / "models" / "vae" / "wan_2.1_vae_real_size.safetensors", dim=96)
    prompt = {
        "1": {"class_type": "VAELoader", "inputs": {"vae_name": "wan_2.1_vae_real_size.safetensors"}},
        "2": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 64, "height": 64, "length": 9, "batch_size": 1}},
        "3": {"class_type": "LiveAvatarDecode", "inputs": {"latents": ["2", 0], "vae": ["1", 0], "save_mp4": False,
                                                           "return_frames": True, "filename_prefix": "LiveAvatar"}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "vae_check"}},
    }
    history = succeeded(comfyui, comfyui.run(prompt))
    saved = history["outputs"]["4"]["images"]
    from PIL import Image
    assert len(saved) == 9
    for file in saved:
        with Image.open(comfyui.output_file(file)) as image:
            assert image.size == (64, 64)
