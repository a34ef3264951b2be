"""The Wan2.1 video VAE (causal 3-D convolutions) with streaming decode.

Parameter names follow the original `Wan2.1_VAE.pth` (encoder.*, conv1, conv2, decoder.*);
ComfyUI's `wan_2.1_vae.safetensors` and `comfy.sd.VAE.first_stage_model.state_dict()` use
the same names (comfy/ldm/wan/vae.py mirrors the original), so one loader reads all three.
Time is causal: every temporal convolution sees the current chunk plus the last two input
frames of the previous chunk (its *cache*), zero frames before the first chunk. The encoder
takes video in chunks of 1, then 4 frames (video frames 1 + 4k -> latents 1 + k); the
decoder takes a stream's first latent alone, then up to 3 per pass (latent 0 -> 1 frame,
every later latent -> 4 frames).
Carrying the caches between calls makes a stream of decode calls equal to one full decode,
with memory independent of video length.

Latents are normalised per channel, (mu - mean) / std, with Wan2.1's fixed constants.

Public API:
    WanVAE.load(path, device="cpu", dtype=torch.float32)        .pth or .safetensors
    WanVAE.from_state_dict(sd, device="cpu", dtype=torch.float32, config=None, mean=..., std=...)
    WanVAE.sharing(named_parameters, config=None)   around another owner's parameters (no copy),
        e.g. ComfyUI's VAE network, on their device and in their dtype
    vae.encode(video [3, 1 + 4k, H, W] in [-1, 1]) -> latents [16, 1 + k, H/8, W/8] (fp32)
    vae.decode(latents [16, t, h, w], clamp=True) -> video [3, 1 + 4(t - 1), 8h, 8w] (fp32)
    vae.stream_decoder() -> StreamDecoder: .decode(latents_chunk, clamp=True, on_step=None) -> frames, .reset()
    vae.encode_portrait(image [3, 1, H, W], on_step=None) -> (ref_latent [16, 1, h, w], motion [16, 19, h, w])
    (on_step: called after every encoded chunk / decoded latent, for progress and cancel;
    LiveAvatar's priming, dropping and trimming of decoded frames: see decoding.VideoDecoder)
    normalised_to_raw(latents) / raw_to_normalised(raw)   [..., 16, t, h, w]; ComfyUI's LATENT
        for Wan holds raw latents (its Wan21 latent format normalises inside the sampler)
    config_from_state_dict(sd) -> dict(dim, z_dim, dim_mult, num_res_blocks, temporal_downsample)
    read_state_dict(path) -> dict  (from .weights: safetensors, or torch.load(weights_only=True))
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .kernels import Kernels, channel_norm_reference
from .settings import RunOptions
from .shared_weights import bind_parameters, computing_in, placement_of
from .weights import read_state_dict

# Wan2.1 VAE latent statistics (per channel), used to normalise latents for the DiT.
LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
               0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
              3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)
LATENT_CHANNELS = len(LATENT_MEAN)  # 16
CACHE_FRAMES = 2  # a 3-tap causal time kernel needs the last two input frames
LATENTS_PER_PASS = 3  # a streamed block's latents in one decoder pass: fewer, larger kernels
MOTION_FRAMES = 73  # video frames of FramePack motion history -> 19 latents
ENCODE_CHUNK = 4
CHUNKS_PER_PASS = 3  # encoder chunks in one pass (12 frames), as the decoder takes a block's latents
PORTRAIT_ENCODE_STEPS = 1 + 1 + (MOTION_FRAMES - 1) // ENCODE_CHUNK  # chunks: the portrait, then 1 + 18 motion
FIRST_CHUNK = "first chunk"  # marker: an upsample3d site that has seen only the first chunk


def _stats(like: torch.Tensor):
    shape = (len(LATENT_MEAN), 1, 1, 1)
    mean = torch.tensor(LATENT_MEAN, device=like.device, dtype=torch.float32).view(shape)
    return mean, torch.tensor(LATENT_STD, device=like.device, dtype=torch.float32).view(shape)


def normalised_to_raw(latents: torch.Tensor) -> torch.Tensor:
    """DiT-space latents [..., 16, t, h, w] -> raw VAE means (ComfyUI's LATENT convention)."""
    mean, std = _stats(latents)
    return latents.float() * std + mean


def raw_to_normalised(raw: torch.Tensor) -> torch.Tensor:
    """Raw VAE means [..., 16, t, h, w] (e.g. a ComfyUI LATENT) -> DiT-space latents."""
    mean, std = _stats(raw)
    return (raw.float() - mean) / std


class TimeCache:
    """The causal convolutions' carried frames: one slot per call site, in call order."""

    def __init__(self):
        self.slots: list = []
        self.index = 0

    def rewind(self):
        self.index = 0

    def previous(self):
        """This call site's value from the last chunk (None on the first chunk)."""
        return self.slots[self.index] if self.index < len(self.slots) else None

    def store(self, value):
        if self.index == len(self.slots):
            self.slots.append(None)
        self.slots[self.index] = value
        self.index += 1

    def nbytes(self) -> int:
        """Memory the cache holds (whole storages, so a view of a bigger tensor counts fully)."""
        return sum(t.untyped_storage().nbytes() for t in self.slots if isinstance(t, torch.Tensor))


class CausalConv3d(nn.Conv3d):
    """Conv3d padded only in the past along time (2 * pad frames), spatially symmetric.
    `previous` frames (from the last chunk) replace that much of the zero time padding. The
    spatial padding is the convolution's own (no padded copy of the input)."""

    def __init__(self, chan_in, chan_out, kernel, stride=1, padding=0):
        super().__init__(chan_in, chan_out, kernel, stride=stride)
        pad = (padding,) * 3 if isinstance(padding, int) else padding
        self.time_pad, self.space_padding = 2 * pad[0], (pad[1], pad[2])

    def forward(self, x, previous=None):
        parts = [x]
        time_pad = self.time_pad
        if previous is not None:
            parts.insert(0, previous.to(x))
            time_pad -= previous.shape[2]
        if time_pad:
            parts.insert(0, _zero_frames(x, time_pad))
        return self.convolve(torch.cat(parts, dim=2) if len(parts) > 1 else x)

    def convolve(self, x):
        """The convolution of x padded in time: conv3d, or on the CPU by time taps."""
        if x.device.type == "cpu":
            return self._conv_by_time_taps(x).contiguous(memory_format=_layout_of(x))
        return F.conv3d(x, self.weight, self.bias, self.stride, (0, *self.space_padding))

    def _conv_by_time_taps(self, x):
        """Same result as conv3d, as one conv2d per temporal tap over all output frames:
        several times faster than PyTorch's CPU conv3d (tests, demo)."""
        taps, stride = self.kernel_size[0], self.stride[0]
        frames = (x.shape[2] - taps) // stride + 1
        out = None
        for k in range(taps):
            window = x[:, :, k:k + (frames - 1) * stride + 1:stride]
            y = F.conv2d(rearrange(window, "b c t h w -> (b t) c h w"), self.weight[:, :, k], None, self.stride[1:],
                         self.space_padding)
            out = y if out is None else out + y
        out = out + self.bias.view(1, -1, 1, 1)
        return rearrange(out, "(b t) c h w -> b c t h w", t=frames)


def _layout_of(x):
    return torch.channels_last_3d if x.is_contiguous(memory_format=torch.channels_last_3d) else torch.contiguous_format


def _zero_frames(x, frames: int):
    """`frames` zero frames like x's, in x's memory layout (a cat stays channels-last only when
    all its parts are)."""
    return x.new_zeros(x.shape[0], x.shape[1], frames, *x.shape[3:]).contiguous(memory_format=_layout_of(x))


def cached(conv: CausalConv3d, x, cache: TimeCache):
    """Run a causal conv on one chunk, keeping its last two input frames for the next
    (one new frame + the previous chunk's last when the chunk is a single frame)."""
    if conv.time_pad == 0:
        return conv(x)
    previous = cache.previous()
    keep = x[:, :, -CACHE_FRAMES:].clone()  # a copy: a view would pin the whole chunk
    if keep.shape[2] < CACHE_FRAMES and previous is not None:
        keep = torch.cat([previous[:, :, -1:].to(keep), keep], dim=2)
    cache.store(keep)
    return conv(x, previous)


class RMSNorm(nn.Module):
    """L2-normalise over channels, times sqrt(C) and a learned gain (`gamma`); with `silu`, the
    SiLU that follows it in every use, fused when the VAE's kernels run (`kernels`, set by WanVAE)."""

    def __init__(self, dim: int, images: bool = True):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones((dim, 1, 1) if images else (dim, 1, 1, 1)))
        self.kernels = None

    def forward(self, x, silu: bool = False):
        if self.kernels is not None:
            return self.kernels.channel_norm(x, self.gamma, self.scale, silu)
        return channel_norm_reference(x, self.gamma, self.scale, silu)


class Resample(nn.Module):
    """2x spatial up/down sampling, optionally with 2x temporal up/down sampling."""

    def __init__(self, dim: int, mode: str):
        super().__init__()
        self.mode = mode
        if mode.startswith("upsample"):
            self.resample = nn.Sequential(nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"),
                                          nn.Conv2d(dim, dim // 2, 3, padding=1))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x, cache: TimeCache):
        if self.mode == "upsample3d":
            x = self._upsample_time(x, cache)
        frames, layout = x.shape[2], _layout_of(x)
        x = rearrange(x, "b c t h w -> (b t) c h w")
        x = self.resample(x)  # nearest-neighbour upsampling copies values: exact in bf16 too
        x = rearrange(x, "(b t) c h w -> b c t h w", t=frames).contiguous(memory_format=layout)
        if self.mode == "downsample3d":
            x = self._downsample_time(x, cache)
        return x

    def _upsample_time(self, x, cache):
        """Each latent frame becomes two, except in the very first chunk (frame 0 stays one
        frame). The second chunk still sees zero padding, later ones the carried frames."""
        previous = cache.previous()
        if previous is None:
            cache.store(FIRST_CHUNK)
            return x
        keep = x[:, :, -CACHE_FRAMES:].clone()
        if keep.shape[2] < CACHE_FRAMES:
            before = torch.zeros_like(keep) if previous is FIRST_CHUNK else previous[:, :, -1:].to(keep)
            keep = torch.cat([before, keep], dim=2)
        cache.store(keep)
        y = self.time_conv(x, None if previous is FIRST_CHUNK else previous)
        if _layout_of(y) == torch.contiguous_format:
            return rearrange(y, "b (two c) t h w -> b c (t two) h w", two=2)
        # the same, written channels-last in one copy: memory [b, t, two, h, w, c]
        b, _, t, h, w = y.shape
        pairs = y.unflatten(1, (2, -1)).permute(0, 3, 1, 4, 5, 2).contiguous()
        return pairs.view(b, 2 * t, h, w, -1).permute(0, 4, 1, 2, 3)

    def _downsample_time(self, x, cache):
        """Frames 1+4k -> 1+2k: the first chunk passes through; later chunks are convolved
        with stride 2 after the previous chunk's last frame."""
        previous = cache.previous()
        cache.store(x[:, :, -1:].clone())
        if previous is None:
            return x
        return self.time_conv(torch.cat([previous[:, :, -1:].to(x), x], dim=2))


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.residual = nn.Sequential(RMSNorm(in_dim, images=False), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
                                      RMSNorm(out_dim, images=False), nn.SiLU(), nn.Dropout(0.0),
                                      CausalConv3d(out_dim, out_dim, 3, padding=1))
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x, cache):
        return _run(self.residual, x, cache) + self.shortcut(x)


class AttentionBlock(nn.Module):
    """Single-head spatial self-attention within each frame."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x):
        frames, h = x.shape[2], x.shape[3]
        y = self.norm(rearrange(x, "b c t h w -> (b t) c h w"))
        q, k, v = rearrange(self.to_qkv(y), "n c h w -> n 1 (h w) c").chunk(3, dim=-1)
        y = rearrange(F.scaled_dot_product_attention(q, k, v), "n 1 (h w) c -> n c h w", h=h)
        return x + rearrange(self.proj(y), "(b t) c h w -> b c t h w", t=frames)


def _run(layers, x, cache):
    """x through the layers in order: causal convs with their time caches, an RMSNorm and the
    SiLU after it as one step."""
    layers = list(layers)
    for i, layer in enumerate(layers):
        if isinstance(layer, nn.SiLU) and i and isinstance(layers[i - 1], RMSNorm):
            continue  # applied with the norm
        if isinstance(layer, CausalConv3d):
            x = cached(layer, x, cache)
        elif isinstance(layer, (ResidualBlock, Resample)):
            x = layer(x, cache)
        elif isinstance(layer, RMSNorm):
            x = layer(x, silu=i + 1 < len(layers) and isinstance(layers[i + 1], nn.SiLU))
        else:
            x = layer(x)
    return x


class Encoder3d(nn.Module):
    def __init__(self, dim, z_dim, dim_mult, num_res_blocks, temporal_downsample):
        super().__init__()
        dims = [dim * m for m in [1] + list(dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        layers = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(num_res_blocks):
                layers.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i != len(dim_mult) - 1:
                layers.append(Resample(out_dim, "downsample3d" if temporal_downsample[i] else "downsample2d"))
        self.downsamples = nn.Sequential(*layers)
        self.middle = nn.Sequential(ResidualBlock(out_dim, out_dim), AttentionBlock(out_dim), ResidualBlock(out_dim, out_dim))
        self.head = nn.Sequential(RMSNorm(out_dim, images=False), nn.SiLU(), CausalConv3d(out_dim, z_dim, 3, padding=1))

    def forward(self, x, cache):
        return _run([self.conv1, *self.downsamples, *self.middle, *self.head], x, cache)


class Decoder3d(nn.Module):
    def __init__(self, dim, z_dim, dim_mult, num_res_blocks, temporal_upsample):
        super().__init__()
        dims = [dim * m for m in [dim_mult[-1]] + list(dim_mult[::-1])]
        self.conv1 = CausalConv3d(z_dim, dims[0], 3, padding=1)
        self.middle = nn.Sequential(ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0]), ResidualBlock(dims[0], dims[0]))
        layers = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                in_dim //= 2  # the previous upsample halved the channels
            for _ in range(num_res_blocks + 1):
                layers.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i != len(dim_mult) - 1:
                layers.append(Resample(out_dim, "upsample3d" if temporal_upsample[i] else "upsample2d"))
        self.upsamples = nn.Sequential(*layers)
        self.head = nn.Sequential(RMSNorm(out_dim, images=False), nn.SiLU(), CausalConv3d(out_dim, 3, 3, padding=1))

    def forward(self, x, cache):
        return _run([self.conv1, *self.middle, *self.upsamples, *self.head], x, cache)


class VideoVAE(nn.Module):
    """The network (original naming: encoder, conv1, conv2, decoder)."""

    def __init__(self, dim=96, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=2, temporal_downsample=(False, True, True)):
        super().__init__()
        self.z_dim = z_dim
        self.encoder = Encoder3d(dim, z_dim * 2, dim_mult, num_res_blocks, temporal_downsample)
        self.conv1 = CausalConv3d(z_dim * 2, z_dim * 2, 1)
        self.conv2 = CausalConv3d(z_dim, z_dim, 1)
        self.decoder = Decoder3d(dim, z_dim, dim_mult, num_res_blocks, tuple(temporal_downsample)[::-1])

    def encode_chunks(self, video, cache: TimeCache, on_step=None):
        """Video [B, 3, T, H, W] -> latent mean [B, z, 1 + (T-1)/4, h, w]: the first frame alone,
        then chunks of 4 frames, up to CHUNKS_PER_PASS of them per encoder pass (the causal caches
        make the passes' size invisible in the result). `on_step()` runs once per chunk, after
        its pass (progress; raise from it to cancel)."""
        per_pass = ENCODE_CHUNK * CHUNKS_PER_PASS
        out, start = [], 0
        while start < video.shape[2]:
            end = 1 if start == 0 else min(start + per_pass, video.shape[2])
            cache.rewind()
            out.append(self.encoder(video[:, :, start:end], cache))
            if on_step:
                for _ in range(max(1, (end - start) // ENCODE_CHUNK)):  # the pass's chunks (the first frame: 1)
                    on_step()
            start = end
        mu, _log_var = self.conv1(torch.cat(out, dim=2)).chunk(2, dim=1)
        return mu

    def decode_frames(self, z, cache: TimeCache, on_step=None):
        """Unnormalised latents [B, z, t, h, w] -> video frames. A stream's first latent is
        decoded alone (it gives 1 frame), later ones up to LATENTS_PER_PASS per decoder pass
        (the causal caches make the passes' size invisible in the result). `on_step()` runs
        once per latent, after its pass (progress; raise from it to cancel)."""
        x = self.conv2(z)
        out, start = [], 0
        while start < x.shape[2]:
            size = 1 if not cache.slots else LATENTS_PER_PASS
            cache.rewind()
            out.append(self.decoder(x[:, :, start:start + size], cache))
            if on_step:
                for _ in range(min(size, x.shape[2] - start)):  # the pass's latents
                    on_step()
            start += size
        return torch.cat(out, dim=2)


def config_from_state_dict(sd: dict) -> dict:
    """Network shape from tensor shapes (Wan2.1: dim 96, z 16, mult 1,2,4,4, 2 res blocks,
    temporal downsampling in the 2nd and 3rd stage)."""
    dim = sd["encoder.conv1.weight"].shape[0]
    z_dim = sd["conv2.weight"].shape[0]
    stages, current, temporal = [], [], []
    layer = 0
    while True:
        prefix = f"encoder.downsamples.{layer}."
        if prefix + "residual.0.gamma" in sd:  # a residual block: its output width
            current.append(sd[prefix + "residual.2.weight"].shape[0])
        elif prefix + "resample.1.weight" in sd:  # a downsample ends the stage
            stages.append(current)
            current = []
            temporal.append(prefix + "time_conv.weight" in sd)
        else:
            break
        layer += 1
    stages.append(current)
    if not all(stages) or len({len(s) for s in stages}) != 1:
        raise ValueError("unexpected Wan VAE encoder layout (stages with differing residual block counts)")
    return dict(dim=dim, z_dim=z_dim, dim_mult=tuple(s[-1] // dim for s in stages), num_res_blocks=len(stages[0]),
                temporal_downsample=tuple(temporal))


def network_config(config: dict) -> dict:
    """A config in the original's spelling (the fixture manifests: temperal_downsample,
    attn_scales, dropout) -> VideoVAE arguments."""
    config = dict(config)
    if config.pop("attn_scales", []):
        raise ValueError("attn_scales must be empty: the Wan2.1 VAE has attention only in its middle blocks")
    config.pop("dropout", None)  # inference: no dropout
    if "temperal_downsample" in config:
        config["temporal_downsample"] = config.pop("temperal_downsample")
    config["dim_mult"] = tuple(config.get("dim_mult", (1, 2, 4, 4)))
    config["temporal_downsample"] = tuple(config.get("temporal_downsample", (False, True, True)))
    return config


class StreamDecoder:
    """Decode latents in successive calls with the causal cache carried: the first latent
    of the stream gives 1 frame, every later latent 4. Memory stays flat in stream length."""

    def __init__(self, vae: "WanVAE"):
        self.vae = vae
        self.cache = TimeCache()

    def decode(self, latents: torch.Tensor, clamp: bool = True, on_step=None) -> torch.Tensor:
        """Normalised latents [16, t, h, w] -> frames [3, T, 8h, 8w] (fp32, on the VAE's
        device), T = 4t, or 4t - 3 on the stream's first call. `on_step()` after each latent."""
        self.vae.check_latents(latents)
        with torch.no_grad():
            with self.vae._computing():
                frames = self.vae.net.decode_frames(self.vae.denormalise(latents), self.cache, on_step)[0].float()
        return frames.clamp(-1, 1) if clamp else frames

    def reset(self):
        """Start a new stream (the next latent is a first latent again)."""
        self.cache = TimeCache()

    @property
    def cache_bytes(self) -> int:
        return self.cache.nbytes()


class WanVAE:
    """Wan2.1 VAE on one device, in fp32 or bf16; latents normalised as the DiT expects.

    Built from weights it owns (`load`, `from_state_dict`: moved and cast here), or around
    another owner's parameters (`sharing`: ComfyUI's VAE; no copy, they stay where and as
    their owner keeps them)."""

    def __init__(self, net: VideoVAE, device="cpu", dtype=torch.float32, mean=LATENT_MEAN, std=LATENT_STD,
                 owned: bool = True, kernels: Kernels | None = None):
        if len(mean) != net.z_dim or len(std) != net.z_dim:
            raise ValueError(f"latent mean/std need {net.z_dim} values (one per latent channel), got {len(mean)}/{len(std)}")
        self.net = (net.to(device=device, dtype=dtype).requires_grad_(False) if owned else net).eval()
        self.device, self.dtype, self.owned = torch.device(device), dtype, owned
        self.mean = torch.as_tensor(mean, dtype=torch.float32, device=device).view(-1, 1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32, device=device).view(-1, 1, 1, 1)
        # On a GPU activations run channels-last ([B, T, H, W, C] in memory): cuDNN's convolutions
        # take that layout natively (no layout transposes around each one), ~7-17% faster per block.
        self.set_layout(torch.channels_last_3d if self.device.type == "cuda" else torch.contiguous_format)
        # the fused norm + SiLU (on a GPU, unless LIVEAVATAR_KERNELS=off)
        self.use_kernels(kernels if kernels is not None else Kernels(RunOptions.from_env().kernels))

    def set_layout(self, layout):
        """Activations in `layout`; the conv weights too where this VAE owns them (another
        owner's stay as they are: cuDNN then converts them, small beside the activations)."""
        self.layout = layout
        if not self.owned:
            return
        for conv in self.net.modules():
            if isinstance(conv, nn.Conv3d) and not conv.weight.is_contiguous(memory_format=layout):
                conv.weight = nn.Parameter(conv.weight.contiguous(memory_format=layout), requires_grad=False)

    def use_kernels(self, kernels: Kernels):
        """The norms (+ SiLU) through these kernels (Kernels("off"): PyTorch step by step)."""
        self.kernels = kernels
        for norm in self.net.modules():
            if isinstance(norm, RMSNorm):
                norm.kernels = kernels

    @classmethod
    def from_state_dict(cls, sd: dict, device="cpu", dtype=torch.float32, config: dict | None = None,
                        **kwargs) -> "WanVAE":
        """Original / ComfyUI naming (optionally prefixed first_stage_model. or vae.); the
        network shape from `config` (original spelling accepted) or else from tensor shapes."""
        sd = _checked_wan21(_strip_vae_prefix(sd))
        with torch.device("meta"):
            net = VideoVAE(**network_config(config or config_from_state_dict(sd)))
        try:
            net.load_state_dict(sd, strict=True, assign=True)
        except RuntimeError as error:
            raise ValueError(f"the VAE weights do not fit a Wan2.1 VAE of that config: {str(error)[:600]}") from None
        return cls(net, device, dtype, **kwargs)

    @classmethod
    def sharing(cls, parameters: dict, config: dict | None = None, **kwargs) -> "WanVAE":
        """Our streaming VAE around another owner's Wan2.1 VAE parameters (e.g. ComfyUI's
        VAELoader network, same names), the very tensors: it runs on their device in their
        dtype. The owner must have them all on one device (ComfyUI: loaded fully)."""
        parameters = _checked_wan21(_strip_vae_prefix(dict(parameters)))
        with torch.device("meta"):
            net = VideoVAE(**network_config(config or config_from_state_dict(parameters)))
        bind_parameters(net, parameters, "VAE")
        device, dtype = placement_of(net, "VAE")
        return cls(net, device, dtype, owned=False, **kwargs)

    def _computing(self):
        return nullcontext() if self.owned else computing_in(self.net, self.dtype)

    @classmethod
    def load(cls, path, device="cpu", dtype=torch.float32) -> "WanVAE":
        return cls.from_state_dict(read_state_dict(path), device, dtype)

    # ---- normalisation --------------------------------------------------------------
    def normalise(self, mu):
        return (mu.float() - self.mean) / self.std

    def denormalise(self, latents):
        """[z, t, h, w] -> [1, z, t, h, w] in the compute dtype."""
        raw = (latents.to(self.device).float() * self.std + self.mean).unsqueeze(0)
        return raw.to(self.dtype).contiguous(memory_format=self.layout)

    # ---- input checks -------------------------------------------------------------------
    def check_latents(self, latents):
        if not isinstance(latents, torch.Tensor) or latents.dim() != 4 or latents.shape[0] != self.net.z_dim \
                or latents.shape[1] == 0:
            shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"latents must be [{self.net.z_dim}, frames >= 1, h, w], got {shape}")

    @staticmethod
    def check_video(video):
        if not isinstance(video, torch.Tensor) or video.dim() != 4 or video.shape[0] != 3:
            shape = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
            raise ValueError(f"video must be a tensor [3, frames, H, W] in [-1, 1], got {shape}")
        frames, height, width = video.shape[1:]
        if (frames - 1) % ENCODE_CHUNK:
            raise ValueError(f"the VAE encodes 1 + 4k frames (1, 5, 9, ...), got {frames}")
        if height % 8 or width % 8 or not height or not width:
            raise ValueError(f"height and width must be positive multiples of 8, got {height}x{width}")

    # ---- whole clips ------------------------------------------------------------------
    def encode(self, video: torch.Tensor, on_step=None) -> torch.Tensor:
        """Video [3, 1+4k, H, W] in [-1, 1] -> normalised latents [16, 1+k, H/8, W/8] (fp32).
        `on_step()` runs after each of the 1 + k chunks."""
        self.check_video(video)
        with torch.no_grad():
            with self._computing():
                video = video.unsqueeze(0).to(self.device, self.dtype).contiguous(memory_format=self.layout)
                mu = self.net.encode_chunks(video, TimeCache(), on_step)
        return self.normalise(mu[0])

    def decode(self, latents: torch.Tensor, clamp: bool = True, on_step=None) -> torch.Tensor:
        """Normalised latents [16, t, h, w] -> video [3, 1 + 4(t-1), 8h, 8w] (fp32)."""
        return StreamDecoder(self).decode(latents, clamp=clamp, on_step=on_step)

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)

    def encode_portrait(self, image: torch.Tensor, on_step=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Portrait [3, 1, H, W] in [-1, 1] -> (reference latent [16, 1, h, w]: the portrait
        encoded alone; the 19 FramePack motion latents [16, 19, h, w]: the portrait held
        still for 73 frames, encoded). `on_step()` runs after each of the
        PORTRAIT_ENCODE_STEPS chunks (the 73 frames take minutes on a CPU: progress, cancel)."""
        if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[:2] != (3, 1):
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(f"the portrait must be [3, 1, H, W] in [-1, 1] (see portrait.prepare_portrait), got {shape}")
        ref = self.encode(image, on_step)
        motion = self.encode(image.expand(-1, MOTION_FRAMES, -1, -1), on_step)
        return ref, motion


def _checked_wan21(sd: dict) -> dict:
    if "decoder.upsamples.0.upsamples.0.residual.2.weight" in sd:
        raise ValueError("this is the Wan2.2 (4x16x16) VAE; LiveAvatar uses the Wan2.1 VAE (wan_2.1_vae.safetensors)")
    if "encoder.conv1.weight" not in sd or "conv2.weight" not in sd or "decoder.head.2.weight" not in sd:
        raise ValueError("not a Wan2.1 VAE checkpoint (no encoder.conv1 / conv2 / decoder.head weights); "
                         "use wan_2.1_vae.safetensors or Wan2.1_VAE.pth")
    return sd


def _strip_vae_prefix(sd: dict) -> dict:
    for prefix in ("first_stage_model.", "vae.", "model."):
        if any(k.startswith(prefix + "encoder.") for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd
