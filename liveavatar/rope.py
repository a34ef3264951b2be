"""3-D rotary position embedding as Wan2.2-S2V / LiveAvatar use it.

Each attention head's `head_dim / 2` rotation pairs are split into (time, height, width)
groups of sizes [c - 2*(c//3), c//3, c//3] with c = head_dim/2. Each group has its own
frequency ladder theta^(-2i/n) where n is twice the group size (Wan's `rope_params`).
Positions are integer (t, h, w) triples; negative times (FramePack motion history) rotate
the other way, exactly like the conjugated tables of the original.
"""
import torch

THETA = 10000.0


def group_sizes(head_dim: int) -> tuple[int, int, int]:
    c = head_dim // 2
    return c - 2 * (c // 3), c // 3, c // 3


def inverse_frequencies(head_dim: int, device=None) -> list[torch.Tensor]:
    """Per-axis frequency ladders (float64), matching rope_params(·, 2*size)."""
    ladders = []
    for size in group_sizes(head_dim):
        n = 2 * size
        ladders.append(1.0 / THETA ** (torch.arange(0, n, 2, dtype=torch.float64, device=device) / n))
    return ladders


def rope_tables(positions: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [N, 1, head_dim/2] (float32) for integer positions [N, 3] = (t, h, w), computed
    on the positions' device."""
    ladders = inverse_frequencies(head_dim, positions.device)
    pos = positions.to(torch.float64)
    angles = torch.cat([pos[:, axis, None] * ladders[axis] for axis in range(3)], dim=1)
    return angles.cos().float().unsqueeze(1), angles.sin().float().unsqueeze(1)


def grid_tables(time_start: int, frames: int, hp: int, wp: int, head_dim: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """rope_tables of the (t, h, w) raster grid [time_start, +frames) x hp x wp, built on
    `device` from aranges: no host-to-device copy, so no stream sync in the GPU loop."""
    axes = (torch.arange(time_start, time_start + frames, device=device), torch.arange(hp, device=device),
            torch.arange(wp, device=device))
    return rope_tables(torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3), head_dim)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive channel pairs (real, imag) of x [N, heads, head_dim]; math in float32
    (one complex multiply)."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * torch.complex(cos, sin)).flatten(-2).to(x.dtype)


def grid_positions(times: list[int], h_index: list[int], w_index: list[int], device=None) -> torch.Tensor:
    """All (t, h, w) triples of a token grid in (t, h, w) raster order, [len(t)*len(h)*len(w), 3]."""
    t = torch.tensor(times, dtype=torch.long, device=device)
    h = torch.tensor(h_index, dtype=torch.long, device=device)
    w = torch.tensor(w_index, dtype=torch.long, device=device)
    grid = torch.stack(torch.meshgrid(t, h, w, indexing="ij"), dim=-1)
    return grid.reshape(-1, 3)


def spread(start: int, stop: int, count: int) -> list[int]:
    """`count` integers evenly spread over [start, stop], truncated toward zero like
    numpy's linspace(...).astype(int): how the original samples the positions of
    down-sampled (2x, 4x) token grids over the full-resolution grid."""
    if count == 1:
        return [int(start)]
    step = (stop - start) / (count - 1)
    values = [i * step + start for i in range(count - 1)] + [stop]  # numpy pins the last one
    return [int(v) for v in values]
