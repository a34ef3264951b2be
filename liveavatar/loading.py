"""Loading the LiveAvatar DiT from the files people have, tensor by tensor.

Accepted checkpoints (all in the official Wan2.2-S2V parameter naming):
- the official sharded folder: `diffusion_pytorch_model-*.safetensors` + its index json
  (and `config.json`, the transformer config, when present);
- one safetensors file, e.g. ComfyUI's repackaged `wan2.2_s2v_14B_bf16.safetensors`,
  with or without a `model.diffusion_model.` / `diffusion_model.` prefix, including the
  `fp8_scaled` variant (fp8 weights + per-tensor `<layer>.scale_weight`);
- a `.pth`/`.pt`/`.bin` state dict, read with `torch.load(weights_only=True)`.

The LiveAvatar LoRA (`liveavatar.safetensors`) is merged while loading:
W <- W + strength * (alpha / rank) * B @ A, in float32, one tensor at a time. Nothing is
ever held as a full-precision copy of the whole model, and any key problem is reported in
one error before a single tensor is read. Another strength later (`set_lora_strength`)
derives the merged weights again from the checkpoint's base tensors with the same function,
so the result is bit-identical to a fresh load at that strength.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .dit import WAN_S2V_14B_INJECT_LAYERS, DiTConfig, LiveAvatarDiT
from .layers import FP8_DTYPES, Linear
from .placement import same_device
from .settings import RunOptions
from .weights import CheckpointError, open_safetensors, read_state_dict, safetensors_config

S2V_MARKER_KEY = "casual_audio_encoder.encoder.final_linear.weight"
CHECKPOINT_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.", "")
# ComfyUI's fp8_scaled bookkeeping, consumed here rather than loaded as parameters.
FP8_SCALE_SUFFIXES = (".scale_weight", ".scale_input")
FP8_MARKER = "scaled_fp8"
HEAD_DIM = 128  # Wan's head size, used when no config.json gives num_heads
STORAGE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp8": torch.float8_e4m3fn}
FP8_MAX = 448.0  # largest finite float8_e4m3fn


# ---- reading tensors lazily ----------------------------------------------------------------
class TensorSource:
    """Key -> tensor, read on demand from safetensors files or a torch state dict."""

    def __init__(self, path: Path):
        self.path = path
        self.files: dict[str, str] = {}
        self.state_dict: dict[str, torch.Tensor] | None = None
        files = self._weight_files(path)
        if files[0].suffix == ".safetensors":
            for file in files:
                with open_safetensors(file) as f:
                    self.files.update(dict.fromkeys(f.keys(), str(file)))
        else:
            self.state_dict = read_state_dict(files[0], mmap=True)
        self._handles: dict[str, object] = {}

    @staticmethod
    def _weight_files(path: Path) -> list[Path]:
        if not path.exists():
            raise CheckpointError(f"checkpoint not found: {path}")
        if path.is_file():
            return [path]
        index = sorted(path.glob("*.safetensors.index.json"))
        if index:
            return [path / s for s in _shards_of(index[0])]
        files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.pth")) + sorted(path.glob("*.bin"))
        if not files:
            raise CheckpointError(f"no .safetensors/.pth weights in folder {path}")
        return files

    def keys(self) -> list[str]:
        return list(self.files) if self.state_dict is None else list(self.state_dict)

    def __contains__(self, key: str) -> bool:
        return key in (self.files if self.state_dict is None else self.state_dict)

    def shape(self, key: str) -> tuple:
        if self.state_dict is not None:
            return tuple(self.state_dict[key].shape)
        return tuple(self._handle(key).get_slice(key).get_shape())

    def load(self, key: str) -> torch.Tensor:
        if self.state_dict is not None:
            return self.state_dict[key]
        return self._handle(key).get_tensor(key)

    def _handle(self, key: str):
        file = self.files[key]
        if file not in self._handles:
            self._handles[file] = open_safetensors(file)
        return self._handles[file]


def _shards_of(index: Path) -> list[str]:
    """The shard files an official `*.safetensors.index.json` lists (its weight_map values)."""
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
        raise CheckpointError(f"{index} is not a valid sharded-checkpoint index ({error}): download it again") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index} has no 'weight_map' (tensor name -> shard file): it is not a sharded-checkpoint "
                              "index; download it again or pick a single .safetensors file")
    shards = sorted(set(map(str, weight_map.values())))
    missing = [s for s in shards if not (index.parent / s).is_file()]
    if missing:
        raise CheckpointError(f"{index} lists shards that are not in {index.parent}: {missing[:5]}")
    return shards


@dataclass
class Checkpoint:
    """A Wan2.2-S2V DiT checkpoint: its tensors with the container prefix removed."""

    source: TensorSource
    prefix: str
    path: Path

    @classmethod
    def open(cls, path) -> "Checkpoint":
        path = Path(path)
        source = TensorSource(path)
        keys = set(source.keys())
        for prefix in CHECKPOINT_PREFIXES:
            if prefix + S2V_MARKER_KEY in keys:
                return cls(source, prefix, path)
        raise CheckpointError(f"{path} is not a Wan2.2-S2V diffusion model: it has no '{S2V_MARKER_KEY}' "
                              f"(it looks like {_describe(keys)}). Pick wan2.2_s2v_14B_*.safetensors or the "
                              f"official Wan2.2-S2V-14B folder.")

    def names(self) -> list[str]:
        p = len(self.prefix)
        return [k[p:] for k in self.source.keys() if k.startswith(self.prefix)]

    def shape(self, name: str) -> tuple:
        return self.source.shape(self.prefix + name)

    def load(self, name: str) -> torch.Tensor:
        return self.source.load(self.prefix + name)

    def has(self, name: str) -> bool:
        return (self.prefix + name) in self.source

    def config(self) -> DiTConfig:
        """The transformer config from the folder's config.json or a single file's `config`
        metadata when present, else inferred from tensor shapes."""
        audio_layers = self.shape("casual_audio_encoder.weights")[1]
        config = self._stored_config()
        if config and "dim" in config and "audio_inject_layers" in config:
            try:
                cfg = DiTConfig.from_dict(config, audio_layers=audio_layers)
            except (TypeError, ValueError) as error:
                raise CheckpointError(f"{self.path}: its config cannot describe a Wan2.2-S2V DiT ({error})") from None
        else:
            cfg = self.infer_config(audio_layers)
        self.validate(cfg)
        return cfg

    def validate(self, cfg: DiTConfig):
        """Check a config (from a file's metadata or config.json, or passed in) against the
        tensors present, before anything is built: a crafted config must not make us build
        20000 layers or skip audio injectors."""
        dim_in_file = self.shape("patch_embedding.weight")[0] if self.has("patch_embedding.weight") else cfg.dim
        problems = _config_problems(cfg, self.names(), dim_in_file)
        if problems:
            raise CheckpointError(f"{self.path}: the config does not match the tensors in the file: "
                                  f"{'; '.join(problems)}. Remove the wrong config (config.json beside the shards, "
                                  f"or the file's 'config' metadata) or use the original file.")

    def _stored_config(self) -> dict | None:
        if self.path.is_dir():
            config_file = self.path / "config.json"
            if not config_file.exists():
                return None
            try:
                return json.loads(config_file.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise CheckpointError(f"{config_file} is not valid JSON ({error}): fix or remove it") from None
        return safetensors_config(self.path)

    def infer_config(self, audio_layers: int) -> DiTConfig:
        dim, in_dim, *patch = self.shape("patch_embedding.weight")
        names = self.names()
        num_layers = 1 + max(int(m.group(1)) for n in names if (m := re.match(r"blocks\.(\d+)\.", n)))
        injectors = 1 + max(int(m.group(1)) for n in names if (m := re.match(r"audio_injector\.injector\.(\d+)\.", n)))
        if (num_layers, injectors) == (40, len(WAN_S2V_14B_INJECT_LAYERS)):
            inject_layers = WAN_S2V_14B_INJECT_LAYERS
        else:
            raise CheckpointError(f"{self.path}: cannot tell which of the {num_layers} layers the {injectors} audio "
                                  f"injectors follow; put the model's config.json (with audio_inject_layers) beside it")
        conv1_local = self.shape("casual_audio_encoder.encoder.conv1_local.conv.weight")
        return DiTConfig(
            dim=dim, in_dim=in_dim, patch_size=tuple(patch), num_layers=num_layers, num_heads=dim // HEAD_DIM,
            ffn_dim=self.shape("blocks.0.ffn.0.weight")[0], text_dim=self.shape("text_embedding.0.weight")[1],
            freq_dim=self.shape("time_embedding.0.weight")[1],
            out_dim=self.shape("head.head.weight")[0] // math.prod(patch),
            cond_dim=self.shape("cond_encoder.weight")[1], audio_dim=conv1_local[1], audio_layers=audio_layers,
            num_audio_token=conv1_local[0] // (dim // 4), audio_inject_layers=inject_layers)


def _config_problems(cfg: DiTConfig, names: list[str], dim_in_file: int) -> list[str]:
    layers = _block_indices(names, r"blocks\.(\d+)\.")
    injectors = _block_indices(names, r"audio_injector\.injector\.(\d+)\.")
    problems = []
    if not isinstance(cfg.num_heads, int) or cfg.num_heads <= 0 or cfg.dim % cfg.num_heads:
        problems.append(f"num_heads={cfg.num_heads} must be a positive divisor of dim={cfg.dim}")
    if cfg.dim != dim_in_file:
        problems.append(f"dim={cfg.dim} but patch_embedding.weight has {dim_in_file} channels")
    if cfg.num_layers != len(layers):
        problems.append(f"num_layers={cfg.num_layers} but the file has {len(layers)} blocks")
    inject = list(cfg.audio_inject_layers)
    outside = [i for i in inject if not isinstance(i, int) or not 0 <= i < cfg.num_layers]
    if outside:
        problems.append(f"audio_inject_layers {outside} are outside layers 0..{cfg.num_layers - 1}")
    if len(set(inject)) != len(inject):
        problems.append(f"audio_inject_layers {inject} repeat a layer")
    if len(inject) != len(injectors):
        problems.append(f"audio_inject_layers has {len(inject)} entries but the file has {len(injectors)} audio injectors")
    return problems


def _block_indices(names: list[str], pattern: str) -> set[int]:
    return {int(m.group(1)) for n in names if (m := re.match(pattern, n))}


def _describe(keys: set) -> str:
    sample = sorted(keys)[:3]
    return f"a file with {len(keys)} tensors such as {sample}"


# ---- LoRA --------------------------------------------------------------------------------
LORA_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.")
LORA_PATTERN = re.compile(r"^(?P<module>.+?)\.(?P<kind>lora_A|lora_B|lora_down|lora_up)(?:\.[^.]+)?\.weight$")


@dataclass
class LoraPair:
    down: torch.Tensor  # A [rank, in]
    up: torch.Tensor  # B [out, rank]
    alpha: float | None


def read_lora(path) -> tuple[dict[str, LoraPair], dict[str, torch.Tensor]]:
    """A LoRA file -> ({target weight name: pair}, {full parameter overrides}).

    Accepts peft's names (`<module>.lora_A[.default].weight`, optionally under
    `base_model.model.`), kohya/ComfyUI names (`lora_down`/`lora_up` + `.alpha`) and
    plain parameters saved beside them (peft's `base_layer` names mapped back)."""
    source = TensorSource(Path(path))
    _check_is_lora(path, source.keys())  # by names alone: a 32 GB model here is refused before it is read
    pairs: dict[str, dict] = {}
    overrides: dict[str, torch.Tensor] = {}
    for key in source.keys():
        name = _strip_prefix(key, LORA_PREFIXES)
        match = LORA_PATTERN.match(name)
        if match:
            side = "down" if match["kind"] in ("lora_A", "lora_down") else "up"
            pairs.setdefault(match["module"] + ".weight", {})[side] = source.load(key)
        elif name.endswith(".alpha"):
            pairs.setdefault(name[:-len(".alpha")] + ".weight", {})["alpha"] = float(source.load(key))
        else:
            overrides[name.replace(".base_layer.", ".")] = source.load(key)
    incomplete = [k for k, p in pairs.items() if "down" not in p or "up" not in p]
    if incomplete:
        raise CheckpointError(f"LoRA {path}: these modules lack lora_A/lora_B (down/up) halves: {incomplete[:10]}")
    return {k: LoraPair(p["down"], p["up"], p.get("alpha")) for k, p in pairs.items()}, overrides


def _check_is_lora(path, keys: list[str]):
    """A LoRA file must hold LoRA pairs: an empty file, or a whole model picked in the LoRA
    slot, would otherwise load with nothing merged (4 steps without the distillation)."""
    if not keys:
        raise CheckpointError(f"LoRA {path} holds no tensors: download liveavatar.safetensors again")
    if not any(LORA_PATTERN.match(_strip_prefix(k, LORA_PREFIXES)) for k in keys):
        full_model = any(_strip_prefix(k, CHECKPOINT_PREFIXES[:-1]) == S2V_MARKER_KEY for k in keys)
        looks = "a whole diffusion model, which belongs in model_name" if full_model else _describe(set(keys))
        raise CheckpointError(f"LoRA {path} has no LoRA weights (lora_A/lora_B or lora_down/lora_up); it looks like "
                              f"{looks}. Pick liveavatar.safetensors from models/loras.")


def _strip_prefix(key: str, prefixes) -> str:
    for prefix in prefixes:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def lora_delta(pair: LoraPair, strength: float, default_alpha: float | None, device=None) -> torch.Tensor:
    """strength * (alpha / rank) * B @ A in float32 (on `device`). Without an alpha in the
    file, the caller's alpha is used; LiveAvatar trained with alpha = rank / 2 (64 for 128)."""
    rank = pair.down.shape[0]
    alpha = pair.alpha if pair.alpha is not None else (default_alpha if default_alpha is not None else rank / 2)
    return (strength * alpha / rank) * (pair.up.to(device).float() @ pair.down.to(device).float())


@dataclass
class Lora:
    """A LoRA file read for merging: {target weight: pair}, full parameter overrides, and the
    alpha used where the file has none."""

    pairs: dict[str, LoraPair]
    overrides: dict[str, torch.Tensor]
    alpha: float | None = None
    path: Path | None = None

    @classmethod
    def read(cls, path, alpha: float | None = None) -> "Lora":
        return cls(*read_lora(path), alpha, Path(path))


def check_strength(strength) -> float:
    if not isinstance(strength, (int, float)) or not math.isfinite(strength):
        raise ValueError(f"lora_strength must be a finite number, got {strength!r}")
    return float(strength)


def weight_source(checkpoint: "Checkpoint", lora: Lora | None, strength: float):
    """tensor_for(name, device) -> (tensor, fp8 scale or None): the checkpoint's tensor with the
    LoRA merged at `strength` (W + strength * (alpha / rank) * B @ A, in float32 on `device`).
    The one definition of a merged weight: a fresh load and a strength change both use it, so
    they give the same bits."""
    pairs, overrides = (lora.pairs, lora.overrides) if lora else ({}, {})

    def tensor_for(name, device):
        tensor = overrides[name] if name in overrides else checkpoint.load(name)
        scale = _fp8_scale(checkpoint, name, tensor)
        if name in pairs:
            merged = _real_values(tensor, scale, device) + lora_delta(pairs[name], strength, lora.alpha, device)
            return merged, None
        return tensor, scale

    return tensor_for


def set_lora_strength(model: LiveAvatarDiT, checkpoint: "Checkpoint", lora: Lora, strength: float) -> int:
    """Give a DiT that load_dit built from `checkpoint` + `lora` another LoRA strength, in place.

    Every LoRA target is derived again from its base tensor in the checkpoint (read from the
    file, never from the merged weights) by the function a fresh load uses, on the device a
    fresh load computes it on, then stored as a fresh load stores it (cast, or fp8 with a new
    per-tensor scale) into the existing tensors of every model copy. So any sequence of
    strengths leaves the weights bit-identical to a fresh load at the last one, and placements
    and ComfyUI's model management keep their storage. Returns how many weights were set."""
    tensor_for = weight_source(checkpoint, lora, check_strength(strength))
    copies = model.copies()  # one per GPU with 'one denoising step per GPU'
    with torch.no_grad():
        for name in lora.pairs:
            module_name, _, attr = name.rpartition(".")
            device = _build_device(model.placement, name)
            tensor, scale = tensor_for(name, device)
            value, scale = _stored_form(module_name, model.get_submodule(module_name), attr, tensor, model.storage,
                                        device, scale)
            for copy in copies:
                module = copy.get_submodule(module_name)
                getattr(module, attr).data.copy_(value)
                if scale is not None:
                    module.scale_weight.copy_(scale)
    return len(lora.pairs)


# ---- building the model ------------------------------------------------------------------
def load_dit(path, lora=None, lora_strength: float = 1.0, lora_alpha: float | None = None,
             storage: str = "bf16", placement=None, config: DiTConfig | None = None,
             offload_device=None, options: RunOptions | None = None) -> LiveAvatarDiT:
    """Build the DiT from a checkpoint (path or opened Checkpoint), merging the LoRA (a path or
    a read Lora), weights streamed onto the devices `placement` chooses (default: CPU).
    `storage`: bf16 | fp16 | fp32 | fp8 (e4m3fn linear weights in the transformer blocks,
    computed in bf16). `offload_device`: where the weights the placement puts on its main
    device are kept instead (ComfyUI's offload device, from which its model management loads
    them); they are still computed (merged, cast, quantised) on the main device. `options`: how
    the model computes (settings.RunOptions; default: from the environment)."""
    checkpoint = path if isinstance(path, Checkpoint) else Checkpoint.open(path)
    lora_strength = check_strength(lora_strength)
    cfg = config or checkpoint.config()
    checkpoint.validate(cfg)  # before expected_tensors builds anything from it
    if lora is not None and not isinstance(lora, Lora):
        lora = Lora.read(lora, lora_alpha)
    expected = expected_tensors(cfg)
    if lora is not None:
        _check_keys(checkpoint, expected, lora.pairs, lora.overrides, lora.path)
    else:
        _check_keys(checkpoint, expected, {}, {}, None)
    return build_dit(cfg, weight_source(checkpoint, lora, lora_strength), storage, placement, offload_device, options)


def expected_tensors(cfg: DiTConfig) -> dict:
    """Name -> meta tensor of every parameter the DiT of this config has."""
    with torch.device("meta"):
        return dict(LiveAvatarDiT(cfg, RunOptions()).state_dict())


def build_dit(cfg: DiTConfig, tensor_for, storage: str = "bf16", placement=None, offload_device=None,
              options: RunOptions | None = None) -> LiveAvatarDiT:
    """Materialise the DiT one parameter at a time: `tensor_for(name, device)` returns the
    tensor (any dtype, any device) and its fp8 scale or None; it is stored on that device (see
    load_dit for `offload_device`)."""
    if storage not in STORAGE_DTYPES:
        raise ValueError(f"weight storage must be one of {sorted(STORAGE_DTYPES)}, got {storage!r}")
    with torch.device("meta"):
        model = LiveAvatarDiT(cfg, options)
    if placement:
        placement.bind(cfg)
    for name in model.state_dict():
        device = _build_device(placement, name)
        home = offload_device if offload_device is not None and placement and same_device(device, placement.device) \
            else device
        tensor, scale = tensor_for(name, device)
        _set_tensor(model, name, tensor, storage, device, scale, home)
    model.storage = storage
    if placement:
        placement.attach(model)
    return model.eval().requires_grad_(False)


def _build_device(placement, name: str) -> torch.device:
    """Where a fresh load computes (and, without an offload device, keeps) parameter `name`."""
    return placement.device_for(name) if placement else torch.device("cpu")


def replicate(model: LiveAvatarDiT, placement) -> LiveAvatarDiT:
    """A copy of a built DiT on `placement`'s devices, tensor by tensor (no second full copy
    on the source device); fp8 weights stay fp8 with their scales."""
    state = model.state_dict()

    def tensor_for(name, device):
        scale = state.get(name[:-len(".weight")] + ".scale_weight") if name.endswith(".weight") else None
        tensor = state[name]  # a copy of its own even on the same device (weights change in place)
        return (tensor.clone() if tensor.device == torch.device(device) else tensor), scale

    return build_dit(model.cfg, tensor_for, model.storage, placement, options=model.options)


def _fp8_scale(checkpoint: Checkpoint, name: str, tensor: torch.Tensor) -> torch.Tensor | None:
    """The per-tensor scale of an fp8_scaled weight (real = stored * scale), else None."""
    if tensor.dtype not in FP8_DTYPES:
        return None
    scale_name = name[:-len(".weight")] + ".scale_weight"
    return checkpoint.load(scale_name).float() if checkpoint.has(scale_name) else torch.tensor(1.0)


def _real_values(tensor, scale, device) -> torch.Tensor:
    tensor = tensor.to(device).float()
    return tensor if scale is None else tensor * scale.to(device)


def _check_keys(checkpoint, expected, pairs, overrides, lora_path):
    present = set(checkpoint.names())
    bookkeeping = {n for n in present if n.endswith(FP8_SCALE_SUFFIXES) or n == FP8_MARKER}
    missing = sorted(set(expected) - present)
    unexpected = sorted(present - set(expected) - bookkeeping)
    wrong_shape = [f"{n}: file {tuple(checkpoint.shape(n))} vs model {tuple(expected[n].shape)}"
                   for n in sorted(set(expected) & present) if tuple(checkpoint.shape(n)) != tuple(expected[n].shape)]
    problems = _problem_list(missing, unexpected, wrong_shape)
    if problems:
        raise CheckpointError(f"{checkpoint.path} does not fit the Wan2.2-S2V DiT it describes:\n{problems}")
    lora_unmatched = sorted(set(pairs) - set(expected)) + sorted(set(overrides) - set(expected))
    lora_shapes = [f"{n}: lora {tuple(p.up.shape[:1]) + tuple(p.down.shape[1:])} vs weight {tuple(expected[n].shape)}"
                   for n, p in pairs.items() if n in expected and (p.up.shape[0], p.down.shape[1]) != tuple(expected[n].shape)]
    problems = _problem_list([], lora_unmatched, lora_shapes)
    if problems:
        raise CheckpointError(f"LoRA {lora_path} does not fit this model (is it the LiveAvatar LoRA?):\n{problems}")


def _problem_list(missing, unexpected, wrong_shape, limit=20) -> str:
    lines = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
        if items:
            more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
            lines.append(f"  {len(items)} {title}: {', '.join(items[:limit])}{more}")
    return "\n".join(lines)


def _set_tensor(model, name, tensor, storage, device, scale=None, home=None):
    """Put one parameter in place: cast to the storage dtype, or keep/make fp8 + scale, on
    `device`; kept on `home` (default: there)."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    value, scale = _stored_form(module_name, module, attr, tensor, storage, device, scale)
    home = device if home is None else home
    if scale is not None:
        module.register_buffer("scale_weight", scale.to(home))
    module._parameters[attr] = torch.nn.Parameter(value.to(home), requires_grad=False)


def _stored_form(module_name, module, attr, tensor, storage, device, scale=None):
    """(value, fp8 scale or None) of one parameter as stored, computed on `device`."""
    dtype = STORAGE_DTYPES[storage]
    fp8 = dtype in FP8_DTYPES and _fp8_eligible(module_name, module, attr)
    if scale is not None and not fp8:  # an fp8 checkpoint tensor where fp8 is not kept
        tensor, scale = _real_values(tensor, scale, device), None
    if fp8:
        value, scale = (tensor.to(device), scale.to(device)) if scale is not None else quantize_fp8(tensor.to(device), dtype)
        return value, scale.reshape(())
    return tensor.to(device=device, dtype=dtype if dtype not in FP8_DTYPES else torch.bfloat16), None


def _fp8_eligible(module_name, module, attr) -> bool:
    """fp8 storage for the big matrices only: Linear weights inside the DiT blocks and
    audio injectors (~99% of the parameters); embeddings, norms and head stay bf16."""
    return attr == "weight" and isinstance(module, Linear) and module_name.startswith(("blocks.", "audio_injector.injector."))


def quantize_fp8(weight: torch.Tensor, dtype=torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor scaled fp8: stored = weight / scale, scale = amax / 448."""
    weight = weight.float()
    # times the reciprocal: what CUDA computes for a division by a Python number, so a
    # weight quantised on the CPU (offloaded) and on the GPU gets the very same scale
    scale = (weight.abs().amax() * (1.0 / FP8_MAX)).clamp_min(1e-12)
    return (weight / scale).to(dtype), scale.reshape(())
