"""Our models in the real ComfyUI's model management, on CPU: run inside a ComfyUI checkout.

    cd /path/to/ComfyUI && python /path/to/pack/tests/comfyui_memory_check.py [--gpu]

(tests/test_memory.py runs it so when $COMFYUI_PATH is a ComfyUI checkout; --gpu: on ComfyUI's
GPU instead of --cpu, where the DiT's merges are computed on the GPU and wav2vec2 runs in fp16.)
Prints one line per verified fact and exits 0; exits 77 when ComfyUI cannot be imported here.
Steps: load our model with the pack's loader node (built on ComfyUI's offload device, not yet
loaded, as ComfyUI's own loaders leave theirs), a real-size Wan VAE with ComfyUI's VAELoader
and a wav2vec2-base-size audio encoder with ComfyUI's own audio-encoder loader; let ComfyUI
load both models for a run, account them, offload ours partially and fully, load it back;
check that unloading drops the kept streaming states; change the LoRA strength and compare
the weights bit for bit with a fresh load; check that our streaming VAE and wav2vec2 are the
core objects' own parameters (no copy) and compute what our own copies compute; preview CPU
latents through ComfyUI's own latent->RGB previewer, as the sampler does.
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
        args.cpu = "--gpu" not in sys.argv
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


def pack_module(name):
    return sys.modules.get(f"ComfyUI-LiveAvatar.{name}") or __import__(f"ComfyUI-LiveAvatar.{name}", fromlist=["_"])


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


def bits(model):
    return {n: t.detach().cpu().reshape(-1).contiguous().view(__import__("torch").uint8).clone()
            for n, t in model.state_dict().items()}


def loaded(mm):
    return [m.model for m in mm.current_loaded_models]


def check_dit(mm, folder_paths, loader_module, pack, root):
    import torch
    loader = pack.NODE_CLASS_MAPPINGS["LiveAvatarModelLoader"]()
    settings = dict(model_name="tiny_dit.safetensors", lora_name="tiny_lora.safetensors", weight_dtype="bf16",
                    placement="one GPU", offload_blocks=0, kv_cache="auto")
    model = loader.load(lora_strength=0.5, **settings)[0]
    patcher = model.weights.managed
    check(patcher is not None and patcher not in loaded(mm),
          "the loader made a ModelPatcher for our DiT and left loading it to the run (as ComfyUI's loaders do)")
    model.prepare()
    dit_bytes = sum(t.numel() * t.element_size() for t in model.dit.state_dict().values())
    ours = [m for m in mm.current_loaded_models if m.model is patcher]
    check(len(ours) == 1 and ours[0].model_memory() == dit_bytes == ours[0].model_loaded_memory(),
          f"prepare() had ComfyUI load it (load_models_gpu): accounted {dit_bytes} bytes, all loaded, on "
          f"{ours[0].device}")

    device = ours[0].device
    half = dit_bytes // 2
    mm.free_memory(mm.get_free_memory(device) + half, device)
    partly = ours[0].model_loaded_memory()
    check(ours[0] in mm.current_loaded_models and half <= dit_bytes - partly < dit_bytes,
          f"asked for {half} more bytes, ComfyUI offloaded {dit_bytes - partly} bytes of our DiT module by module")
    model.prepare()
    check(ours[0].model_loaded_memory() == dit_bytes, "the sampler's prepare() loaded it fully again")

    class Kept:
        closed = False

        def close(self):
            Kept.closed = True
    handle = model.weights.kept.keep(Kept(), None)
    mm.free_memory(1e30, device)
    check(patcher not in loaded(mm), "when ComfyUI needs all the memory it unloads it (free_memory)")
    check(Kept.closed and len(model.weights.kept) == 0 and handle.token in model.weights.kept._gone,
          "unloading it released the streaming state kept for a continuation (the patcher's detach callback)")
    model.prepare()
    check(patcher in loaded(mm), "prepare() loads it again")

    opened = []
    original_open = loader_module.Checkpoint.open
    loader_module.Checkpoint.open = classmethod(lambda cls, path: opened.append(path) or original_open(path))
    stronger = loader.load(lora_strength=1.0, **settings)[0]
    for strength in (1.7, 0.05, 1.3):
        loader.load(lora_strength=strength, **settings)[0].prepare()
    stronger.prepare()
    loader_module.Checkpoint.open = original_open
    fresh = pack_module("liveavatar.loading").load_dit(  # as the loader loads it: same devices
        root / "diffusion_models" / "tiny_dit.safetensors", lora=root / "loras" / "tiny_lora.safetensors",
        lora_strength=1.0, storage="bf16", placement=loader_module.make_placement("one GPU", 0, None))
    check(not opened and stronger.dit is model.dit and all(torch.equal(a, b) for a, b in zip(
        bits(stronger.dit).values(), bits(fresh).values())),
        "lora_strength 0.5 -> 1.7 -> 0.05 -> 1.3 -> 1.0: the same DiT, checkpoint not opened again, weights bit "
        "for bit those of a fresh load at 1.0")
    model.prepare()
    check(model.weights.strength == 0.5, "an older cached output gets its own strength (0.5) back on prepare()")
    return model


def check_vae(mm, comfy_nodes, model):
    import torch
    adapter = pack_module("nodes.vae_adapter")
    vae = comfy_nodes.VAELoader().load_vae("wan_vae_real_size.safetensors")[0]
    model.prepare(also=[adapter.vae_patcher(vae)])  # what a run does: both in one request
    check(vae.patcher in loaded(mm) and model.weights.managed in loaded(mm), "the core VAE and our DiT are both loaded")
    engine = adapter.streaming_vae(vae)
    core = dict(vae.first_stage_model.named_parameters())
    check(all(p is core[n] and p.data_ptr() == core[n].data_ptr() for n, p in engine.net.named_parameters()),
          f"our streaming VAE is the core VAE's {len(core)} parameters themselves (same tensors, no copy), "
          f"{engine.dtype} on {engine.device}")
    owned = pack_module("liveavatar.vae").WanVAE.from_state_dict(vae.first_stage_model.state_dict(),
                                                                 device=engine.device, dtype=engine.dtype)
    latents = torch.randn(16, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    ours, reference = engine.decode(latents), owned.decode(latents)
    error = float((ours - reference).norm() / reference.norm())
    check(error < 1e-6, f"it decodes what our own copy decodes (relative difference {error:.1e})")
    mm.free_memory(1e30, mm.get_torch_device())
    check(vae.patcher not in loaded(mm), "ComfyUI unloads the VAE as its own")


def check_audio_encoder(mm):
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2Model
    import comfy.audio_encoders.audio_encoders as audio_encoders
    audio = pack_module("liveavatar.audio")
    adapter = pack_module("nodes.vae_adapter")
    base = Wav2Vec2Config(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                          conv_bias=False, feat_extract_norm="group", do_stable_layer_norm=False)
    torch.manual_seed(0)
    sd = {k: v.half() for k, v in Wav2Vec2Model(base).state_dict().items()}  # as the fp16 file holds it
    core = audio_encoders.load_audio_encoder_from_sd(dict(sd))
    encoder = adapter.audio_encoder(core)
    params = dict(core.model.named_parameters())
    check(all(p is params[n] for n, p in encoder.model.named_parameters()) and
          len(params) == len(list(encoder.model.parameters())),
          f"our wav2vec2 is the core audio encoder's {len(params)} parameters themselves (stored "
          f"{sorted({str(p.dtype) for p in params.values()})}, computed in {encoder.dtype} on {encoder.device})")
    t = torch.arange(16000) / 16000
    wave = 0.3 * torch.sin(2 * torch.pi * 200 * t)
    ours = encoder.hidden_states(wave)
    owned = audio.Wav2Vec2Encoder.from_state_dict(sd, {"num_attention_heads": 12}).hidden_states(wave)
    error = float((ours - owned).norm() / owned.norm())
    half = encoder.dtype == torch.float16  # on a GPU: computed in fp16
    check(encoder.dtype == (torch.float16 if encoder.device.type == "cuda" else torch.float32) and
          error < (5e-3 if half else 1e-5),
          f"it computes what our own fp32 copy on the CPU computes (relative difference {error:.1e})")
    with torch.no_grad():  # the base-size encoder does not normalise its input in ComfyUI: give it ours
        comfy_out = core.encode_audio(audio.normalise(wave)[None, None], 16000)
    comfy_states = torch.cat(comfy_out["encoded_audio_all_layers"]).float()
    error = float((ours - comfy_states).norm() / comfy_states.norm())
    check(ours.shape == comfy_states.shape and error < (5e-3 if half else 1e-5),
          f"and what ComfyUI's own wav2vec2 computes from them (relative difference {error:.1e})")
    check({str(p.dtype) for p in params.values()} >= {"torch.float16"},
          "the core's weights stayed as ComfyUI stores them (nothing cast or copied in place)")


def check_latent_preview():
    """The sampler's latent preview through ComfyUI's own previewer (latent->RGB projection, as
    `--preview-method latent2rgb` picks it), fed the CPU copies the sampler hands over."""
    import numpy as np
    import torch
    from comfy.cli_args import LatentPreviewMethod, args
    import comfy.latent_formats
    import latent_preview
    host = pack_module("nodes.host")
    method, args.preview_method = args.preview_method, LatentPreviewMethod.Latent2RGB
    try:
        preview = host.latent_previewer()
        latents = torch.randn(16, 3, 4, 6, generator=torch.Generator().manual_seed(0))
        kind, image, size = preview(latents)
    finally:
        args.preview_method = method
    wan = comfy.latent_formats.Wan21()
    rgb = latents[:, 0].permute(1, 2, 0) @ torch.tensor(wan.latent_rgb_factors) + torch.tensor(wan.latent_rgb_factors_bias)
    expected = ((rgb + 1) / 2).clamp(0, 1).mul(255).to(torch.uint8).numpy()
    got = np.asarray(image)
    check(kind == "JPEG" and size == latent_preview.MAX_PREVIEW_RESOLUTION and got.shape == (4, 6, 3)
          and np.abs(got.astype(int) - expected.astype(int)).max() <= 1,
          "the sampler's CPU latents preview through ComfyUI's latent->RGB previewer (the first frame, Wan2.1 factors)")


def main():
    mm, folder_paths, comfy_nodes = import_comfy()
    pack = import_pack()
    loader_module = sys.modules["ComfyUI-LiveAvatar.nodes.loader"]
    root = Path(tempfile.mkdtemp(prefix="liveavatar-memory-"))
    write_models(root, pack_module("liveavatar.testing"))
    for folder in ("diffusion_models", "loras", "vae"):
        folder_paths.add_model_folder_path(folder, str(root / folder), is_default=True)
    model = check_dit(mm, folder_paths, loader_module, pack, root)
    check_vae(mm, comfy_nodes, model)
    check_audio_encoder(mm)
    check_latent_preview()
    print("ALL OK")


if __name__ == "__main__":
    main()
