"""A shipped UI workflow (workflows/*.json, the frontend's 0.4 format) -> the API prompt that
POST /prompt takes, as the frontend's graphToPrompt builds it (the browser test checks that
they agree): node ids as strings; each widget value under its input name, in the order of the
node's inputs in /object_info (a seed's 'control after generate' value and the trailing
upload widgets of LoadImage / LoadAudio take no input); links as [source id, output slot];
Notes and muted nodes left out; a bypassed node's consumers fed from its input of the same type.
"""
from __future__ import annotations

import copy

VIRTUAL = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
MUTED, BYPASSED = 2, 4
WIDGET_KINDS = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# What the integration tests run instead of the core loaders of models too big for CI
# (tests/integration/comfyui_test_nodes: same widgets, tiny models, ComfyUI's own classes).
TEST_LOADERS = {"CLIPLoader": "LiveAvatarTestTinyUMT5Loader", "VAELoader": "LiveAvatarTestWanVAELoader"}


def to_api(workflow: dict, object_info: dict) -> dict:
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in VIRTUAL or node.get("mode", 0) in (MUTED, BYPASSED):
            continue
        inputs = widget_inputs(node, object_info[node["type"]])
        for slot in node.get("inputs", []):
            if slot.get("link") is None:
                continue
            source = resolve(links, nodes, slot["link"])
            if source is None:
                inputs.pop(slot["name"], None)
            else:
                inputs[slot["name"]] = source
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def resolve(links: dict, nodes: dict, link_id: int):
    """[source id, slot] feeding a link, through bypassed nodes; None if it comes from a muted one."""
    _, source_id, slot, _, _, kind = links[link_id]
    source = nodes[source_id]
    mode = source.get("mode", 0)
    if mode == MUTED:
        return None
    if mode != BYPASSED:
        return [str(source_id), slot]
    candidates = source.get("inputs", [])
    same_slot = [candidates[slot]] if slot < len(candidates) and candidates[slot]["type"] == kind else []
    for inp in same_slot + [i for i in candidates if i["type"] == kind]:
        if inp.get("link") is not None:
            return resolve(links, nodes, inp["link"])
    return None


def widget_inputs(node: dict, info: dict) -> dict:
    values = node.get("widgets_values") or []
    if isinstance(values, dict):
        return {k: v for k, v in values.items()}
    values, inputs = list(values), {}
    order = info.get("input_order") or {s: list(info["input"].get(s, {})) for s in ("required", "optional")}
    for section in ("required", "optional"):
        for name in order.get(section, []):
            spec = info["input"][section][name]
            kind, options = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
            if not (isinstance(kind, list) or kind in WIDGET_KINDS) or options.get("forceInput"):
                continue
            if not values:
                return inputs
            inputs[name] = values.pop(0)
            if kind in ("INT", "FLOAT") and options.get("control_after_generate", name in ("seed", "noise_seed")):
                values.pop(0)  # the 'control after generate' widget: frontend only
    return inputs


def with_test_loaders(prompt: dict) -> dict:
    """The same prompt with the core text encoder and VAE loaders swapped for the test ones."""
    prompt = copy.deepcopy(prompt)
    for node in prompt.values():
        node["class_type"] = TEST_LOADERS.get(node["class_type"], node["class_type"])
    return prompt


# The smallest area the generator nodes take (width and height >= 128): on a CPU the VAE's cost
# grows with the pixels, even at the test VAE's tiny width (384*256 takes minutes).
CPU_SIZE = {"size": "custom", "width": 128, "height": 128}
GENERATORS = ("LiveAvatarSampler", "LiveAvatarLiveVideo", "LiveAvatarSession")


def cpu_sized(prompt: dict) -> dict:
    """The same prompt with the generator nodes at CPU_SIZE (everything else as shipped)."""
    prompt = copy.deepcopy(prompt)
    for node in prompt.values():
        if node["class_type"] in GENERATORS:
            node["inputs"].update(CPU_SIZE)
    return prompt


def nodes_of(prompt: dict, class_type: str) -> list[str]:
    return [node_id for node_id, node in prompt.items() if node["class_type"] == class_type]
