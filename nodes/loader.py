"""LiveAvatar model loader node: Wan2.2-S2V DiT + LiveAvatar LoRA, placed on the GPUs you have."""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..liveavatar import CheckpointError, Offload, OneDevice, Sharded, StepPerGPU, load_dit
from ..liveavatar.dit import LiveAvatarDiT
from ..liveavatar.loading import STORAGE_DTYPES, Checkpoint, Lora, expected_tensors, set_lora_strength
from ..liveavatar.memory import GIB
from ..liveavatar.placement import same_device
from ..liveavatar.sampler import VIDEO_FRAMES_PER_BLOCK, StreamSettings, warm_up
from ..liveavatar.settings import CHOICES, RunOptions

from . import host
from .continuation import KeptStreams

NO_LORA = "None"
PLACEMENTS = ["one GPU", "sharded over GPUs", "offload blocks to CPU", "one denoising step per GPU"]
WEIGHT_DTYPES = ["bf16", "fp8_e4m3fn", "fp16", "fp32"]
KV_CACHE_DTYPES = ["auto", "bf16", "fp8"]
LORA_STRENGTH = {"default": 1.0, "min": 0.0, "max": 2.0, "step": 0.05}
WARM_UP = ["auto", "off", "384*256", "688*368", "704*384", "720*400"]
AUTO_WARM_UP = "704*384"  # the sampler's default size
WARM_UP_CLIPS = 2  # the rings fill in the first clip; the second runs full rings and the refreshed sink


@dataclass(eq=False)
class LoadedWeights:
    """One DiT in memory, shared by every loader output that differs only in LoRA strength.

    `checkpoint` and `lora` are what its merged weights derive from (a strength change derives
    them again); `strength` is the LoRA strength they hold now (None while being changed);
    `managed` is ComfyUI's ModelPatcher of the part on ComfyUI's main device (None outside
    ComfyUI); `kept` holds the streaming states kept for exact continuations: they go with this
    model, and when ComfyUI unloads it."""

    dit: LiveAvatarDiT
    checkpoint: Checkpoint | None = None
    lora: Path | None = None
    strength: float | None = None
    managed: object = None
    kept: KeptStreams = field(default_factory=KeptStreams)
    warmed: set = field(default_factory=set)  # (height, width, RunOptions) warm_up ran with for these weights

    def set_lora_strength(self, strength: float):
        if self.lora is None or strength == self.strength:
            return
        self.strength = None  # unknown until every weight is set: an error midway makes the next call redo all
        set_lora_strength(self.dit, self.checkpoint, Lora.read(self.lora), strength)
        self.strength = strength


@dataclass
class LiveAvatarModel:
    """What flows on a LIVEAVATAR_MODEL link: the DiT and how its KV caches are kept."""

    dit: LiveAvatarDiT
    kv_fp8: bool | None  # None: decided per run from free GPU memory
    description: str
    weights: LoadedWeights | None = None  # None: a DiT of its own (standalone use, tests)
    lora_strength: float | None = None  # what this output asks for; the weights are shared
    memory_cap_gib: float | None = None  # StreamSettings.memory_cap_gib of its runs (None: the free memory)
    options: RunOptions | None = None  # how its runs compute (None: as the DiT is set)

    def __post_init__(self):
        if self.weights is None:
            self.weights = LoadedWeights(self.dit)

    def prepare(self, also=()):
        """Before sampling: the weights on the GPU through ComfyUI (which frees other models for
        them), together with the ComfyUI models in `also` (e.g. the VAE), at this output's LoRA
        strength and with its options. An older output of the loader, still in ComfyUI's cache,
        gets its own strength and options back here."""
        host.load_models([self.weights.managed, *also])
        if self.lora_strength is not None:
            self.weights.set_lora_strength(self.lora_strength)
        if self.options is not None:
            self.dit.use_options(self.options)

    def warm_up(self, height: int, width: int):
        """The engine's warm_up (a throw-away run at this size) on the GPU, with progress and
        cancel; its caches are freed at once."""
        self.prepare()
        settings = StreamSettings(kv_fp8=self.kv_fp8, memory_cap_gib=self.memory_cap_gib)
        progress = host.Progress(WARM_UP_CLIPS * settings.infer_frames // VIDEO_FRAMES_PER_BLOCK * settings.steps,
                                 "LiveAvatar warm-up")

        def on_step():
            host.check_interrupted()
            progress.step()

        try:
            warm_up(self.dit, height, width, settings, clips=WARM_UP_CLIPS, on_step=on_step)
        finally:
            progress.close()
            host.release_memory()

    def __repr__(self):  # ComfyUI prints inputs in error reports: keep it short
        return f"LiveAvatarModel({self.description})"


OPTION_TOOLTIPS = {
    "kernels": "Fused Triton kernels for the element-wise work of each block (norms, RoPE, residual adds, fp8 "
               "quantisation). auto: on a GPU when Triton works there (checked once against PyTorch); off: plain "
               "PyTorch (slower; to rule the kernels out when something looks wrong); on: as auto, and also under "
               "Triton's CPU interpreter (tests).",
    "attention": "How attention reads the portrait/motion sink and the recent frames' cache. auto: the cache is "
                 "attended where it lies and merged with the sink (fastest); gather: all copied into one buffer "
                 "and attended in one call (more memory; for comparison).",
    "fp8_compute": "With fp8 weights on a GPU. auto: multiplied on the fp8 tensor cores where the GPU has them "
                   "(RTX 40xx, H100 and newer), else dequantised; dequantize: always dequantised to bf16 first "
                   "(slower, a little closer to bf16 weights).",
    "cuda_graphs": "On one GPU, the steady part of a run (once the first clip has filled the caches) is replayed "
                   "as CUDA graphs: the CPU queues one graph per step instead of ~1300 kernels (faster at small "
                   "sizes and in live sessions). auto: when the memory plan leaves room for the graphs' own "
                   "activations; off: kernel by kernel.",
}
# Optional, after warm_up: a workflow saved before they existed keeps its widget values in place.
OPTION_INPUTS = {name: (list(CHOICES[name]), {"default": "auto", "tooltip": OPTION_TOOLTIPS[name]})
                 for name in ("kernels", "attention", "fp8_compute", "cuda_graphs")}


def run_options(kernels, attention, fp8_compute, cuda_graphs="auto") -> RunOptions:
    """The loader's kernels / attention / fp8_compute / cuda_graphs inputs as RunOptions; a clear error otherwise."""
    try:
        return RunOptions(kernels=kernels, attention=attention, fp8_compute=fp8_compute, cuda_graphs=cuda_graphs)
    except ValueError as error:
        raise ValueError(f"LiveAvatar model loader: {error}") from None


def describe(options: RunOptions) -> str:
    """The options that are not auto, for the model's one-line description."""
    changed = [f"{name} {value}" for name, value in vars(options).items() if value != "auto"]
    return "".join(f", {part}" for part in changed)


def check_memory_cap(cap) -> float:
    if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not 0 <= cap < float("inf"):
        raise ValueError(f"memory_cap_gib must be a number of GiB, 0 or more (0: the free GPU memory), got {cap!r}")
    return float(cap)


def warm_up_size(choice: str, device) -> tuple[int, int] | None:
    """(height, width) in pixels for the loader's warm_up input, None for no warm-up."""
    if choice == "auto":
        choice = AUTO_WARM_UP if torch.device(device).type == "cuda" else "off"
    if choice == "off":
        return None
    if choice not in WARM_UP:
        raise ValueError(f"warm_up must be one of {', '.join(WARM_UP)}, got {choice!r}")
    width, height = (int(side) for side in choice.split("*"))
    return height, width


def check_lora_strength(strength) -> float:
    """The loader's lora_strength, refused before any work unless a number in the declared range."""
    low, high = LORA_STRENGTH["min"], LORA_STRENGTH["max"]
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not low <= strength <= high:
        raise ValueError(f"lora_strength must be a number from {low} to {high} (1.0 is the trained model), "
                         f"got {strength!r}")
    return float(strength)


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
            "lora_strength": ("FLOAT", {**LORA_STRENGTH,
                                        "tooltip": "Scale of the LoRA merge; 1.0 is the trained model. Changing it "
                                                   "sets the merged weights again from the base weights (no reload)."}),
            "weight_dtype": (WEIGHT_DTYPES, {"default": "bf16",
                                             "tooltip": "bf16: 33 GB of weights. fp8_e4m3fn: about half, computed in "
                                                        "bf16, slightly lower fidelity."}),
            "placement": (PLACEMENTS, {"default": PLACEMENTS[0],
                                       "tooltip": "one GPU: needs ~48 GB (bf16) at 384*256. sharded: whole blocks "
                                                  "split over all visible GPUs (for when one GPU cannot hold the "
                                                  "model). offload: keep offload_blocks blocks in CPU RAM and stream "
                                                  "them in once per tick. one denoising step per GPU: a full copy of "
                                                  "the weights on each visible GPU, the steps dealt out over them "
                                                  "(about 1.8x the speed with 2 GPUs)."}),
            "offload_blocks": ("INT", {"default": 20, "min": 0, "max": 40, "step": 1,
                                       "tooltip": "With 'offload blocks to CPU': how many of the 40 transformer "
                                                  "blocks stay in CPU memory. More saves GPU memory, costs speed."}),
            "kv_cache": (KV_CACHE_DTYPES, {"default": "auto",
                                           "tooltip": "Attention caches (one clip per denoising step): bf16, or fp8 "
                                                      "to halve their memory. auto: fp8 (for bf16 and fp8 weights)."}),
            "memory_cap_gib": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1024.0, "step": 0.5,
                                         "tooltip": "GPU memory a run may use, per GPU, as on a card of that size: "
                                                    "other models' tensors on the GPU count against it (0: the free "
                                                    "memory). Blocks are offloaded (with 'offload blocks to CPU') and "
                                                    "activations trimmed to fit; a clear error names what to change "
                                                    "if it cannot."}),
        }, "optional": {
            "warm_up": (WARM_UP, {"default": "auto",
                                  "tooltip": "A short throw-away run right after loading, so that the first run "
                                             "finds the GPU kernels compiled and the attention plans built (its first "
                                             "frame comes seconds sooner). Pick the size you will generate at; auto: "
                                             "704*384 on a GPU, nothing on the CPU (nothing to prepare there)."}),
            **OPTION_INPUTS,
        }}

    def load(self, model_name, lora_name, lora_strength, weight_dtype, placement, offload_blocks, kv_cache,
             compile=None, memory_cap_gib=0.0, warm_up="auto", kernels="auto", attention="auto", fp8_compute="auto",
             cuda_graphs="auto"):
        # compile: the old input (it changed nothing while the fused kernels ran), still taken and ignored
        lora_strength = check_lora_strength(lora_strength)  # NaN fails the range test too
        memory_cap_gib = check_memory_cap(memory_cap_gib)
        warm_size = warm_up_size(warm_up, host.torch_device())
        options = run_options(kernels, attention, fp8_compute, cuda_graphs)
        key = (model_name, lora_name, weight_dtype, placement, offload_blocks)
        # The weights this loader node has in memory, by everything but the LoRA strength, held on
        # the node object (ComfyUI keeps it between runs, as its LoraLoader keeps its file), so
        # a strength change sets the weights again without reloading. Weak: when ComfyUI drops
        # the loader's output (another model picked, cache cleared) the DiT is freed.
        loaded = self.__dict__.setdefault("loaded_weights", weakref.WeakValueDictionary())
        weights = loaded.get(key)
        if weights is None:  # a strength change alone sets the LoRA again in the sampler, no reload
            weights = self._load_weights(model_name, lora_name, lora_strength, weight_dtype, placement, offload_blocks,
                                         options, memory_cap_gib)
            loaded[key] = weights
        weights.dit.use_options(options)  # the loaded weights, computing as asked now: no reload
        if warm_size is not None and (*warm_size, options) not in weights.warmed:  # once per size and options
            model = LiveAvatarModel(weights.dit, None, "", weights, lora_strength, memory_cap_gib or None, options)
            model.warm_up(*warm_size)
            weights.warmed.add((*warm_size, options))
        kv_fp8 = {"fp8": True, "bf16": False}.get(kv_cache)  # None: auto, fp8 only where bf16 would not fit
        description = f"{model_name} + {lora_name} @ {lora_strength} ({weight_dtype}, {placement}{describe(options)})"
        return (LiveAvatarModel(weights.dit, kv_fp8, description, weights, lora_strength, memory_cap_gib or None,
                                options),)

    def _load_weights(self, model_name, lora_name, lora_strength, weight_dtype, placement, offload_blocks, options,
                      memory_cap_gib=0.0):
        path = host.model_path("diffusion_models", model_name, "model_name")
        lora = None if lora_name == NO_LORA else host.model_path("loras", lora_name, "lora_name")
        storage = "fp8" if weight_dtype.startswith("fp8") else weight_dtype
        try:
            checkpoint = Checkpoint.open(path)  # opened once: its config decides the placement
            cfg = checkpoint.config()
            where = make_placement(placement, offload_blocks, cfg)
            where.bind(cfg)  # resident_bytes asks it where every weight goes
            check_weights_under_cap(resident_bytes(cfg, storage, where), where.device, placement, weight_dtype,
                                    memory_cap_gib)
            # Inside ComfyUI the part on its main device is built where ComfyUI builds its own
            # diffusion models (its offload device, or the GPU when that has more room) and
            # loaded by its model management (prepare).
            built_on = host.initial_device(resident_bytes(cfg, storage, where), where.device)
            dit = load_dit(checkpoint, lora=lora, lora_strength=lora_strength, storage=storage, placement=where,
                           config=cfg, offload_device=built_on, options=options)
        except CheckpointError as error:
            raise ValueError(f"LiveAvatar model loader: {error}") from None
        weights = LoadedWeights(dit, checkpoint, lora, lora_strength)
        weights.managed = host.manage(resident_modules(dit, where), where.device, built_on,
                                      on_unload=lambda kept=weights.kept: kept.release_all(
                                          "ComfyUI unloaded the model to free memory"))
        return weights


def check_weights_under_cap(resident: int, device, placement: str, weight_dtype: str, memory_cap_gib: float):
    """Before loading: weights that alone exceed the cap could never run, so say what to change."""
    if memory_cap_gib and resident > memory_cap_gib * GIB:
        offload = ("raise offload_blocks (up to 40)" if placement == PLACEMENTS[2] else f"pick '{PLACEMENTS[2]}'") + \
            " (the run then keeps as many blocks on the GPU as fit the cap)"
        raise ValueError(f"LiveAvatar model loader: with placement '{placement}' the {weight_dtype} weights alone "
                         f"take {resident / GIB:.1f} GiB on {device}, above memory_cap_gib {memory_cap_gib:g}. To "
                         f"fit: {offload}, fp8_e4m3fn weights, or a higher memory_cap_gib")


def resident_bytes(cfg, storage: str, where) -> int:
    """Bytes of the weights `where` puts on its main device (what ComfyUI manages)."""
    size = STORAGE_DTYPES[storage].itemsize
    return sum(t.numel() * size for name, t in expected_tensors(cfg).items()
               if same_device(where.device_for(name), where.device))


def resident_modules(module: torch.nn.Module, placement, prefix: str = "") -> list[torch.nn.Module]:
    """The largest sub-modules whose tensors the placement all puts on its main device: what
    ComfyUI manages. One GPU: the whole DiT. Offload: all but the CPU-resident blocks. Sharded:
    the blocks of the first GPU plus the embeddings and head. One step per GPU: the first copy."""
    names = [prefix + n for n, _ in (*module.named_parameters(), *module.named_buffers())]
    if names and all(same_device(placement.device_for(n), placement.device) for n in names):
        return [module]
    return [part for name, child in module.named_children()
            for part in resident_modules(child, placement, f"{prefix}{name}.")]


def make_placement(placement: str, offload_blocks: int, cfg):
    device = host.torch_device()
    if placement in (PLACEMENTS[1], PLACEMENTS[3]):
        count = torch.cuda.device_count()
        if count < 2:
            raise ValueError(f"'{placement}' needs at least 2 visible GPUs, this machine has {count}")
        gpus = [f"cuda:{i}" for i in range(count)]
        return Sharded(gpus, cfg.num_layers) if placement == PLACEMENTS[1] else StepPerGPU(gpus)
    if placement == PLACEMENTS[2]:
        return Offload(device, blocks=min(offload_blocks, cfg.num_layers), num_layers=cfg.num_layers)
    if placement == PLACEMENTS[0]:
        return OneDevice(device)
    raise ValueError(f"unknown placement {placement!r}; choose one of {PLACEMENTS}")
