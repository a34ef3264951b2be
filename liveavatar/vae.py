"""The Wan2.1 video VAE (causal 3-D convolutions) with streaming decode.

Parameter names follow the original `Wan2.1_VAE.pth` (encoder.*, conv1, conv2, decoder.*).
Time is causal: every temporal convolution sees the current chunk plus the last two
input frames of the previous chunk (its *cache*), zero frames before the first chunk. The
encoder takes video in chunks of 1, then 4 frames (4x temporal compression, so video
frames 1 + 4k -> latents 1 + k); the decoder takes one latent at a time. Carrying the
caches between calls makes a stream of decode calls equal to one full decode, with memory
independent of video length.

Latents are normalised per channel: (mu - mean) / std with Wan2.1's fixed constants.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

# Wan2.1 VAE latent statistics (per channel), used to normalise latents for the DiT.
LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
               0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
              3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)
CACHE_FRAMES = 2  # a 3-tap causal time kernel needs the last two input frames
MOTION_FRAMES = 73  # video frames of FramePack motion history -> 19 latents
ENCODE_CHUNK = 4
FIRST_CHUNK = "first chunk"  # marker: an upsample3d site that has seen only the first chunk


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


class CausalConv3d(nn.Conv3d):
    """Conv3d padded only in the past along time (2 * pad frames), spatially symmetric.
    `previous` frames (from the last chunk) replace that much of the zero padding."""

    def __init__(self, chan_in, chan_out, kernel, stride=1, padding=0):
        super().__init__(chan_in, chan_out, kernel, stride=stride)
        pad = (padding,) * 3 if isinstance(padding, int) else padding
        self.time_pad, self.space_pad = 2 * pad[0], (pad[2], pad[2], pad[1], pad[1])

    def forward(self, x, previous=None):
        time_pad = self.time_pad
        if previous is not None:
            x = torch.cat([previous.to(x), x], dim=2)
            time_pad -= previous.shape[2]
        x = F.pad(x, self.space_pad + (time_pad, 0))
        return self._conv_by_time_taps(x) if x.device.type == "cpu" else super().forward(x)

    def _conv_by_time_taps(self, x):
        """Same result as conv3d, as one conv2d per temporal tap over all output frames:
        several times faster than PyTorch's CPU conv3d (tests, demo)."""
        taps, stride = self.kernel_size[0], self.stride[0]
        frames = (x.shape[2] - taps) // stride + 1
        out = None
        for k in range(taps):
            window = x[:, :, k:k + (frames - 1) * stride + 1:stride]
            y = F.conv2d(rearrange(window, "b c t h w -> (b t) c h w"), self.weight[:, :, k], None, self.stride[1:])
            out = y if out is None else out + y
        out = out + self.bias.view(1, -1, 1, 1)
        return rearrange(out, "(b t) c h w -> b c t h w", t=frames)


def cached(conv: CausalConv3d, x, cache: TimeCache):
    """Run a causal conv on one chunk, keeping its last two input frames for the next
    (one new frame + the previous chunk's last when the chunk is a single frame)."""
    if conv.time_pad == 0:
        return conv(x)
    previous = cache.previous()
    keep = x[:, :, -CACHE_FRAMES:]
    if keep.shape[2] < CACHE_FRAMES and previous is not None:
        keep = torch.cat([previous[:, :, -1:].to(keep), keep], dim=2)
    cache.store(keep)
    return conv(x, previous)


class RMSNorm(nn.Module):
    """L2-normalise over channels, times sqrt(C) and a learned gain (`gamma`)."""

    def __init__(self, dim: int, images: bool = True):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones((dim, 1, 1) if images else (dim, 1, 1, 1)))

    def forward(self, x):
        return F.normalize(x, dim=1) * self.scale * self.gamma


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
        frames = x.shape[2]
        x = rearrange(x, "b c t h w -> (b t) c h w")
        x = self.resample[1](self.resample[0](x.float()).to(x.dtype)) if self.mode.startswith("upsample") \
            else self.resample(x)
        x = rearrange(x, "(b t) c h w -> b c t h w", t=frames)
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
        keep = x[:, :, -CACHE_FRAMES:]
        if keep.shape[2] < CACHE_FRAMES:
            before = torch.zeros_like(keep) if previous is FIRST_CHUNK else previous[:, :, -1:].to(keep)
            keep = torch.cat([before, keep], dim=2)
        cache.store(keep)
        y = self.time_conv(x, None if previous is FIRST_CHUNK else previous)
        return rearrange(y, "b (two c) t h w -> b c (t two) h w", two=2)

    def _downsample_time(self, x, cache):
        """Frames 1+4k -> 1+2k: the first chunk passes through; later chunks are convolved
        with stride 2 after the previous chunk's last frame."""
        previous = cache.previous()
        cache.store(x[:, :, -1:])
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
        h = self.shortcut(x)
        for layer in self.residual:
            x = cached(layer, x, cache) if isinstance(layer, CausalConv3d) else layer(x)
        return x + h


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
    for layer in layers:
        if isinstance(layer, CausalConv3d):
            x = cached(layer, x, cache)
        elif isinstance(layer, (ResidualBlock, Resample)):
            x = layer(x, cache)
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

    def encode_chunks(self, video, cache: TimeCache):
        """Video [B, 3, T, H, W] -> latent mean [B, z, 1 + (T-1)/4, h, w], chunks of 1 then 4."""
        starts = [0] + list(range(1, video.shape[2], ENCODE_CHUNK))
        out = []
        for start in starts:
            cache.rewind()
            end = 1 if start == 0 else start + ENCODE_CHUNK
            out.append(self.encoder(video[:, :, start:end], cache))
        mu, _log_var = self.conv1(torch.cat(out, dim=2)).chunk(2, dim=1)
        return mu

    def decode_frames(self, z, cache: TimeCache):
        """Unnormalised latents [B, z, t, h, w] -> video frames, one latent at a time."""
        x = self.conv2(z)
        out = []
        for i in range(x.shape[2]):
            cache.rewind()
            out.append(self.decoder(x[:, :, i:i + 1], cache))
        return torch.cat(out, dim=2)


def config_from_state_dict(sd: dict) -> dict:
    """Network shape from tensor shapes (Wan2.1: dim 96, z 16, mult 1,2,4,4, 2 res blocks)."""
    dim = sd["encoder.conv1.weight"].shape[0]
    z_dim = sd["conv2.weight"].shape[0]
    stages, current, res_blocks, temporal = [], [], 0, []
    layer = 0
    while f"encoder.downsamples.{layer}.residual.0.gamma" in sd or f"encoder.downsamples.{layer}.resample.1.weight" in sd:
        prefix = f"encoder.downsamples.{layer}."
        if prefix + "residual.0.gamma" in sd:
            current.append(sd[prefix + "residual.2.weight"].shape[0])
        else:
            stages.append(current)
            current = []
            temporal.append(prefix + "time_conv.weight" in sd)
        layer += 1
    stages.append(current)
    res_blocks = len(stages[0])
    return dict(dim=dim, z_dim=z_dim, dim_mult=tuple(s[-1] // dim for s in stages), num_res_blocks=res_blocks,
                temporal_downsample=tuple(temporal))


class StreamDecoder:
    """Decode latents in successive calls with the causal cache carried: the first latent
    of the stream gives 1 frame, every later latent 4. Memory stays flat in stream length."""

    def __init__(self, vae: "WanVAE"):
        self.vae = vae
        self.cache = TimeCache()

    def decode(self, latents: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """Normalised latents [16, t, h, w] -> frames [3, T, H, W] in [-1, 1]."""
        with torch.no_grad():
            z = self.vae.denormalise(latents)
            frames = self.vae.net.decode_frames(z, self.cache)[0].float()
        return frames.clamp(-1, 1) if clamp else frames

    def reset(self):
        self.cache = TimeCache()


class WanVAE:
    """Wan2.1 VAE on one device, in fp32 or bf16; latents normalised as the DiT expects."""

    def __init__(self, net: VideoVAE, device="cpu", dtype=torch.float32, mean=LATENT_MEAN, std=LATENT_STD):
        self.net = net.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.device, self.dtype = torch.device(device), dtype
        self.mean = torch.as_tensor(mean, dtype=torch.float32, device=device).view(-1, 1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32, device=device).view(-1, 1, 1, 1)

    @classmethod
    def from_state_dict(cls, sd: dict, device="cpu", dtype=torch.float32, **kwargs) -> "WanVAE":
        sd = _strip_vae_prefix(sd)
        if "encoder.conv1.weight" not in sd or "decoder.head.2.weight" not in sd:
            raise ValueError("not a Wan2.1 VAE state dict (no encoder.conv1 / decoder.head weights); "
                             "use wan_2.1_vae.safetensors or Wan2.1_VAE.pth")
        if "decoder.upsamples.0.upsamples.0.residual.2.weight" in sd:
            raise ValueError("this is the Wan2.2 (4x16x16) VAE; LiveAvatar uses the Wan2.1 VAE (wan_2.1_vae.safetensors)")
        with torch.device("meta"):
            net = VideoVAE(**config_from_state_dict(sd))
        net.load_state_dict(sd, strict=True, assign=True)
        return cls(net, device, dtype, **kwargs)

    @classmethod
    def load(cls, path, device="cpu", dtype=torch.float32) -> "WanVAE":
        return cls.from_state_dict(read_state_dict(path), device, dtype)

    # ---- normalisation --------------------------------------------------------------
    def normalise(self, mu):
        return (mu.float() - self.mean) / self.std

    def denormalise(self, latents):
        return (latents.to(self.device).float() * self.std + self.mean).unsqueeze(0).to(self.dtype)

    # ---- whole clips ------------------------------------------------------------------
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Video [3, 1+4k, H, W] in [-1, 1] -> normalised latents [16, 1+k, H/8, W/8] (fp32)."""
        if video.dim() != 4 or video.shape[0] != 3:
            raise ValueError(f"video must be [3, frames, H, W], got {tuple(video.shape)}")
        with torch.no_grad():
            mu = self.net.encode_chunks(video.unsqueeze(0).to(self.device, self.dtype), TimeCache())
        return self.normalise(mu[0])

    def decode(self, latents: torch.Tensor, clamp: bool = False) -> torch.Tensor:
        """Normalised latents [16, t, h, w] -> video [3, 1 + 4(t-1), H, W]."""
        return StreamDecoder(self).decode(latents, clamp=clamp)

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)

    def encode_portrait(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Portrait [3, 1, H, W] in [-1, 1] -> (reference latent [16, 1, h, w], the 19 FramePack
        motion latents [16, 19, h, w] = the portrait held still for 73 frames)."""
        ref = self.encode(image)
        motion = self.encode(image.expand(-1, MOTION_FRAMES, -1, -1))
        return ref, motion


def _strip_vae_prefix(sd: dict) -> dict:
    for prefix in ("first_stage_model.", "vae.", "model."):
        if any(k.startswith(prefix + "encoder.") for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


def read_state_dict(path) -> dict:
    """safetensors, or .pth/.pt via torch.load(weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"VAE weights not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state
