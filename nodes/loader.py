"""LiveAvatar model loader node: Wan2.2-S2V DiT + LiveAvatar LoRA, placed on the GPUs you have."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..liveavatar import CheckpointError, Offload, OneDevice, Sharded, load_dit
from ..liveavatar.dit import LiveAvatarDiT
from ..liveavatar.layers import Fusion
from ..liveavatar.loading import Checkpoint

from . import host

NO_LORA = "None"
PLACEMENTS = ["one GPU", "sharded over GPUs", "offload blocks to CPU"]
WEIGHT_DTYPES = ["bf16", "fp8_e4m3fn", "fp16", "fp32"]
KV_CACHE_DTYPES = ["auto", "bf16", "fp8"]


@dataclass
class LiveAvatarModel:
    """What flows on a LIVEAVATAR_MODEL link: the DiT and how its KV caches are kept."""

    dit: LiveAvatarDiT
    kv_fp8: bool | None  # None: decided per run from free GPU memory
    description: str

    def __repr__(self):  # ComfyUI prints inputs in error reports: keep it short
        return f"LiveAvatarModel({self.description})"


class LiveAvatarModelLoader:
    DESCRIPTION = ("Loads the Wan2.2-S2V-14B diffusion model and merges the LiveAvatar LoRA (4-step distilled "
                   "streaming). Choose where it runs: one GPU, layers sharded over several GPUs, or some blocks "
                   "kept in CPU memory and streamed in (slower, fits smaller GPUs).")
    CATEGORY = "LiveAvatar"
    RETURN_TYPES = ("LIVEAVATAR_MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model_name": (host.list_models("diffusion_models", sharded=True), {
                "tooltip": "Wan2.2-S2V-14B from models/diffusion_models: wan2.2_s2v_14B_bf16.safetensors, the "
                           "fp8_scaled file, or the official sharded folder (pick its .index.json)."}),
            "lora_name": ([NO_LORA] + host.list_models("loras"), {
                "tooltip": "liveavatar.safetensors from models/loras. Without it the model is plain Wan2.2-S2V, "
                           "which needs ~40 steps, not LiveAvatar's 4."}),
            "lora_strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 2.0, "step": 0.05,
                                        "tooltip": "Scale of the LoRA merge; 1.0 is the trained model."}),
            "weight_dtype": (WEIGHT_DTYPES, {"default": "bf16",
                                             "tooltip": "bf16: 33 GB of weights. fp8_e4m3fn: about half, computed in "
                                                        "bf16, slightly lower fidelity."}),
            "placement": (PLACEMENTS, {"default": PLACEMENTS[0],
                                       "tooltip": "one GPU: fastest, needs ~48 GB (bf16) at 384*256. sharded: whole "
                                                  "blocks split over all visible GPUs. offload: keep offload_blocks "
                                                  "blocks in CPU RAM and stream them in each step."}),
            "offload_blocks": ("INT", {"default": 20, "min": 0, "max": 40, "step": 1,
                                       "tooltip": "With 'offload blocks to CPU': how many of the 40 transformer "
                                                  "blocks stay in CPU memory. More saves GPU memory, costs speed."}),
            "kv_cache": (KV_CACHE_DTYPES, {"default": "auto",
                                           "tooltip": "Attention caches (one clip per denoising step): bf16, or fp8 "
                                                      "to halve their memory. auto: fp8 only when bf16 would not fit."}),
            "compile": ("BOOLEAN", {"default": False,
                                    "tooltip": "torch.compile the element-wise parts of each block (about 10% "
                                               "faster at 704*384 on an H100; the first block takes longer)."}),
        }}

    def load(self, model_name, lora_name, lora_strength, weight_dtype, placement, offload_blocks, kv_cache,
             compile=False):
        host.free_host_models()
        Fusion.compile(compile)
        path = host.model_path("diffusion_models", model_name)
        lora = None if lora_name == NO_LORA else host.model_path("loras", lora_name)
        storage = "fp8" if weight_dtype.startswith("fp8") else weight_dtype
        try:
            checkpoint = Checkpoint.open(path)  # opened once: its config decides the placement
            cfg = checkpoint.config()
            dit = load_dit(checkpoint, lora=lora, lora_strength=lora_strength, storage=storage,
                           placement=make_placement(placement, offload_blocks, cfg), config=cfg)
        except CheckpointError as error:
            raise ValueError(f"LiveAvatar model loader: {error}") from None
        kv_fp8 = {"fp8": True, "bf16": False}.get(kv_cache)  # None: auto, fp8 only where bf16 would not fit
        return (LiveAvatarModel(dit, kv_fp8, f"{model_name} + {lora_name} ({weight_dtype}, {placement})"),)


def make_placement(placement: str, offload_blocks: int, cfg):
    device = host.torch_device()
    if placement == PLACEMENTS[1]:
        count = torch.cuda.device_count()
        if count < 2:
            raise ValueError(f"'sharded over GPUs' needs at least 2 visible GPUs, this machine has {count}")
        return Sharded([f"cuda:{i}" for i in range(count)], cfg.num_layers)
    if placement == PLACEMENTS[2]:
        return Offload(device, blocks=min(offload_blocks, cfg.num_layers), num_layers=cfg.num_layers)
    if placement == PLACEMENTS[0]:
        return OneDevice(device)
    raise ValueError(f"unknown placement {placement!r}; choose one of {PLACEMENTS}")
