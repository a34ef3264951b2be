"""Test-only ComfyUI nodes, linked into the test ComfyUI's custom_nodes beside the pack (never
shipped, never loaded by users). They stand in for the two core loaders whose real models are
too big for a 2-core CI machine, and give the tests a read-only view of memory.

- LiveAvatarTestTinyUMT5Loader replaces CLIPLoader (same widgets: clip_name, type, device).
  It builds ComfyUI's own umt5 text encoder classes (comfy.sd.CLIP around
  comfy.sd1_clip.SDClipModel with comfy.text_encoders.t5.T5 and WanT5Tokenizer, as
  CLIPLoader's type 'wan' does) at the tiny size stored in the file's metadata, instead of
  the fixed umt5-xxl config (24 layers, 5.7 GB). The core CLIPTextEncode node stays in the
  graph and encodes the prompt through it: CONDITIONING [1, 512, 4096], padding zeroed, as
  with the real umt5-xxl.
- LiveAvatarTestWanVAELoader replaces VAELoader (same widget: vae_name). It builds ComfyUI's
  own comfy.sd.VAE from the file, with the Wan2.1 network (comfy.ldm.wan.vae.WanVAE) at the
  file's base width instead of the fixed 96: at width 96 the 73-frame portrait encode alone
  takes minutes on 2 CPU cores. (The real VAELoader with a real-size file is tested too.)
- GET /liveavatar_test/memory: what ComfyUI's model management holds (class and bytes of
  each entry of current_loaded_models), what the pack holds (its loaded DiTs, engine VAE /
  audio encoder objects alive, its kept continuation states) and the
  process's resident memory. Read-only.
"""
from __future__ import annotations

import gc
import json
import sys

import torch

import comfy.ldm.wan.vae
import comfy.model_management
import comfy.sd
import comfy.sd1_clip
import comfy.text_encoders.t5
import comfy.text_encoders.wan
import comfy.utils
import folder_paths

PACK_MODULE = "ComfyUI-LiveAvatar"  # the pack's folder name in the test's custom_nodes


class LiveAvatarTestTinyUMT5Loader:
    CATEGORY = "_for_testing"
    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load_clip"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip_name": (folder_paths.get_filename_list("text_encoders"),),
                             "type": (["wan"],), "device": (["default", "cpu"],)}}

    def load_clip(self, clip_name, type="wan", device="default"):
        path = folder_paths.get_full_path_or_raise("text_encoders", clip_name)
        sd, metadata = comfy.utils.load_torch_file(path, safe_load=True, return_metadata=True)
        config = json.loads(metadata["config"])
        target = type_namespace(params={}, clip=tiny_wan_te(config), tokenizer=comfy.text_encoders.wan.WanT5Tokenizer)
        clip = comfy.sd.CLIP(target, tokenizer_data={"spiece_model": sd.pop("spiece_model")},
                             parameters=comfy.utils.calculate_parameters(sd))
        missing, unexpected = clip.load_sd(sd)
        if missing or unexpected:
            raise ValueError(f"tiny umt5 file does not fit: missing {missing}, unexpected {unexpected}")
        return (clip,)


def type_namespace(**values):
    return type("ClipTarget", (), values)()


def tiny_wan_te(config: dict):
    """CLIPLoader type 'wan' builds WanT5Model(UMT5XXlModel) from umt5_config_xxl.json; this is
    the same pair of ComfyUI classes with the file's config."""
    class TinyUMT5(comfy.sd1_clip.SDClipModel):
        def __init__(self, device="cpu", layer="last", layer_idx=None, dtype=None, model_options={}):
            super().__init__(device=device, layer=layer, layer_idx=layer_idx, textmodel_json_config=dict(config),
                             dtype=dtype, special_tokens={"end": 1, "pad": 0}, model_class=comfy.text_encoders.t5.T5,
                             enable_attention_masks=True, zero_out_masked=True, model_options=model_options)

    class TinyWanTE(comfy.sd1_clip.SD1ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            super().__init__(device=device, dtype=dtype, model_options=model_options, name="umt5xxl",
                             clip_model=TinyUMT5)

    return TinyWanTE


class LiveAvatarTestWanVAELoader:
    CATEGORY = "_for_testing"
    RETURN_TYPES = ("VAE",)
    FUNCTION = "load_vae"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"vae_name": (folder_paths.get_filename_list("vae"),)}}

    def load_vae(self, vae_name):
        path = folder_paths.get_full_path_or_raise("vae", vae_name)
        sd, metadata = comfy.utils.load_torch_file(path, safe_load=True, return_metadata=True)
        width = int(sd["encoder.conv1.weight"].shape[0])
        real = comfy.ldm.wan.vae.WanVAE
        # comfy.sd.VAE recognises the Wan2.1 layout and builds WanVAE(dim=96, ...); build it at
        # the file's width for this one call (test-only: the pack never does this).
        comfy.ldm.wan.vae.WanVAE = lambda **config: real(**{**config, "dim": width})
        try:
            vae = comfy.sd.VAE(sd=sd, metadata=metadata)
        finally:
            comfy.ldm.wan.vae.WanVAE = real
        vae.throw_exception_if_invalid()
        return (vae,)


def pack_module(name: str):
    """The pack's nodes.<name> module: ComfyUI imports a custom node package under its folder's
    path (dots replaced), so its modules end in 'ComfyUI-LiveAvatar.nodes.<name>'."""
    for module_name, module in list(sys.modules.items()):
        if module_name.endswith(f"{PACK_MODULE}.nodes.{name}"):
            return module
    return None


def pack_objects(class_name: str) -> list:
    """Live objects of one of the pack's classes (the pack keeps no registries of its own: the
    loaded DiTs are held by the loader node objects ComfyUI caches)."""
    return [o for o in gc.get_objects()
            if type(o).__name__ == class_name and PACK_MODULE in type(o).__module__]


def memory_report() -> dict:
    gc.collect()
    mm = comfy.model_management
    loaded = [{"class": type(m.model.model).__name__, "loaded_bytes": int(m.model_loaded_memory()),
               "bytes": int(m.model_memory())} for m in mm.current_loaded_models if m.model is not None]
    report = {"current_loaded_models": loaded}
    weights = pack_objects("LoadedWeights")
    report["pack_loaded_dits"] = len(weights)
    report["pack_engine_copies"] = len(pack_objects("WanVAE")) + len(pack_objects("Wav2Vec2Encoder"))
    report["pack_kept_states"] = sum(len(w.kept) for w in weights)
    import psutil
    report["rss_bytes"] = psutil.Process().memory_info().rss
    return report


def _add_route():
    try:
        from aiohttp import web
        from server import PromptServer
    except ImportError:
        return
    if getattr(PromptServer, "instance", None) is None:
        return

    @PromptServer.instance.routes.get("/liveavatar_test/memory")
    async def memory(request):
        return web.json_response(memory_report())


_add_route()

NODE_CLASS_MAPPINGS = {"LiveAvatarTestTinyUMT5Loader": LiveAvatarTestTinyUMT5Loader,
                       "LiveAvatarTestWanVAELoader": LiveAvatarTestWanVAELoader}
NODE_DISPLAY_NAME_MAPPINGS = {"LiveAvatarTestTinyUMT5Loader": "Tiny umt5 loader (LiveAvatar tests only)",
                              "LiveAvatarTestWanVAELoader": "Tiny-width Wan VAE loader (LiveAvatar tests only)"}
