"""The shipped workflows: node types, links and widget values are valid, and the graph of our
nodes runs end to end on tiny random weights in the real key layout."""
import json
import math
import os
import re
from pathlib import Path

import av
import numpy as np
import pytest
import torch

import nodes
from liveavatar.audio import Wav2Vec2Encoder
from liveavatar.portrait import parse_area, target_size
from liveavatar.testing import write_tiny_dit, write_tiny_lora, write_tiny_vae, write_tiny_wav2vec2
from liveavatar.vae import WanVAE

WORKFLOWS = sorted((Path(__file__).resolve().parents[1] / "workflows").glob("*.json"))
OURS = nodes.NODE_CLASS_MAPPINGS
# ComfyUI core nodes the workflows may use: input name -> type (widgets listed in order).
CORE = {
    "LoadImage": {"inputs": {}, "outputs": ["IMAGE", "MASK"], "widgets": ["image", "upload"]},
    "LoadAudio": {"inputs": {}, "outputs": ["AUDIO"], "widgets": ["audio", "audioUI", "upload"]},
    "CLIPLoader": {"inputs": {}, "outputs": ["CLIP"], "widgets": ["clip_name", "type", "device"]},
    "CLIPTextEncode": {"inputs": {"clip": "CLIP"}, "outputs": ["CONDITIONING"], "widgets": ["text"]},
    "VAELoader": {"inputs": {}, "outputs": ["VAE"], "widgets": ["vae_name"]},
    "AudioEncoderLoader": {"inputs": {}, "outputs": ["AUDIO_ENCODER"], "widgets": ["audio_encoder_name"]},
    "ImageScaleBy": {"inputs": {"image": "IMAGE"}, "outputs": ["IMAGE"], "widgets": ["upscale_method", "scale_by"]},
    "CreateVideo": {"inputs": {"images": "IMAGE", "audio": "AUDIO", "fps": "FLOAT"}, "outputs": ["VIDEO"], "widgets": ["fps"]},
    "SaveVideo": {"inputs": {"video": "VIDEO"}, "outputs": [], "widgets": ["filename_prefix", "format", "codec"]},
    "Note": {"inputs": {}, "outputs": [], "widgets": ["text"]},
}
FILE_WIDGETS = {"model_name": (".safetensors", ".index.json"), "lora_name": (".safetensors", "None")}
STANDARD_FILES = {"wan2.2_s2v_14B_bf16.safetensors", "wan2.2_s2v_14B_fp8_scaled.safetensors", "liveavatar.safetensors",
                  "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "wan_2.1_vae.safetensors",
                  "wav2vec2_large_english_fp16.safetensors"}


def load(path):
    return json.loads(path.read_text())


def declared_inputs(cls) -> dict:
    spec = cls.INPUT_TYPES()
    return {**spec["required"], **spec.get("optional", {})}


def widget_specs(cls) -> list:
    """(name, spec) of widget inputs in order, with the seed's control_after_generate slot."""
    out = []
    for name, (kind, *options) in declared_inputs(cls).items():
        if isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN"):
            opts = options[0] if options else {}
            out.append((name, (kind, opts)))
            if opts.get("control_after_generate"):
                out.append(("control_after_generate", (["fixed", "increment", "decrement", "randomize"], {})))
    return out


def check_widget(name, kind, opts, value):
    if isinstance(kind, list):
        if name in FILE_WIDGETS:
            assert value.endswith(FILE_WIDGETS[name]), (name, value)
        else:
            assert value in kind, (name, value, kind)
    elif kind == "INT":
        assert isinstance(value, int) and opts.get("min", -math.inf) <= value <= opts.get("max", math.inf), (name, value)
        assert (value - opts.get("min", 0)) % opts.get("step", 1) == 0, (name, value)
    elif kind == "FLOAT":
        assert isinstance(value, (int, float)) and opts.get("min", -math.inf) <= value <= opts.get("max", math.inf)
    elif kind == "BOOLEAN":
        assert isinstance(value, bool), (name, value)
    else:
        assert isinstance(value, str), (name, value)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_only_our_nodes_and_listed_core_nodes(path):
    types = {n["type"] for n in load(path)["nodes"]}
    assert types <= set(OURS) | set(CORE), types - set(OURS) - set(CORE)
    if types & {"LiveAvatarLiveVideo", "LiveAvatarSession"}:  # samples, decodes and writes the mp4 itself
        return
    assert {"LiveAvatarSampler", "LiveAvatarDecode"} <= types
    # the video is saved: by core CreateVideo -> SaveVideo, or by our decode node's own mp4
    saves_mp4 = all(n["widgets_values"][0] for n in load(path)["nodes"] if n["type"] == "LiveAvatarDecode")
    assert {"CreateVideo", "SaveVideo"} <= types or saves_mp4


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_links_match_declared_types(path):
    workflow = load(path)
    by_id = {n["id"]: n for n in workflow["nodes"]}
    for link_id, src, src_slot, dst, dst_slot, link_type in workflow["links"]:
        source, target = by_id[src], by_id[dst]
        out_type = list(OURS[source["type"]].RETURN_TYPES)[src_slot] if source["type"] in OURS else \
            CORE[source["type"]]["outputs"][src_slot]
        target_input = target["inputs"][dst_slot]
        if target["type"] in OURS:
            kind = declared_inputs(OURS[target["type"]])[target_input["name"]][0]
        else:
            kind = CORE[target["type"]]["inputs"][target_input["name"]]
        assert out_type == link_type == kind == target_input["type"], (link_id, out_type, link_type, kind)
        assert target_input["link"] == link_id and link_id in source["outputs"][src_slot]["links"]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_widget_values_fit_declared_inputs(path):
    for node in load(path)["nodes"]:
        values = node.get("widgets_values", [])
        if node["type"] in OURS:
            specs = widget_specs(OURS[node["type"]])
            assert len(values) == len(specs), (node["type"], values, [s[0] for s in specs])
            for (name, (kind, opts)), value in zip(specs, values):
                check_widget(name, kind, opts, value)
        else:
            assert len(values) <= len(CORE[node["type"]]["widgets"]), node["type"]
        for value in values:
            if isinstance(value, str) and value.endswith(".safetensors"):
                assert value in STANDARD_FILES, value


def test_fast_and_quality_settings():
    fast, quality = (load(p) for p in WORKFLOWS if p.stem in ("liveavatar_fast", "liveavatar_quality"))

    def sampler_values(workflow):
        node = next(n for n in workflow["nodes"] if n["type"] == "LiveAvatarSampler")
        return dict(zip([s[0] for s in widget_specs(OURS["LiveAvatarSampler"])], node["widgets_values"]))

    assert (sampler_values(fast)["size"], sampler_values(fast)["sample_steps"], sampler_values(fast)["infer_frames"]) == ("384*256", 3, 48)
    assert (sampler_values(quality)["size"], sampler_values(quality)["sample_steps"]) == ("704*384", 4)
    bypassed = [n for n in quality["nodes"] if n["mode"] == 4]
    assert bypassed and all(n["type"] == "ImageScaleBy" for n in bypassed)
    assert any(n["type"] == "Note" and "face restore" in n["widgets_values"][0].lower() for n in quality["nodes"])


# ---- the frontend's own rules ------------------------------------------------------------------
# The ComfyUI frontend (comfyui_frontend_package 1.27, validateComfyWorkflow) parses a workflow
# with its zod schema zComfyWorkflow (version 0.4) and alerts on the first violation; these are
# those rules, plus the id bookkeeping the graph relies on when it adds nodes and links.
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.I)
SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[\da-z-]+(?:\.[\da-z-]+)*)?(?:\+[\da-z-]+(?:\.[\da-z-]+)*)?$")
GIT_HASH = re.compile(r"^[0-9a-f]{4,40}$", re.I)
REPO_LIKE_ID = re.compile(r"^[a-zA-Z0-9](?:[a-zA-Z0-9._-]*[a-zA-Z0-9])?$")


def is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def is_int(v):
    return is_number(v) and float(v).is_integer()


def is_node_id(v):
    return is_int(v) or isinstance(v, str)


def is_slot(v):
    return is_int(v) or (isinstance(v, str) and v.lstrip("-").isdigit())


def is_data_type(v):
    return isinstance(v, str) or is_number(v) or (isinstance(v, list) and all(isinstance(x, str) for x in v))


def is_vector2(v):
    return (isinstance(v, list) and len(v) == 2 and all(map(is_number, v))) or \
        (isinstance(v, dict) and is_number(v.get("0")) and is_number(v.get("1")))


def is_version(v):
    if not isinstance(v, str):
        return False
    v = v.removeprefix("v")
    return v == "unknown" or bool(SEMVER.match(v) or GIT_HASH.match(v))


def frontend_problems(workflow: dict) -> list[str]:
    """Every place where `workflow` breaks the frontend's zComfyWorkflow rules."""
    problems = []

    def need(ok, where):
        if not ok:
            problems.append(where)

    need(is_number(workflow.get("version")) and workflow.get("version") != 1, "version: a number (0.4 format)")
    need("id" not in workflow or (isinstance(workflow["id"], str) and UUID.match(workflow["id"])), "id: a UUID")
    need("revision" not in workflow or is_number(workflow["revision"]), "revision: a number")
    need(is_node_id(workflow.get("last_node_id")), "last_node_id")
    need(is_number(workflow.get("last_link_id")), "last_link_id: a number")
    need(workflow.get("config") is None or isinstance(workflow["config"], dict), "config")
    extra = workflow.get("extra") or {}
    need(isinstance(extra, dict), "extra")
    if "ds" in extra:
        need(is_number(extra["ds"].get("scale")) and is_vector2(extra["ds"].get("offset")), "extra.ds")
    for group in workflow.get("groups", []):
        need(isinstance(group.get("title"), str) and isinstance(group.get("bounding"), list)
             and len(group["bounding"]) == 4 and all(map(is_number, group["bounding"])), f"group {group}")
    for link in workflow.get("links", []):
        need(isinstance(link, list) and len(link) == 6 and is_number(link[0]) and is_node_id(link[1])
             and is_slot(link[2]) and is_node_id(link[3]) and is_slot(link[4]) and is_data_type(link[5]), f"link {link}")
    for node in workflow.get("nodes", []):
        problems += [f"node {node.get('id')}: {p}" for p in node_problems(node)]
    return problems


def node_problems(node: dict) -> list[str]:
    checks = {
        "id": is_node_id(node.get("id")), "type": isinstance(node.get("type"), str),
        "pos": is_vector2(node.get("pos")), "size": is_vector2(node.get("size")),
        "flags": isinstance(node.get("flags"), dict) and all(isinstance(node["flags"].get(k, False), bool) for k in
                                                            ("collapsed", "pinned", "allow_interaction", "horizontal")),
        "order": is_number(node.get("order")), "mode": is_number(node.get("mode")),
        "inputs": all(isinstance(i.get("name"), str) and is_data_type(i.get("type"))
                      and (i.get("link") is None or is_int(i["link"])) for i in node.get("inputs", [])),
        "outputs": all(isinstance(o.get("name"), str) and is_data_type(o.get("type"))
                       and (o.get("links") is None or all(map(is_int, o["links"]))) for o in node.get("outputs", [])),
        "properties": isinstance(node.get("properties"), dict),
        "widgets_values": isinstance(node.get("widgets_values", []), (list, dict)),
        "color": all(isinstance(node.get(k, ""), str) for k in ("color", "bgcolor")),
    }
    properties = node.get("properties") or {}
    checks["properties.cnr_id"] = "cnr_id" not in properties or bool(REPO_LIKE_ID.match(str(properties["cnr_id"])))
    checks["properties.ver"] = "ver" not in properties or is_version(properties["ver"])
    return [name for name, ok in checks.items() if not ok]


def id_bookkeeping_problems(workflow: dict) -> list[str]:
    """The graph hands out new ids above last_node_id / last_link_id: they must be the largest."""
    node_ids = [n["id"] for n in workflow["nodes"]]
    link_ids = [l[0] for l in workflow["links"]]
    problems = []
    if len(set(node_ids)) != len(node_ids) or len(set(link_ids)) != len(link_ids):
        problems.append("duplicate node or link ids")
    if node_ids and workflow["last_node_id"] < max(node_ids):
        problems.append(f"last_node_id {workflow['last_node_id']} < node id {max(node_ids)}")
    if link_ids and workflow["last_link_id"] < max(link_ids):
        problems.append(f"last_link_id {workflow['last_link_id']} < link id {max(link_ids)}")
    return problems


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_passes_the_frontends_schema(path):
    workflow = load(path)
    assert frontend_problems(workflow) == []
    assert id_bookkeeping_problems(workflow) == []


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_template_has_a_thumbnail(path):
    """The template browser (frontend 1.27) shows /api/workflow_templates/<pack>/<name>.jpg for a
    pack's template; without the file its card is blank."""
    from PIL import Image
    with Image.open(path.with_suffix(".jpg")) as thumbnail:
        assert thumbnail.format == "JPEG" and thumbnail.width >= 256 and thumbnail.height >= 128


def test_frontend_rules_catch_what_the_frontend_rejects():
    workflow = load(WORKFLOWS[0])
    assert frontend_problems({**workflow, "id": "liveavatar-fast"}) == ["id: a UUID"]
    broken_link = {**workflow, "links": [workflow["links"][0][:5]] + workflow["links"][1:]}
    assert frontend_problems(broken_link)[0].startswith("link ")
    node = {**workflow["nodes"][0], "properties": {"ver": "not-a-version"}}
    assert frontend_problems({**workflow, "nodes": [node]}) == [f"node {node['id']}: properties.ver"]
    assert id_bookkeeping_problems({**workflow, "last_link_id": 1})


def frontend_bundle() -> str | None:
    """The frontend's main script, from comfyui_frontend_package in this Python or else in
    ComfyUI's ($COMFYUI_PYTHON)."""
    try:
        import comfyui_frontend_package
        package = Path(comfyui_frontend_package.__file__).parent
    except ImportError:
        python = os.environ.get("COMFYUI_PYTHON")
        if not python:
            return None
        import subprocess
        found = subprocess.run([python, "-c", "import comfyui_frontend_package as p, os; print(os.path.dirname(p.__file__))"],
                               capture_output=True, text=True)
        if found.returncode != 0:
            return None
        package = Path(found.stdout.strip())
    for script in sorted((package / "static" / "assets").glob("index-*.js")):
        text = script.read_text(encoding="utf-8", errors="replace")
        if "const zComfyWorkflow = " in text:
            return text
    return None


@pytest.mark.integration
def test_rules_match_the_installed_frontend():
    """The installed frontend package's schema still says what frontend_problems checks."""
    text = frontend_bundle()
    if text is None:
        reason = "comfyui_frontend_package not installed here nor in $COMFYUI_PYTHON (tests/integration/setup_comfyui.sh)"
        if os.environ.get("LIVEAVATAR_INTEGRATION") == "required":
            pytest.fail(reason)
        pytest.skip(reason)
    schema = text[text.index("const zComfyWorkflow = "):text.index("const zComfyWorkflow1 = ")]
    for rule in ("id: z.string().uuid().optional()", "last_link_id: z.number()", "links: z.array(zComfyLink)",
                 "version: z.number()", "nodes: z.array(zComfyNode)"):
        assert rule in schema, rule
    link = text[text.index("const zComfyLink = "):text.index("const zComfyLinkExtension")]
    assert [part for part in ("z.number()", "zNodeId", "zSlotIndex", "zDataType") if part in link] == \
        ["z.number()", "zNodeId", "zSlotIndex", "zDataType"]


# ---- running the graph --------------------------------------------------------------------
SPEECH_SECONDS = 1.0
PORTRAIT_HW = (480, 360)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, monkeypatch_module):
    """Tiny random files under the standard ComfyUI names."""
    root = tmp_path_factory.mktemp("models")
    for folder in ("diffusion_models", "loras", "vae", "audio_encoders"):
        (root / folder).mkdir()
    write_tiny_dit(root / "diffusion_models" / "wan2.2_s2v_14B_bf16.safetensors")
    write_tiny_lora(root / "loras" / "liveavatar.safetensors")
    write_tiny_vae(root / "vae" / "wan_2.1_vae.safetensors")
    write_tiny_wav2vec2(root / "audio_encoders" / "wav2vec2_large_english_fp16.safetensors")
    monkeypatch_module.setenv("LIVEAVATAR_MODELS", str(root))
    monkeypatch_module.setenv("LIVEAVATAR_OUTPUT", str(tmp_path_factory.mktemp("output")))
    return root


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def speech(rate=22050):
    t = np.arange(int(SPEECH_SECONDS * rate)) / rate
    wave = 0.2 * np.sin(2 * np.pi * 150 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
    return {"waveform": torch.from_numpy(wave.astype(np.float32))[None, None], "sample_rate": rate}


def core_standins(models: Path):
    """What the listed core nodes return, made without ComfyUI."""
    cond = torch.zeros(1, 512, 4096)
    cond[0, :8] = torch.randn(8, 4096, generator=torch.Generator().manual_seed(0)) * 0.2
    return {
        "LoadImage": lambda: (torch.rand(1, *PORTRAIT_HW, 3, generator=torch.Generator().manual_seed(1)), None),
        "LoadAudio": lambda: (speech(),),
        "CLIPLoader": lambda: (None,),
        "CLIPTextEncode": lambda clip: ([[cond, {}]],),
        "VAELoader": lambda: (WanVAE.load(models / "vae" / "wan_2.1_vae.safetensors"),),
        "AudioEncoderLoader": lambda: (Wav2Vec2Encoder.load(models / "audio_encoders" / "wav2vec2_large_english_fp16.safetensors"),),
        "ImageScaleBy": lambda image: (image,),  # bypassed in the shipped graph
        "CreateVideo": lambda images, audio=None, fps=25.0: ({"images": images, "audio": audio, "fps": fps},),
        "SaveVideo": lambda video: (),
    }


def run_workflow(workflow, models):
    """Execute the graph in dependency order: our nodes for real, core nodes as stand-ins."""
    by_id = {n["id"]: n for n in workflow["nodes"]}
    links = {l[0]: l for l in workflow["links"]}
    standins, results = core_standins(models), {}

    def value_of(node_id):
        if node_id in results:
            return results[node_id]
        node = by_id[node_id]
        kwargs = {}
        for inp in node["inputs"]:
            if inp.get("link") is not None:
                _, src, slot, *_ = links[inp["link"]]
                kwargs[inp["name"]] = value_of(src)[slot]
        if node["type"] in OURS:
            cls = OURS[node["type"]]
            specs = [s[0] for s in widget_specs(cls)]
            widgets = dict(zip(specs, node["widgets_values"]))
            widgets.pop("control_after_generate", None)
            args = {k: v for k, v in {**widgets, **kwargs}.items() if k in declared_inputs(cls)}
            out = getattr(cls(), cls.FUNCTION)(**args)
            results[node_id] = out["result"] if isinstance(out, dict) else out
        else:
            results[node_id] = standins[node["type"]](**kwargs)
        return results[node_id]

    for node in workflow["nodes"]:
        if node["type"] != "Note":
            value_of(node["id"])
    return results


def expected_frames(seconds: float, infer_frames: int = 48) -> int:
    """Hand-derived from the audio length: wav2vec2 gives floor((n - 400) / 320) + 1 frames at
    50 Hz for n samples at 16 kHz; int(T50 * 30 / 50) at 30 Hz; video frame i (25 fps) is
    covered while round(1.2 i) < T30. Generation makes whole clips, 3 frames fewer on the
    first block; the decode keeps the covered frames."""
    t50 = (int(seconds * 16000) - 400) // 320 + 1
    t30 = int(t50 / 50 * 30)
    covered = sum(1 for i in range(10 ** 4) if round(1.2 * i) < t30)
    clips = int(t30 / (infer_frames * 1.2)) + 1
    return min(covered, clips * infer_frames - 3)


def expected_continued_frames(seconds: float, infer_frames: int = 48) -> int:
    """A continued part drops no frame and starts 3 frames (the previous part's last 0.12 s of
    speech) before its own speech: the covered frames plus those 3, within its whole clips."""
    t30 = int(((int(seconds * 16000) - 400) // 320 + 1) / 50 * 30)
    covered = sum(1 for i in range(10 ** 4) if round(1.2 * i) < t30)
    return min(covered + 3, (int(t30 / (infer_frames * 1.2)) + 1) * infer_frames)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_runs_end_to_end_on_tiny_weights(path, tiny_models, monkeypatch):
    workflow = load(path)
    by_type = {n["type"]: n for n in workflow["nodes"]}
    if "LiveAvatarSession" in by_type:
        return check_session_workflow(workflow, tiny_models, monkeypatch)
    results = run_workflow(workflow, tiny_models)
    generator = by_type.get("LiveAvatarSampler") or by_type["LiveAvatarLiveVideo"]
    size = generator["widgets_values"][0]
    if "CreateVideo" in by_type:
        video = results[by_type["CreateVideo"]["id"]][0]
        images, fps, audio = video["images"], video["fps"], video["audio"]
        assert images.shape == (expected_frames(SPEECH_SECONDS), *target_size(*PORTRAIT_HW, parse_area(size)), 3)
        assert images.dtype == torch.float32 and images.min() >= 0 and images.max() <= 1 and images.std() > 0
    elif "LiveAvatarDecode" in by_type:  # the continue workflow: each part's decode wrote its mp4
        output = Path(os.environ["LIVEAVATAR_OUTPUT"])
        for part, frames in (("LiveAvatar_part1", expected_frames(SPEECH_SECONDS)),
                             ("LiveAvatar_part2", expected_continued_frames(SPEECH_SECONDS))):
            with av.open(str(sorted(output.glob(f"{part}_*.mp4"))[-1])) as mp4:
                assert sum(1 for p in mp4.demux(video=0) if p.size) == frames, part
                assert (mp4.streams.video[0].height, mp4.streams.video[0].width) == \
                    target_size(*PORTRAIT_HW, parse_area(size))
        first, second = (results[n["id"]][0] for n in workflow["nodes"] if n["type"] == "LiveAvatarSampler")
        assert second["liveavatar"]["continues"] and "state" not in second["liveavatar"]
        assert second["liveavatar"]["continuation"] == "exact"  # part 1 kept its state
        return
    else:  # the live workflow: the node wrote the mp4 itself; frames is the one-per-second preview
        images, fps, _ = results[generator["id"]]
        written = sorted(Path(os.environ["LIVEAVATAR_OUTPUT"]).glob("LiveAvatar_live_*.mp4"))[-1]
        with av.open(str(written)) as mp4:
            assert sum(1 for p in mp4.demux(video=0) if p.size) == expected_frames(SPEECH_SECONDS)
            assert (mp4.streams.video[0].height, mp4.streams.video[0].width) == target_size(*PORTRAIT_HW, parse_area(size))
        seconds = -(-expected_frames(SPEECH_SECONDS) // 25)  # frames 0, 25, 50, ...
        assert images.shape == (seconds, *target_size(*PORTRAIT_HW, parse_area(size)), 3) and fps == 1.0
        return
    assert fps == 25.0 and audio["sample_rate"] == 22050


def check_session_workflow(workflow, models, monkeypatch):
    """The session workflow with a page that speaks the test speech (all at once, then Stop):
    its mp4 holds a frame for every 25 fps frame of the speech, at the shipped size."""
    from nodes import host
    from test_session_loop import Page, Server
    server = Server()
    monkeypatch.setattr(host, "prompt_server", lambda: server)
    wave = speech(16000)["waveform"][0, 0].numpy()
    page = Page(server, wave, at_once=True)
    page.start()
    results = run_workflow(workflow, models)
    page.join(60)
    session = next(n for n in workflow["nodes"] if n["type"] == "LiveAvatarSession")
    path, frames = results[session["id"]]
    assert frames == expected_frames(SPEECH_SECONDS)
    with av.open(path) as mp4:
        assert sum(1 for p in mp4.demux(video=0) if p.size) == frames
        assert (mp4.streams.video[0].height, mp4.streams.video[0].width) == \
            target_size(*PORTRAIT_HW, parse_area(session["widgets_values"][0]))
        assert mp4.streams.audio[0].codec_context.name == "aac"

