"""Our DiT in the real ComfyUI's model management, on CPU: run inside a ComfyUI checkout.

    cd /path/to/ComfyUI && python /path/to/pack/tests/comfyui_memory_check.py

(tests/test_memory.py runs it so when $COMFYUI_PATH, or ../ComfyUI, is a ComfyUI checkout.)
Prints one line per verified fact and exits 0; exits 77 when ComfyUI cannot be imported here.
Steps: load our model with the pack's loader node, then a real-size Wan VAE with ComfyUI's
own VAELoader; check ComfyUI's accounting of both; make ComfyUI free memory (partially, then
fully) and check our model is offloaded and comes back when the sampler asks for it; change
the LoRA strength and check the base checkpoint is not read again.
"""
import importlib.util
import sys
import tempfile
from pathlib import Path

PACK = Path(__file__).resolve().parents[1]


def import_comfy():
    sys.path.insert(0, str(Path.cwd()))  # this script's own process, run from the ComfyUI root
    try:
        import comfy.options
        comfy.options.enable_args_parsing(False)
        from comfy.cli_args import args
        args.cpu = True
        import comfy.model_management as mm
        import folder_paths
        import nodes as comfy_nodes
    except ImportError as error:
        print(f"ComfyUI not importable from {Path.cwd()}: {error}")
        sys.exit(77)
    return mm, folder_paths, comfy_nodes


def import_pack():
    spec = importlib.util.spec_from_file_location("ComfyUI-LiveAvatar", PACK / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def check(condition, fact):
    if not condition:
        raise SystemExit(f"FAILED: {fact}")
    print(f"ok: {fact}")


def write_models(root: Path, testing):
    for folder in ("diffusion_models", "loras", "vae"):
        (root / folder).mkdir()
    testing.write_tiny_dit(root / "diffusion_models" / "tiny_dit.safetensors")
    testing.write_tiny_lora(root / "loras" / "tiny_lora.safetensors")
    testing.write_tiny_vae(root / "vae" / "wan_vae_real_size.safetensors", dim=96)  # VAELoader needs the real size


def main():
    mm, folder_paths, comfy_nodes = import_comfy()
    pack = import_pack()
    loader_module = sys.modules["ComfyUI-LiveAvatar.nodes.loader"]
    testing = sys.modules.get("ComfyUI-LiveAvatar.liveavatar.testing") or __import__(
        "ComfyUI-LiveAvatar.liveavatar.testing", fromlist=["_"])
    root = Path(tempfile.mkdtemp(prefix="liveavatar-memory-"))
    write_models(root, testing)
    for folder in ("diffusion_models", "loras", "vae"):
        folder_paths.add_model_folder_path(folder, str(root / folder), is_default=True)

    loader = pack.NODE_CLASS_MAPPINGS["LiveAvatarModelLoader"]()
    settings = dict(model_name="tiny_dit.safetensors", lora_name="tiny_lora.safetensors", weight_dtype="fp32",
                    placement="one GPU", offload_blocks=0, kv_cache="auto")
    model = loader.load(lora_strength=0.5, **settings)[0]
    dit_bytes = sum(t.numel() * t.element_size() for t in model.dit.state_dict().values())
    ours = [m for m in mm.current_loaded_models if m.model is model.weights.managed]
    check(len(ours) == 1, "the loader registered our DiT in comfy.model_management.current_loaded_models")
    check(ours[0].model_memory() == dit_bytes == ours[0].model_loaded_memory(),
          f"ComfyUI accounts its size ({dit_bytes} bytes), all of it loaded, on {ours[0].device}")

    vae = comfy_nodes.VAELoader().load_vae("wan_vae_real_size.safetensors")[0]
    mm.load_models_gpu([vae.patcher])  # what VAEDecode/VAEEncode do before running
    loaded = [m.model for m in mm.current_loaded_models]
    check(vae.patcher in loaded and model.weights.managed in loaded, "the core VAE and our DiT are both loaded")

    device = ours[0].device
    half = dit_bytes // 2
    mm.free_memory(mm.get_free_memory(device) + half, device, keep_loaded=[m for m in mm.current_loaded_models
                                                                          if m.model is vae.patcher])
    partly = ours[0].model_loaded_memory()
    check(ours[0] in mm.current_loaded_models and half <= dit_bytes - partly < dit_bytes,
          f"asked for {half} more bytes, ComfyUI offloaded {dit_bytes - partly} bytes of our DiT module by module")
    model.prepare()  # the sampler's first call
    check(ours[0].model_loaded_memory() == dit_bytes, "the sampler's prepare() loaded it fully again")

    mm.free_memory(1e30, device)
    check(model.weights.managed not in [m.model for m in mm.current_loaded_models]
          and vae.patcher not in [m.model for m in mm.current_loaded_models],
          "when ComfyUI needs all the memory it unloads both (free_memory)")
    model.prepare()
    check(model.weights.managed in [m.model for m in mm.current_loaded_models], "prepare() registers it again")

    opened = []
    original_open = loader_module.Checkpoint.open
    loader_module.Checkpoint.open = classmethod(lambda cls, path: opened.append(path) or original_open(path))
    stronger = loader.load(lora_strength=1.0, **settings)[0]
    stronger.prepare()
    check(not opened and stronger.dit is model.dit and stronger.weights.strength == 1.0,
          "lora_strength 0.5 -> 1.0: same DiT re-merged in place, the checkpoint was not opened again")
    model.prepare()
    check(model.weights.strength == 0.5, "an older cached output gets its own strength (0.5) back on prepare()")
    loader_module.Checkpoint.open = original_open
    print("ALL OK")


if __name__ == "__main__":
    main()
