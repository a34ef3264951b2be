"""The LiveAvatar DiT: Wan2.2-S2V-14B as LiveAvatar runs it (block-causal streaming).

Parameter names follow the official checkpoint exactly (including the original's
`casual_audio_encoder` spelling), so a real state dict loads with strict=True.

Vocabulary (shapes use batch 1, which is all LiveAvatar generates):
- latent frame: one 16-channel VAE latent frame = 4 video frames at 25 fps.
- frame tokens (`ft`): tokens of one latent frame = (h/2) * (w/2) after the 1x2x2 patchify.
- block: 3 latent frames denoised together; clip: `infer_frames / 4` latent frames.
- sink: the tokens every block attends to besides its recent past: the reference
  latent (cond-mask id 1) and the FramePack motion tokens (id 2). Their keys/values are
  computed once ("prefill") with zero-timestep modulation and no audio.
- ring: per denoising step, the keys/values of the last clip's worth of blocks at that
  step's noise level, written at `frame_start * ft` modulo the ring length.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from . import rope
from .attention import attend_repeated_last
from .kernels import ROW_ALIGN, Fp8Rows, Kernels
from .kvcache import BlockStepKV, SinkStore, TickKV
from .layers import Linear, RMSNorm, attend, bind_kernels, conv_fp32
from .settings import RunOptions

# Wan2.2-S2V constants that are code, not config, in the original.
REFERENCE_TIME = 30  # RoPE time index of the reference frame at prefill
MOTION_VIDEO_FRAMES = 73  # video frames of motion history; (73 + 3) // 4 = 19 latents
MOTION_BUCKETS = (1, 2, 16)  # FramePack: newest 1 latent at 1x, next 2 at 2x, oldest 16 at 4x
FRAMES_PER_BLOCK = 3
MASK_NOISY, MASK_REFERENCE, MASK_MOTION = 0, 1, 2
ADAIN_EPS = 1e-5  # diffusers AdaLayerNorm default

# Behaviour switches of the original config that this implementation is (only) built for.
REQUIRED_FLAGS = {
    "enable_adain": True, "adain_mode": "attn_norm", "zero_timestep": True, "enable_motioner": False,
    "add_last_motion": True, "enable_tsm": False, "enable_framepack": True, "model_type": "s2v",
    "qk_norm": True, "cross_attn_norm": True, "trainable_token_pos_emb": False,
}
WAN_S2V_14B_INJECT_LAYERS = (0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39)


@dataclass(frozen=True)
class DiTConfig:
    dim: int = 5120
    ffn_dim: int = 13824
    num_heads: int = 40
    num_layers: int = 40
    in_dim: int = 16
    out_dim: int = 16
    text_dim: int = 4096
    text_len: int = 512
    freq_dim: int = 256
    cond_dim: int = 16
    audio_dim: int = 1024
    audio_layers: int = 25  # wav2vec2 hidden states mixed by the causal audio encoder
    num_audio_token: int = 4
    audio_inject_layers: tuple = WAN_S2V_14B_INJECT_LAYERS
    patch_size: tuple = (1, 2, 2)
    eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @classmethod
    def from_dict(cls, config: dict, audio_layers: int | None = None) -> "DiTConfig":
        """From the original's transformer config (config.json / fixture manifest)."""
        unsupported = {k: config[k] for k, want in REQUIRED_FLAGS.items() if k in config and config[k] != want}
        if list(config.get("window_size", [-1, -1])) != [-1, -1]:
            unsupported["window_size"] = config["window_size"]
        if unsupported:
            raise ValueError(f"unsupported Wan2.2-S2V variant, these settings differ from LiveAvatar's: {unsupported}")
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in config.items() if k in names}
        for key in ("audio_inject_layers", "patch_size"):
            if key in values:
                values[key] = tuple(values[key])
        if audio_layers is not None:
            values["audio_layers"] = audio_layers
        return cls(**values)


def _moved(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """GPU to GPU without stalling the host (PyTorch orders the copy after the producer and
    before the consumers on both devices' streams)."""
    return tensor.to(device, non_blocking=True)


def _current(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


def sinusoidal_embedding(dim: int, timesteps: torch.Tensor) -> torch.Tensor:
    """Wan's timestep embedding [N, dim]: cos then sin of t * 10000^(-i/half), in float64."""
    half = dim // 2
    t = timesteps.to(torch.float64)
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = torch.outer(t, freqs)
    return torch.cat([angles.cos(), angles.sin()], dim=1)


class Attention(nn.Module):
    """q/k/v/o projections with RMSNorm on q and k (self-, cross- and audio attention)."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, -1))

    def query(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads(self.norm_q(self.q(x)))

    def key_value(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.heads(self.norm_k(self.k(x))), self.heads(self.v(x))

    def out(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(x.flatten(-2))


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.eps = cfg.eps
        self.self_attn = Attention(cfg.dim, cfg.num_heads, cfg.eps)
        self.norm3 = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.cross_attn = Attention(cfg.dim, cfg.num_heads, cfg.eps)
        self.ffn = nn.Sequential(Linear(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), Linear(cfg.ffn_dim, cfg.dim))
        self.modulation = nn.Parameter(torch.zeros(1, 6, cfg.dim))
        self.kernels = Kernels()  # the model's, once bound

    def forward(self, x, time_mod, self_attention, text_kv, ffn_rows: int = 0):
        """x [G, n, dim] fp32 residual stream (G frames of n tokens, or one group for the sink);
        time_mod [G, 6, dim] fp32; self_attention(attn, h) maps the normed tokens [G*n, dim]
        to attention outputs [G*n, H, D] (projections, roping and caching are the caller's);
        text_kv the layer's cross-attention keys/values; ffn_rows > 0 runs the feed-forward in
        chunks of that many rows (its widest activation bounded; rows are independent, so the
        result is the same). The element-wise steps go through the model's kernels (fused on the
        GPU; fp8 rows straight from the norm for fp8 linears)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation.float() + time_mod).unsqueeze(2).unbind(1)
        attn, cross, up, fused = self.self_attn, self.cross_attn, self.ffn[0], self.kernels
        dtype = attn.q.compute_dtype
        h = fused.modulated_norm(x, shift1, scale1, self.eps, dtype, fp8=attn.q.takes_fp8_rows).flatten(0, 1)
        # each residual update and the norm after it in one pass: norm3 (affine) before the
        # cross-attention, the second modulated norm before the FFN (updates passed inline: no
        # name holds them past their use)
        x, h = fused.add_norm(x, attn.out(self_attention(attn, h)), gate1, self.norm3.bias, self.norm3.weight,
                              self.eps, dtype, fp8=cross.q.takes_fp8_rows, affine=True)
        x, h = fused.add_norm(x, self.cross_attention(h, *text_kv), None, shift2, scale2, self.eps, dtype,
                              fp8=up.takes_fp8_rows)
        return fused.gated_add(x, self.feed_forward_chunked(h, ffn_rows), gate2)

    def feed_forward_chunked(self, h, rows: int):
        """feed_forward over row chunks of h ([G, n, dim] or Fp8Rows), into one output [G*n, dim]."""
        shape = tuple(h.shape)
        total = math.prod(shape[:-1])
        if rows <= 0 or rows >= total:
            return self.feed_forward(h)
        rows += -rows % ROW_ALIGN  # fp8 rows stay in whole 16-row tiles
        flat = h if isinstance(h, Fp8Rows) else h.reshape(total, -1)
        out = None
        for start in range(0, total, rows):
            part = self.feed_forward(_row_chunk(flat, start, min(start + rows, total)))
            if out is None:
                out = torch.empty((total, part.shape[-1]), dtype=part.dtype, device=part.device)
            out[start:start + rows] = part.reshape(-1, part.shape[-1])
            del part
        return out.view(*shape[:-1], -1)

    def feed_forward(self, h):
        up, down = self.ffn[0], self.ffn[2]
        if down.takes_fp8_rows:
            return down(self.kernels.gelu(up(h), fp8=True))
        return down(up.forward_gelu(h))

    def cross_attention(self, normed, text_k, text_v, padding: int = 0):
        """Attention of the norm3-normed tokens [G, n, dim] (or their fp8 rows) to the prompt
        (its last row counted `padding` times, see text_context) -> [G*n, dim]."""
        attn = self.cross_attn
        return attn.out(attend_repeated_last(attn.query(normed.flatten(0, 1)), text_k, text_v, padding, self.kernels))

    def text_key_value(self, text: torch.Tensor):
        return self.cross_attn.key_value(text)


def _row_chunk(h, start: int, stop: int):
    """Rows [start, stop) of a [rows, dim] tensor or of Fp8Rows (whose padding past the last row
    goes with the last chunk)."""
    if not isinstance(h, Fp8Rows):
        return h[start:stop]
    end = stop if stop < h.rows else h.data.shape[0]
    return Fp8Rows(h.data[start:end], h.scales[start:end], (stop - start, h.shape[-1]))


class Head(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.eps = cfg.eps
        self.head = Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)
        self.modulation = nn.Parameter(torch.zeros(1, 2, cfg.dim))
        self.kernels = Kernels()  # the model's, once bound

    def forward(self, x, time_emb):
        """x [F, n, dim], time_emb [F, dim] (the un-projected timestep embedding)."""
        shift, scale = (self.modulation.float() + time_emb.unsqueeze(1)).unsqueeze(2).unbind(1)
        return self.head(self.kernels.modulated_norm(x, shift, scale, self.eps, self.head.compute_dtype)).float()


class CausalConv1d(nn.Module):
    """Conv1d left-padded in time by replicating the first frame (causal)."""

    def __init__(self, chan_in: int, chan_out: int, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv1d(chan_in, chan_out, 3, stride=stride)

    def forward(self, x):
        return conv_fp32(self.conv, F.pad(x.float(), (2, 0), mode="replicate"))


class MotionEncoder(nn.Module):
    """Audio features [T, audio_dim] -> per-latent-frame audio tokens (local) and one
    global token (for AdaIN), with 4x temporal downsampling by two stride-2 convs."""

    def __init__(self, audio_dim: int, dim: int, num_tokens: int):
        super().__init__()
        self.num_tokens = num_tokens
        self.conv1_local = CausalConv1d(audio_dim, dim // 4 * num_tokens)
        self.conv1_global = CausalConv1d(audio_dim, dim // 4)
        self.conv2 = CausalConv1d(dim // 4, dim // 2, stride=2)
        self.conv3 = CausalConv1d(dim // 2, dim, stride=2)
        self.final_linear = Linear(dim, dim)
        self.padding_tokens = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def _downsample(self, x):
        """x [B, C, T] after conv1 -> [B, T/4, dim]: (norm, SiLU, conv) x2, norm, SiLU."""
        x = F.silu(F.layer_norm(x.transpose(1, 2), (x.shape[1],), eps=1e-6)).transpose(1, 2)
        x = self.conv2(x)
        x = F.silu(F.layer_norm(x.transpose(1, 2), (x.shape[1],), eps=1e-6)).transpose(1, 2)
        x = self.conv3(x)
        return F.silu(F.layer_norm(x.transpose(1, 2), (x.shape[1],), eps=1e-6))

    def forward(self, features):
        """features [T, audio_dim] -> local [T', num_tokens + 1, dim], global [T', dim]."""
        x = features.float().t().unsqueeze(0)  # [1, C, T]
        local = rearrange(self.conv1_local(x), "b (n c) t -> (b n) c t", n=self.num_tokens)
        local = rearrange(self._downsample(local), "n t c -> t n c")
        padding = self.padding_tokens.float()[0].expand(local.shape[0], 1, -1)
        local = torch.cat([local, padding], dim=1)
        global_ = self.final_linear.forward_fp32(self._downsample(self.conv1_global(x)))[0]
        return local, global_


class CausalAudioEncoder(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.weights = nn.Parameter(torch.full((1, cfg.audio_layers, 1, 1), 0.01))
        self.encoder = MotionEncoder(cfg.audio_dim, cfg.dim, cfg.num_audio_token)

    def forward(self, features):
        """features [layers, audio_dim, T video frames] -> tokens of the last T/4 latent frames.

        The encoder sees the block's frames left-padded with 73 copies of its first frame
        (LiveAvatar's motion-history padding) and keeps the outputs past those 19 latents."""
        pad = features[..., :1].expand(-1, -1, MOTION_VIDEO_FRAMES)
        x = torch.cat([pad, features], dim=-1).float()
        weights = F.silu(self.weights.float())[0]  # [layers, 1, 1]
        mixed = (x * weights).sum(0) / weights.sum(0)  # [audio_dim, T]
        local, global_ = self.encoder(mixed.t())
        skip = (MOTION_VIDEO_FRAMES + 3) // 4
        return local[skip:], global_[skip:]


class AdaLayerNorm(nn.Module):
    """diffusers' AdaLayerNorm(chunk_dim=1): LayerNorm(x) * (1 + scale) + shift."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = Linear(dim, 2 * dim)
        self.kernels = Kernels()  # the model's, once bound

    def forward(self, x, emb, dtype=torch.float32, fp8: bool = False):
        """x [F, n, dim] fp32, emb [F, dim] -> normed [F, n, dim] in dtype (Kernels.modulated_norm)."""
        shift, scale = self.linear(F.silu(emb)).float().unsqueeze(1).chunk(2, dim=-1)
        return self.kernels.modulated_norm(x, shift, scale, ADAIN_EPS, dtype, fp8=fp8)


class AudioInjector(nn.Module):
    """Per-frame cross-attention from video tokens to that frame's audio tokens, added
    after the configured DiT layers (`audio_inject_layers`)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        n = len(cfg.audio_inject_layers)
        self.injector = nn.ModuleList(Attention(cfg.dim, cfg.num_heads, cfg.eps) for _ in range(n))
        self.injector_adain_layers = nn.ModuleList(AdaLayerNorm(cfg.dim) for _ in range(n))

    def forward(self, index, x, audio_tokens, audio_global):
        """x [F, n, dim], audio_tokens [F, k, dim], audio_global [F, dim] -> residual [F, n, dim]
        in the compute dtype (added to the fp32 stream by the caller)."""
        attn = self.injector[index]
        h = self.injector_adain_layers[index](x, audio_global, attn.q.compute_dtype, fp8=attn.q.takes_fp8_rows)
        k, v = attn.key_value(audio_tokens)
        return attn.out(attend(attn.query(h), k, v))


class FramePacker(nn.Module):
    """FramePack motion tokens: the 19 motion latents, newest first, patchified at
    1x (1 latent), 2x (2 latents, 2x4x4 patches) and 4x (16 latents, 4x8x8 patches)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.proj = nn.Conv3d(16, cfg.dim, (1, 2, 2), stride=(1, 2, 2))
        self.proj_2x = nn.Conv3d(16, cfg.dim, (2, 4, 4), stride=(2, 4, 4))
        self.proj_4x = nn.Conv3d(16, cfg.dim, (4, 8, 8), stride=(4, 8, 8))

    def forward(self, motion_latents):
        """motion [16, T, h, w] -> tokens [N, dim] and their RoPE positions [N, 3]."""
        c, t, h, w = motion_latents.shape
        total = sum(MOTION_BUCKETS)
        padded = motion_latents.new_zeros(c, total, h, w)
        keep = min(t, total)
        if keep:
            padded[:, total - keep:] = motion_latents[:, t - keep:]  # too little history: zeros first
        oldest, older, newest = padded.unsqueeze(0).split(MOTION_BUCKETS[::-1], dim=2)
        tokens, positions = [], []
        hp, wp = h // 2, w // 2
        time_start = 0
        for proj, latents in ((self.proj, newest), (self.proj_2x, older), (self.proj_4x, oldest)):
            frames = latents.shape[2]
            time_start -= frames
            out = proj(latents.to(proj.weight.dtype))  # [1, dim, t', h', w']
            tokens.append(rearrange(out, "1 c t h w -> (t h w) c"))
            positions.append(self._positions(time_start, frames, out.shape[2:], hp, wp))
        return torch.cat(tokens), torch.cat(positions)

    @staticmethod
    def _positions(time_start, frames, grid, hp, wp):
        """Down-sampled groups keep full-resolution RoPE coordinates: their t/h/w indices are
        spread over the frames and the (h/2, w/2) grid they cover (negative times = past)."""
        tg, hg, wg = grid
        times = [-t for t in rope.spread(-time_start, -time_start - frames + 1, tg)]
        return rope.grid_positions(times, rope.spread(0, hp - 1, hg), rope.spread(0, wp - 1, wg))


class LiveAvatarDiT(nn.Module):
    """CausalWanModel_S2V (LiveAvatar) for streaming inference; see module docstring.

    `options` (settings.RunOptions; default: from the environment, RunOptions.from_env) say how
    it computes: kernels, attention, fp8 products. They are this model's alone (`use_options`
    changes them between runs), as is `kernels`, the Kernels made from them."""

    def __init__(self, cfg: DiTConfig, options: RunOptions | None = None):
        super().__init__()
        self.cfg = cfg
        self.patch_embedding = nn.Conv3d(cfg.in_dim, cfg.dim, cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"), Linear(cfg.dim, cfg.dim))
        self.time_embedding = nn.Sequential(Linear(cfg.freq_dim, cfg.dim), nn.SiLU(), Linear(cfg.dim, cfg.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), Linear(cfg.dim, cfg.dim * 6))
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        self.cond_encoder = nn.Conv3d(cfg.cond_dim, cfg.dim, cfg.patch_size, stride=cfg.patch_size)
        self.casual_audio_encoder = CausalAudioEncoder(cfg)  # sic: the official key prefix
        self.audio_injector = AudioInjector(cfg)
        self.trainable_cond_mask = nn.Embedding(3, cfg.dim)
        self.frame_packer = FramePacker(cfg)
        self.injector_index = {layer: i for i, layer in enumerate(cfg.audio_inject_layers)}
        self.placement = None  # set by liveavatar.placement; None = everything where it is
        self.capture_stream = None  # graphs.CaptureStream: made by its first run with CUDA graphs, kept
        self.use_options(RunOptions.from_env() if options is None else options)

    def use_options(self, options: RunOptions) -> "LiveAvatarDiT":
        """Compute with `options` from the next run on (the weights stay as they are): a new
        Kernels for this model and its copies on other GPUs. The same options again keep the
        current Kernels (and what it found out about the devices)."""
        if not isinstance(options, RunOptions):
            raise TypeError(f"options must be a liveavatar.settings.RunOptions, got {type(options).__name__}")
        if getattr(self, "options", None) == options:
            return self
        kernels = Kernels(options.kernels, options.fp8_compute)
        for copy in self.copies():
            copy.options, copy.kernels = options, kernels
            bind_kernels(copy, kernels)
        return self

    # ---- placement -------------------------------------------------------------------
    def layer_device(self, layer: int) -> torch.device:
        return self.placement.layer_device(layer) if self.placement else self.blocks[layer].modulation.device

    @property
    def device(self) -> torch.device:
        return self.patch_embedding.weight.device

    def step_models(self, steps: int) -> list["LiveAvatarDiT"]:
        """The model (replica) that runs each denoising step: this one, unless the placement
        keeps one copy per GPU and deals the steps out over them."""
        return self.placement.step_models(steps) if self.placement else [self] * steps

    def copies(self) -> list["LiveAvatarDiT"]:
        """This model and its copies on other GPUs (weights changes must reach them all)."""
        return self.placement.copies() if self.placement else [self]

    def _run_layers(self, x, layer_fn):
        """The one loop over DiT layers; placement decides where each runs (sharded over
        GPUs, streamed from CPU, or all in place). Each layer runs with its GPU as the current
        device: Triton kernels launch there."""
        for i, block in enumerate(self.blocks):
            with self._on_layer(i) as device, _current(device):
                x = layer_fn(i, block, _moved(x, device))
        return _moved(x, self.device)

    def _on_layer(self, layer: int):
        return self.placement.on_layer(layer) if self.placement else nullcontext(self.layer_device(layer))

    # ---- conditioning computed once per run / per step / per block --------------------
    def text_context(self, context: torch.Tensor) -> list:
        """Real-token text embeddings [L, text_dim] -> per-layer cross-attention (k, v, n).
        The original zero-pads to text_len and attends to the padding unmasked; the padding
        rows are all the same (the embedding MLP and the k/v projections work row by row), so
        one padding row is kept, counted n = text_len - L times (attention.attend_repeated_last)."""
        length, dim = context.shape
        if dim != self.cfg.text_dim:
            raise ValueError(f"text embedding has width {dim}, this model expects {self.cfg.text_dim} (umt5-xxl)")
        if length > self.cfg.text_len:
            raise ValueError(f"prompt is {length} tokens long, the model takes at most {self.cfg.text_len}")
        embed = self.text_embedding[0]
        padding = self.cfg.text_len - length
        padded = torch.zeros(length + min(padding, 1), dim, device=self.device, dtype=embed.compute_dtype)
        padded[:length] = context.to(padded)
        text = self.text_embedding(padded)
        text_kv = []
        for i, block in enumerate(self.blocks):
            with self._on_layer(i) as device:
                text_kv.append((*block.text_key_value(text.to(device)), padding))
        return text_kv

    def time_modulation(self, timesteps: torch.Tensor):
        """Timesteps [F] -> (embedding [F, dim], six modulation vectors [F, 6, dim]), fp32."""
        emb = sinusoidal_embedding(self.cfg.freq_dim, timesteps.to(self.device)).float()
        emb = self.time_embedding[2].forward_fp32(F.silu(self.time_embedding[0].forward_fp32(emb)))
        mod = self.time_projection[1].forward_fp32(F.silu(emb)).unflatten(1, (6, self.cfg.dim))
        return emb, mod

    def audio_condition(self, features: torch.Tensor):
        """One block's audio features [layers, audio_dim, 4*F] -> (tokens [F, k, dim], global [F, dim])."""
        if features.shape[0] != self.cfg.audio_layers or features.shape[1] != self.cfg.audio_dim:
            raise ValueError(f"audio features have shape {tuple(features.shape)}, expected "
                             f"[{self.cfg.audio_layers}, {self.cfg.audio_dim}, frames] (all wav2vec2 hidden states)")
        tokens, global_ = self.casual_audio_encoder(features.to(self.device))
        dtype = self.head.head.compute_dtype
        return tokens.to(dtype), global_.to(dtype)

    def _patchify(self, latents: torch.Tensor) -> torch.Tensor:
        """[16, F, h, w] -> tokens [F*(h/2)*(w/2), dim] fp32; batched [B, 16, F, h, w] ->
        [B*F*(h/2)*(w/2), dim]."""
        batch = latents if latents.dim() == 5 else latents.unsqueeze(0)
        out = self.patch_embedding(batch.to(self.device, self.patch_embedding.weight.dtype))
        # contiguous: rearrange gives a transposed view, and every element-wise pass of the
        # residual stream would then walk memory column by column
        return rearrange(out, "b c f h w -> (b f h w) c").float().contiguous()

    # ---- sink prefill ------------------------------------------------------------------
    def prefill_sink(self, ref_latent: torch.Tensor, motion_latents: torch.Tensor, text_kv: list,
                     sink: SinkStore) -> SinkStore:
        """Run the reference + motion tokens through all layers (zero-timestep modulation,
        no audio); every layer's keys/values go to `sink` (SinkStore.keep)."""
        ref = self._patchify(ref_latent) + self.trainable_cond_mask.weight[MASK_REFERENCE].float()
        hp, wp = ref_latent.shape[-2] // 2, ref_latent.shape[-1] // 2
        ref_pos = rope.grid_positions([REFERENCE_TIME], range(hp), range(wp))
        motion, motion_pos = self.frame_packer(motion_latents.to(self.device))
        motion = motion.float() + self.trainable_cond_mask.weight[MASK_MOTION].float()
        x = torch.cat([ref, motion]).unsqueeze(0)
        cos, sin = rope.rope_tables(torch.cat([ref_pos, motion_pos]).to(self.device), self.cfg.head_dim)
        _, zero_mod = self.time_modulation(torch.zeros(1))
        ref_len = ref.shape[0]
        del ref, motion

        def layer(i, block, x):
            c, s = cos.to(x.device), sin.to(x.device)

            def self_attention(attn, h):
                q = attn.query(h)
                k, v = attn.key_value(h)
                roped = rope.apply_rope(k, c, s)
                sink.keep(i, ref_len, k, roped, v, self.kernels)  # reference keys kept un-roped: re-roped per block-step
                return attend(rope.apply_rope(q, c, s), roped, v)

            return block(x, zero_mod.to(x.device), self_attention, text_kv[i])

        self._run_layers(x, layer)
        return sink

    # ---- denoising steps of blocks, several in one forward -------------------------------
    def denoise(self, items: list["BlockStep"], text_kv: list, ffn_rows: int = 0, attention_items: int = 0) -> torch.Tensor:
        """Flow predictions [B, 16, F, h, w] for B independent block-steps run as one batch.

        The items' frames are stacked (B*F frames of ft tokens) through every layer, so each
        layer's weights are read once for all of them (one copy per tick when offloaded);
        each item writes its keys/values into its own step's ring and attends to that ring
        and its sink (kvcache.TickKV: all items in one call where it can). `ffn_rows` /
        `attention_items` bound the activations (rows per feed-forward chunk, block-steps per
        attention call; 0 = all at once; see memory.plan_memory)."""
        return self.run_tick(self.tick_inputs(items), [item.kv for item in items], text_kv, ffn_rows, attention_items)

    def tick_inputs(self, items: list["BlockStep"]) -> "TickInputs":
        """Everything a forward of these block-steps reads besides the weights and the caches,
        as tensors on the model's device (what changes from one tick of a shape to the next)."""
        frames, (h, w) = items[0].latents.shape[1], items[0].latents.shape[2:]
        hp, wp = h // 2, w // 2
        for item in items:  # the block's frame grid: the same for all its steps, built once per device
            if self.device not in item.rope_cache:
                item.rope_cache[self.device] = rope.grid_tables(item.frame_start, frames, hp, wp, self.cfg.head_dim,
                                                                self.device)
        # the reference tokens' grid at each block-step's rolling time (rolling sink)
        reference = [rope.grid_tables(item.kv.ref_time, 1, hp, wp, self.cfg.head_dim, self.device) for item in items]
        tokens, global_ = (torch.cat(parts) for parts in zip(*(item.audio for item in items)))
        ring_rows = torch.stack([item.kv.ring.group.rows(item.kv.ring.index, item.kv.token_start, frames * hp * wp,
                                                         self.device) for item in items])
        return TickInputs(torch.stack([item.latents for item in items]).to(self.device),
                          *(torch.cat(t) for t in zip(*(item.rope_cache[self.device] for item in items))),
                          *(torch.stack(t) for t in zip(*reference)), ring_rows,
                          torch.cat([item.time_mod[0] for item in items]), torch.cat([item.time_mod[1] for item in items]),
                          tokens, global_)

    def run_tick(self, inputs: "TickInputs", kvs: list[BlockStepKV], text_kv: list, ffn_rows: int = 0,
                 attention_items: int = 0) -> torch.Tensor:
        """denoise from its inputs: GPU work only (no host-to-device copy, no wait for the GPU),
        so that a tick of a fixed shape can be captured as a CUDA graph (graphs.py)."""
        count, _, frames, h, w = inputs.latents.shape
        hp, wp = h // 2, w // 2
        x = self._patchify(inputs.latents)
        x = x + self.cond_encoder.bias.float() + self.trainable_cond_mask.weight[MASK_NOISY].float()
        # cond_encoder sees LiveAvatar's all-zero pose latents, so it contributes its bias only.
        kv = TickKV(kvs, list(zip(inputs.ref_cos, inputs.ref_sin)), inputs.ring_rows, self.kernels, attention_items,
                    gather_all=self.options.attention == "gather")
        on_device = {}  # the per-forward tensors, copied once to each GPU the layers run on

        def inputs_on(dev):
            if dev not in on_device:
                on_device[dev] = [_moved(t, dev) for t in (inputs.cos, inputs.sin, inputs.mod, inputs.audio_tokens,
                                                             inputs.audio_global)]
            return on_device[dev]

        def layer(i, block, x):
            c, s, layer_mod, layer_tokens, layer_global = inputs_on(x.device)

            def self_attention(attn, h):
                q = attn.norm_q.forward_rope(attn.q(h), c, s, attn.num_heads)
                k, v = attn.k(h), attn.heads(attn.v(h))
                kv.write(i, attn.norm_k, k, v, c, s)
                del k, v  # in the rings now: freed before attention allocates its output
                return kv.attend(i, q.unflatten(0, (count, -1))).flatten(0, 1)

            x = block(x, layer_mod, self_attention, text_kv[i], ffn_rows)
            if i in self.injector_index:
                x = self.kernels.gated_add(x, self.audio_injector(self.injector_index[i], x, layer_tokens, layer_global))
            return x

        x = self._run_layers(x.view(count * frames, hp * wp, -1), layer)
        out = self.head(x, inputs.time_emb).flatten(0, 1)
        p = self.cfg.patch_size
        return rearrange(out, "(b f h w) (p q r c) -> b c (f p) (h q) (w r)", b=count, f=frames, h=hp, w=wp,
                         p=p[0], q=p[1], r=p[2])


@dataclass
class TickInputs:
    """What one forward of B block-steps (F latent frames of ft tokens each) reads besides the
    weights and the caches, on the model's device."""

    latents: torch.Tensor  # [B, 16, F, h, w] at each block-step's noise level
    cos: torch.Tensor  # [B*F*ft, 1, head_dim/2] RoPE of the blocks' token grids
    sin: torch.Tensor
    ref_cos: torch.Tensor  # [B, ft, 1, head_dim/2] RoPE of the reference tokens at each rolling time
    ref_sin: torch.Tensor
    ring_rows: torch.Tensor  # [B, F*ft] int64: the rows each block-step's tokens go to (StepRings.rows)
    time_emb: torch.Tensor  # [B*F, dim] timestep embedding
    mod: torch.Tensor  # [B*F, 6, dim] its six modulation vectors
    audio_tokens: torch.Tensor  # [B*F, k, dim]
    audio_global: torch.Tensor  # [B*F, dim]

    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self, f.name) for f in fields(self)]


@dataclass
class BlockStep:
    """One denoising step of one block, as the DiT sees it."""

    latents: torch.Tensor  # [16, F, h, w] at this step's noise level
    time_mod: tuple  # time_modulation(t) of the F frames
    audio: tuple  # audio_condition(the block's features)
    kv: BlockStepKV  # its step's ring, its clip's sink, the reference's rolling RoPE time
    frame_start: int  # absolute latent-frame index of the block's first frame
    rope_cache: dict = field(default_factory=dict)  # device -> the block's RoPE tables (kept by the sampler)
