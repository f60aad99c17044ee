"""The token grid of a merge: its windows (`WindowGrid`: which tokens share a window, their order, neighbour
windows) and the per-batch index tables built from it, cached per shape (`cached_tables`).

A grid is an ``(h, w)`` image or ``(frames, h, w)`` video token grid cut into ``(st, sy, sx)`` windows; tokens beyond
the last full window row/column belong to no window ("loose" tokens).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Callable

import torch


def cached_tables(maxsize: int) -> Callable:
    """`functools.lru_cache` for index tables that depend only on shapes and counts. Traced by `torch.compile`, the
    tables are built inside the graph instead (a few index kernels, none reading data), since dynamo cannot see a
    Python cache."""

    def decorate(build: Callable) -> Callable:
        cached = functools.lru_cache(maxsize=maxsize)(build)

        @functools.wraps(build)
        def tables(*args):
            return build(*args) if torch.compiler.is_compiling() else cached(*args)

        tables.cache_clear = cached.cache_clear
        return tables

    return decorate


@dataclass(frozen=True)
class BatchTables:
    """Index tables of a `WindowGrid` for one batch size, rows of the flattened (B·N, C) tokens.

    Attributes:
        offsets: (B, 1) the first row of each batch element.
        window_tokens: (B, W, K) the rows of each window's tokens.
        first_tokens: (B·W,) each window's first token.
        loose_tokens: (B, L).
        window_ids: (B·W,) 0..W-1 per batch element.
        destination_keys: (B·W,) float32 sort keys of bipartite destinations: above any score, decreasing with the
            window.
    """

    offsets: torch.Tensor
    window_tokens: torch.Tensor
    first_tokens: torch.Tensor
    loose_tokens: torch.Tensor
    window_ids: torch.Tensor
    destination_keys: torch.Tensor


def window_counts(grid: tuple[int, ...], window: tuple[int, int, int]) -> tuple[int, int, int]:
    """Full ``(st, sy, sx)`` windows along each axis of an ``(h, w)`` image or ``(frames, h, w)`` video token grid:
    (gf, gh, gw). An image grid has one frame, so its windows have ``st = 1``."""
    if len(grid) not in (2, 3):
        raise ValueError(f"a token grid is (h, w) or (frames, h, w), got {grid}")
    st, sy, sx = window
    if len(grid) == 2 and st != 1:
        raise ValueError(f"st={st} spans frames, but this model's token grid {grid} is an image's (h, w); st must be "
                         f"1 for image models (st > 1 is for video models such as Wan)")
    f, h, w = (1, *grid) if len(grid) == 2 else grid
    return f // st, h // sy, w // sx


@dataclass(frozen=True, eq=False)  # hashed by identity (its tables are cached per grid)
class WindowGrid:
    """The non-overlapping ``st x sy x sx`` windows of an ``(h, w)`` image or ``(frames, h, w)`` video token grid
    (tokens in frame, row, column order).

    Attributes:
        window_tokens: (W, K) token index of each window's K = st·sy·sx tokens, frame- then row-major inside the
            window; windows in frame, row, column order.
        loose_tokens: (L,) tokens outside every full window.
    """

    grid: tuple[int, ...]
    sx: int
    sy: int
    window_tokens: torch.Tensor
    loose_tokens: torch.Tensor
    st: int = 1
    _neighbours: dict = field(default_factory=dict, repr=False)  # radius -> `neighbour_windows`

    @classmethod
    def build(cls, grid: tuple[int, ...], sx: int, sy: int, device: torch.device, st: int = 1) -> "WindowGrid":
        gf, gh, gw = window_counts(grid, (st, sy, sx))
        f, h, w = (1, *grid) if len(grid) == 2 else grid
        if gf == 0 or gh == 0 or gw == 0:
            shape = "x".join(map(str, grid))
            raise ValueError(f"token grid {shape} is smaller than one {st}x{sy}x{sx} (st x sy x sx) window; use smaller "
                             f"st/sy/sx")
        # slices only (no boolean mask, whose nonzero would make the host wait for the device), on the device
        ids = torch.arange(f * h * w, device=device).view(f, h, w)
        window_tokens = (ids[: gf * st, : gh * sy, : gw * sx].reshape(gf, st, gh, sy, gw, sx)
                         .permute(0, 2, 4, 1, 3, 5).reshape(gf * gh * gw, st * sy * sx))
        # right of the last window column, below the last window row, after the last window frame; in token order
        loose = torch.cat([ids[: gf * st, : gh * sy, gw * sx:].flatten(), ids[: gf * st, gh * sy:].flatten(),
                           ids[gf * st:].flatten()]).sort().values
        return cls(grid, sx, sy, window_tokens, loose, st)

    @property
    def dims(self) -> tuple[int, int, int]:
        """(frames, h, w); one frame for an image grid."""
        return (1, *self.grid) if len(self.grid) == 2 else self.grid

    @property
    def counts(self) -> tuple[int, int, int]:
        """(gf, gh, gw) full windows along frames, rows and columns."""
        return window_counts(self.grid, (self.st, self.sy, self.sx))

    @property
    def num_tokens(self) -> int:
        return math.prod(self.grid)

    @property
    def num_windows(self) -> int:
        return self.window_tokens.shape[0]

    @property
    def window_size(self) -> int:
        return self.st * self.sy * self.sx

    @cached_tables(maxsize=8)
    def batch_tables(self, batch: int) -> BatchTables:
        n, w = self.num_tokens, self.num_windows
        device = self.window_tokens.device
        offsets = torch.arange(0, batch * n, n, device=device).unsqueeze(1)
        window_tokens = self.window_tokens + offsets.unsqueeze(2)
        keys = 1e30 * (2 - torch.arange(w, device=device) / w)
        return BatchTables(offsets, window_tokens, window_tokens[:, :, 0].flatten(), self.loose_tokens + offsets,
                           torch.arange(w, device=device).repeat(batch), keys.repeat(batch))

    def neighbour_windows(self, radius: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Candidate windows of local matching: (W, J) the windows within `radius` windows of each window along rows,
        columns and (video) frames (offsets in frame-, row-, column-major order, clamped at the grid's border;
        J = (2 radius + 1)^2, times (2 radius + 1) with more than one window frame), and (L, J) those of each loose
        token's nearest window.

        Kept on the grid and built eagerly before a compiled forward (`MergeState.begin_forward`): inductor cannot
        bound these indices when it computes them itself inside the graph (it fails compiling their gathers)."""
        if radius not in self._neighbours:
            self._neighbours[radius] = self._neighbour_tables(radius)
        return self._neighbours[radius]

    def _neighbour_tables(self, radius: int) -> tuple[torch.Tensor, torch.Tensor]:
        _, h, w = self.dims
        gf, gh, gw = self.counts
        loose = self.loose_tokens
        offsets = torch.arange(-radius, radius + 1, device=loose.device)
        frame_offsets = offsets if gf > 1 else offsets[radius:radius + 1]
        frames = (torch.arange(gf, device=loose.device).view(gf, 1, 1, 1, 1, 1) + frame_offsets[:, None, None])
        rows = torch.arange(gh, device=loose.device).view(1, gh, 1, 1, 1, 1) + offsets[:, None]
        cols = torch.arange(gw, device=loose.device).view(1, 1, gw, 1, 1, 1) + offsets
        # (gf, gh, gw, T, R, R) from (gf, 1, 1, T, 1, 1), (1, gh, 1, 1, R, 1) and (1, 1, gw, 1, 1, R)
        windows = ((frames.clamp(0, gf - 1) * gh + rows.clamp(0, gh - 1)) * gw + cols.clamp(0, gw - 1))
        windows = windows.reshape(gf * gh * gw, -1)
        frame, within = loose // (h * w), loose % (h * w)
        nearest = (((frame // self.st).clamp(max=gf - 1) * gh + (within // w // self.sy).clamp(max=gh - 1)) * gw
                   + (within % w // self.sx).clamp(max=gw - 1))
        return windows, windows[nearest]

    @cached_tables(maxsize=4)
    def band_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """(gw, sy·w) in `dtype`: 1 where a token of a band of sy token rows lies in the band's window j."""
        w = self.dims[2]
        column = torch.arange(self.sy * w, device=self.window_tokens.device) % w
        windows = torch.arange(w // self.sx, device=column.device).unsqueeze(1)
        return ((column.div(self.sx, rounding_mode="floor") == windows) & (column < windows.numel() * self.sx)).to(dtype)

    def window_unit_sums(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, W, C): the sum of each window's unit vectors ``x / ||x||``, in x's dtype (fp32
        accumulation within a frame), windows in `window_tokens` order.

        One matmul per band of sy token rows of a frame, (gw x sy·w) pooling weights ``1 / ||x||`` @ the band's
        (sy·w x C) tokens: no unit-vector copy of x is written (its cost: sy·w / K times the sums' MACs, a few per
        cent of one linear layer's); a video window's st frames are then summed.
        """
        b, _, c = x.shape
        f, h, w = self.dims
        gf, gh, _ = self.counts
        frames, band = gf * self.st, self.sy * w
        tokens = x.unflatten(1, (f, h * w))[:, :frames, : gh * band]  # (B, gf·st, gh·band, C)
        norms = torch.linalg.vector_norm(tokens, dim=-1).clamp_min_(torch.finfo(x.dtype).tiny)
        weights = self.band_mask(x.dtype) / norms.view(b * frames * gh, 1, band)  # (B·gf·st·gh, gw, sy·w)
        # a view unless loose token rows lie between the bands of consecutive frames or batch elements
        sums = torch.bmm(weights, tokens.reshape(b * frames * gh, band, c))
        if self.st > 1:
            return sums.view(b, gf, self.st, -1, c).sum(2).flatten(1, 2)
        return sums.view(b, -1, c)

    def window_view(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, *F) -> (B, gf, st, gh, sy, gw, sx, *F): a view (no copy) of the tokens covered by full windows."""
        gf, gh, gw = self.counts
        grid = x.unflatten(1, self.dims)[:, : gf * self.st, : gh * self.sy, : gw * self.sx]
        return grid.unflatten(1, (gf, self.st)).unflatten(3, (gh, self.sy)).unflatten(5, (gw, self.sx))

    def per_window(self, x: torch.Tensor, plus: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N) -> (B, W, K): each window's values, frame- then row-major inside the window, plus `plus` (B, W, K)
        if given (one kernel either way: the copy or the sum)."""
        windows = self.window_view(x).permute(0, 1, 3, 5, 2, 4, 6)  # (B, gf, gh, gw, st, sy, sx)
        if plus is None:
            return windows.contiguous().flatten(4).flatten(1, 3)
        # the contiguous operand first: the sum is laid out like it, so flattening it is a view
        return plus.view(windows.shape).add(windows).flatten(4).flatten(1, 3)

    def window_reduce(self, x: torch.Tensor, mean: bool = False, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(B, N, *F) -> (B, W, *F): the sum (or mean) over each window, windows in `window_tokens` order, in `dtype`
        (default: x's), accumulated in at least fp32.

        One reduction over the window dimensions (one kernel, one output); on CPU single-dimension ones, since
        PyTorch's CPU reduction over two strided dimensions is ~18x slower (measured on a (2, 256, 256) grid).
        """
        view = self.window_view(x)  # (B, gf, st, gh, sy, gw, sx, *F)
        if x.device.type == "cpu":
            reduced = view.sum(4, dtype=torch.promote_types(x.dtype, torch.float32)).sum(5)  # (B, gf, st, gh, gw, *F)
            reduced = reduced.sum(2) if self.st > 1 else reduced.squeeze(2)
            return (reduced.div_(self.window_size) if mean else reduced).to(dtype or x.dtype).flatten(1, 3)
        reduced = view.mean((2, 4, 6), dtype=dtype) if mean else view.sum((2, 4, 6), dtype=dtype)
        return reduced.flatten(1, 3)
