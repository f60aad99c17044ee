"""Merge primitives shared by SDTM (SSM, IDM) and ToMe, built for little memory traffic and bit-reproducibility.

A `TokenMerge` is the merge of one block at one step: `merge` maps the (B, N, C) tokens to (B, N', C) rows, one row
per kept token plus one per merged group (the group's mean), and `unmerge` copies every row back to its tokens,
optionally blending merged tokens with a cache. `window_merge` (SSM) and `bipartite_merge` (IDM, ToMe) build it.

Why it is cheap and deterministic on a GPU:
- windows are strided views of the row-major (h, w) token grid, so window sums and means are plain reductions;
- similarities and group sums are matmuls in the model's dtype (tensor cores, fp32 accumulation), the group sums
  through a one-hot merge matrix instead of a float `scatter_add_` (whose CUDA atomics make results vary run to run);
- choices are stable sorts; every scatter writes unique positions; no host syncs and no loops over batch or tokens;
- unmerging is one row gather, plus one `lerp` with a per-token weight (1 for tokens computed on their own, which
  `lerp` returns bit-exactly) when a cache is blended in.

Tokens beyond the last full window row/column belong to no window ("loose" tokens).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)  # hashed by identity (the row tables are cached per grid)
class WindowGrid:
    """The non-overlapping ``sy x sx`` windows of an ``(h, w)`` token grid, and index tables built once per device.

    Attributes:
        window_tokens: (W, K) token index of each window's K tokens, row-major inside the window.
        loose_tokens: (L,) tokens outside every full window.
        positions: (N,) 0..N-1.
        destination_keys: (W,) float32 sort keys of the windows' IDM destinations: below any score, decreasing.
    """

    grid: tuple[int, int]
    sx: int
    sy: int
    window_tokens: torch.Tensor
    loose_tokens: torch.Tensor
    positions: torch.Tensor
    destination_keys: torch.Tensor

    @classmethod
    def build(cls, grid: tuple[int, int], sx: int, sy: int, device: torch.device) -> "WindowGrid":
        h, w = grid
        if h < sy or w < sx:
            raise ValueError(f"token grid {h}x{w} is smaller than one {sy}x{sx} (sy x sx) window; use smaller sx/sy")
        # built on the CPU (boolean indexing has no meta-device kernel), then moved
        gh, gw = h // sy, w // sx
        ids = torch.arange(h * w).view(h, w)
        window_tokens = ids[: gh * sy, : gw * sx].reshape(gh, sy, gw, sx).permute(0, 2, 1, 3).reshape(gh * gw, sy * sx)
        in_window = torch.zeros(h * w, dtype=torch.bool)
        in_window[window_tokens.flatten()] = True
        loose = (~in_window).nonzero().flatten()
        keys = -1e30 * (1 + torch.arange(gh * gw) / (gh * gw))
        return cls(grid, sx, sy, window_tokens.to(device), loose.to(device), torch.arange(h * w, device=device),
                   keys.to(device))

    @property
    def num_windows(self) -> int:
        return self.window_tokens.shape[0]

    @property
    def window_size(self) -> int:
        return self.sx * self.sy

    @functools.lru_cache(maxsize=16)
    def window_merge_rows(self, num_windows: int) -> torch.Tensor:
        """(N,) the merged row of each position of `window_merge`'s token order (loose and kept window tokens, then
        the merged windows' K tokens each): kept positions keep their index, merged window j's tokens share row
        ``n_kept + j``. Built once per merged-window count."""
        n_kept = self.positions.numel() - num_windows * self.window_size
        return torch.where(self.positions < n_kept, self.positions,
                           n_kept + (self.positions - n_kept).div(self.window_size, rounding_mode="floor"))

    def window_view(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, *F) -> (B, gh, sy, gw, sx, *F): a view (no copy) of the tokens covered by full windows."""
        h, w = self.grid
        gh, gw = h // self.sy, w // self.sx
        grid = x.unflatten(1, (h, w))[:, : gh * self.sy, : gw * self.sx]
        return grid.unflatten(1, (gh, self.sy)).unflatten(3, (gw, self.sx))

    def per_window(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N) -> (B, W, K): each window's values, row-major inside the window (a copy; for small tensors)."""
        return self.window_view(x).transpose(2, 3).flatten(3, 4).flatten(1, 2)

    def window_reduce(self, x: torch.Tensor, mean: bool = False, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(B, N, *F) -> (B, W, *F): the sum (or mean) over each window, windows in `window_tokens` order, in `dtype`
        (default: x's), accumulated in at least fp32.

        One reduction over both window dimensions (one kernel, one output); on CPU two single-dimension ones, since
        PyTorch's CPU reduction over two strided dimensions is ~18x slower (measured on a (2, 256, 256) grid).
        """
        view = self.window_view(x)
        if x.device.type == "cpu":
            reduced = view.sum(2, dtype=torch.promote_types(x.dtype, torch.float32)).sum(3)
            return (reduced.div_(self.window_size) if mean else reduced).to(dtype or x.dtype).flatten(1, 2)
        reduced = view.mean((2, 4), dtype=dtype) if mean else view.sum((2, 4), dtype=dtype)
        return reduced.flatten(1, 2)


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B, N, C), (B, M) -> (B, M, C): whole-row copies.

    An `index_select` of the (B·N, C) rows: `gather` with the index expanded over C copies element by element
    (~9x slower on CPU for (2, 256, 256)).
    """
    return _take_rows(x, _flat_rows(index, x.shape[1]))


def _flat_rows(index: torch.Tensor, n: int) -> torch.Tensor:
    """(B, M) token indices -> (B·M,) rows of the flattened (B·N, C) tokens."""
    return (index + _row_offsets(index.shape[0], n, index.device)).flatten()


def _take_rows(x: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """(B, N, C), (B·M,) flat rows -> (B, M, C)."""
    b, n, c = x.shape
    return x.reshape(b * n, c).index_select(0, flat).view(b, -1, c)


@functools.lru_cache(maxsize=64)
def _row_offsets(b: int, n: int, device: torch.device) -> torch.Tensor:
    """(B, 1) first row of each batch element in the flattened (B·N, C) tokens."""
    return torch.arange(0, b * n, n, device=device).unsqueeze(1)


def inverse_norms(x: torch.Tensor) -> torch.Tensor:
    """(B, N, C) -> (B, N) float32 1 / ||x||, accumulated in fp32 without a full-size fp32 copy."""
    return torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32).clamp_min(1e-12).reciprocal()


class TokenMerge:
    """The merge of one block's tokens: (B, N, C) -> (B, N', C) and back.

    Merged rows are laid out as ``[kept tokens..., groups...]``: `rows` (B, N') names the token each row is
    gathered from (a group row first holds one member of the group, then the group's mean, see `merge`),
    `row_of_token` (B, N) the row each token reads its output from.

    Args:
        rows: (B, N') long.
        row_of_token: (B, N) long.
        merged: (B, N) bool, the tokens that share their row with others.
        num_groups: G, the trailing rows that are groups.
        group_means: ``(x, members) -> (B, G, C)``, the mean of each group from the merge input `x` and the group
            rows' gathered members `members` (B, G, C).
    """

    def __init__(self, rows: torch.Tensor, row_of_token: torch.Tensor, merged: torch.Tensor, num_groups: int,
                 group_means) -> None:
        self.rows = rows
        self.row_of_token = row_of_token
        # flat row indices, built once: each sub-layer of the block merges and unmerges with them
        self._flat_rows = _flat_rows(rows, row_of_token.shape[1])
        self._flat_row_of_token = _flat_rows(row_of_token, rows.shape[1])
        self.merged = merged
        self.num_groups = num_groups
        self._group_means = group_means
        self._blend_weights: dict[tuple[float, torch.dtype], torch.Tensor] = {}

    @property
    def num_tokens(self) -> int:
        return self.row_of_token.shape[1]

    @property
    def num_rows(self) -> int:
        return self.rows.shape[1]

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, N', C): kept tokens unchanged (bit-exact), each group its mean (fp32 accumulation)."""
        if x.shape[1] != self.num_tokens:
            raise ValueError(f"merge expected {self.num_tokens} tokens, got {x.shape[1]} (shape {tuple(x.shape)})")
        out = _take_rows(x, self._flat_rows)
        if self.num_groups:
            groups = out[:, out.shape[1] - self.num_groups:]
            groups.copy_(self._group_means(x, groups))
        return out

    def unmerge(self, y: torch.Tensor, cache: torch.Tensor | None = None, cache_weight: float = 1.0) -> torch.Tensor:
        """(B, N', C) -> (B, N, C): each token gets its row's output.

        With `cache` (B, N, C), merged tokens get ``cache_weight * row + (1 - cache_weight) * cache``; tokens computed
        on their own keep their exact output.
        """
        if y.shape[1] != self.num_rows:
            raise ValueError(f"unmerge expected {self.num_rows} rows, got {y.shape[1]} (shape {tuple(y.shape)})")
        out = _take_rows(y, self._flat_row_of_token)
        if cache is None or cache_weight >= 1.0:
            return out
        return torch.lerp(cache.to(out.dtype), out, self._blend_weight(cache_weight, out.dtype))

    def _blend_weight(self, cache_weight: float, dtype: torch.dtype) -> torch.Tensor:
        key = (cache_weight, dtype)
        if key not in self._blend_weights:  # shared by the attention and MLP unmerges of the block
            self._blend_weights[key] = (self.merged.to(dtype) * (cache_weight - 1.0) + 1.0).unsqueeze(-1)
        return self._blend_weights[key]


def staleness_priority(staleness: torch.Tensor, form: str = "linear") -> torch.Tensor:
    """P_fre from the steps T since each token was computed on its own, (B, N) -> (B, N) float.

    ``"linear"``: ``T / mean(T)`` per batch element (the paper's; all-zero T gives zeros); ``"bounded"``:
    ``T / (T + 1)``, in [0, 1).
    """
    if form == "bounded":
        return staleness / (staleness + 1.0)
    mean = staleness.sum(1, keepdim=True, dtype=torch.float32).div_(staleness.shape[1]).clamp_min_(1e-6)
    return staleness / mean


def window_medoid_scores(x: torch.Tensor, grid: WindowGrid) -> torch.Tensor:
    """(B, N, C) -> (B, W, K): each window token's cosine similarity to the sum of its window's unit vectors."""
    unit = x * inverse_norms(x).to(x.dtype).unsqueeze(-1)
    windows = grid.window_view(unit)  # (B, gh, sy, gw, sx, C)
    gh, gw = windows.shape[1], windows.shape[3]
    summed = grid.window_reduce(unit, dtype=torch.float32).to(x.dtype).unflatten(1, (gh, gw))[:, :, None, :, None]
    return (windows * summed).sum(-1, dtype=torch.float32).transpose(2, 3).flatten(3, 4).flatten(1, 2)


def _window_unit_sums(x: torch.Tensor, grid: WindowGrid) -> torch.Tensor:
    """(B, N, C) -> (B, W) float32 ``|sum_k v_k|^2`` over each window's unit vectors v (model dtype, fp32 sums)."""
    unit = x * inverse_norms(x).to(x.dtype).unsqueeze(-1)
    summed = grid.window_reduce(unit, dtype=torch.float32)  # (B, W, C)
    return torch.linalg.vector_norm(summed, dim=-1).square_()


def window_scores(x: torch.Tensor, grid: WindowGrid) -> torch.Tensor:
    """(B, N, C) -> (B, W) float32: mean cosine similarity over the K(K-1) ordered pairs of each window's tokens.

    ``(|sum_k v_k|^2 - K) / (K(K-1))`` on unit vectors v: O(K C) per window.
    """
    k = grid.window_size
    return (_window_unit_sums(x, grid) - k) / (k * (k - 1))


def window_merge(x: torch.Tensor, grid: WindowGrid, num_windows: int, priority: torch.Tensor | None = None,
                 priority_weight: float = 0.0) -> TokenMerge:
    """SSM: merge the `num_windows` windows of highest ``P_sim + priority_weight * P_fre`` whole, into their mean.

    Args:
        x: (B, N, C) the compared features (the sub-layer input).
        grid: the window grid of the N tokens.
        num_windows: windows merged (w); N' = N - w (K - 1).
        priority: (B, N) per-token P_fre, averaged per window; None for none.
    """
    b, n, _ = x.shape
    k = grid.window_size
    # ranked on |sum v|^2 = K + K(K-1) P_sim: the same order as P_sim, with the prior scaled to match
    score = _window_unit_sums(x, grid)
    if priority is not None and priority_weight:
        score = score.add_(grid.window_reduce(priority, mean=True), alpha=priority_weight * k * (k - 1))
    order = score.sort(dim=1, descending=True, stable=True).indices  # (B, W), the merged windows first
    # token order: loose tokens, the kept windows' tokens, then the merged windows' K tokens each
    ordered = grid.window_tokens[order.roll(-num_windows, dims=1)].flatten(1)
    if grid.loose_tokens.numel():
        ordered = torch.cat([grid.loose_tokens.expand(b, -1), ordered], dim=1)
    n_kept = n - num_windows * k
    rows = torch.cat([ordered[:, :n_kept], ordered[:, n_kept::k]], dim=1)  # (B, N'): a group row holds a member
    row_of_token = torch.empty_like(ordered).scatter_(1, ordered, grid.window_merge_rows(num_windows).expand(b, -1))
    merged = row_of_token >= n_kept
    chosen = order[:, :num_windows]

    def group_means(y: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
        return _gather_rows(grid.window_reduce(y, mean=True), chosen)  # (B, w, C), fp32 accumulation

    return TokenMerge(rows, row_of_token, merged, num_windows, group_means)


def bipartite_merge(x: torch.Tensor, grid: WindowGrid, num_merged: int, destination_score: torch.Tensor | None = None,
                    priority: torch.Tensor | None = None, priority_weight: float = 0.0) -> TokenMerge:
    """IDM / ToMe: one destination per window; the `num_merged` best-scoring sources merge into their best match.

    Each window's destination is the argmax of `destination_score` (B, W, K) over its positions (the first
    position when None). Sources are the other window tokens and the loose tokens; a source's score is its best
    cosine similarity to any destination (P_ina) plus ``priority_weight * priority`` (P_fre); ties go to the lower
    token index. Destinations become the group rows (one that receives no source keeps its own value).

    Args:
        x: (B, N, C).
        destination_score: (B, W, K) or None.
        priority: (B, N) or None.
    """
    b, n, _ = x.shape
    num_windows = grid.num_windows
    if destination_score is None:
        dst = grid.window_tokens[:, 0].expand(b, -1)  # (B, W)
    else:
        dst = grid.window_tokens.expand(b, -1, -1).gather(2, destination_score.argmax(-1, keepdim=True)).squeeze(-1)
    # cosines of unit vectors (<= 1: no fp16 overflow) of every token to every destination, one matmul in the model
    # dtype (fp32 accumulation); scoring all N tokens instead of gathering the N - W sources costs W more rows
    unit = x * inverse_norms(x).to(x.dtype).unsqueeze(-1)
    best, best_dst = torch.bmm(unit, _gather_rows(unit, dst).transpose(1, 2)).max(-1)  # (B, N) cosine, window
    score = best.float()
    if priority is not None and priority_weight:
        score = score.add_(priority, alpha=priority_weight)
    # destinations are no sources: keys below any score, decreasing with the window index, sort them last
    score.scatter_(1, dst, grid.destination_keys.expand(b, -1))
    # token order: the merged sources, the kept sources, then the destinations (in window order)
    ordered = score.sort(dim=1, descending=True, stable=True).indices
    n_kept = n - num_windows - num_merged
    rows = ordered[:, num_merged:]  # (B, N'): kept sources, then one row per window
    chosen = ordered[:, :num_merged]
    group = best_dst.gather(1, chosen)  # (B, r): the window each merged source joins
    row_of_token = torch.empty_like(ordered).scatter_(1, ordered, grid.positions.expand(b, -1)).sub_(num_merged)
    chosen_row = group + n_kept
    row_of_token.scatter_(1, chosen, chosen_row)
    receives = torch.zeros(b, n - num_merged, dtype=torch.bool, device=x.device).scatter_(1, chosen_row, True)
    merged = receives.gather(1, row_of_token)
    # merge matrix: each group's mean as a (W x r) @ (r x C) matmul, deterministic (no float atomics); the 1 / size
    # weights are inside it, so no group sum is ever formed (fp16 overflows at 65504)
    weights = torch.zeros(b, num_windows, num_merged, dtype=x.dtype, device=x.device).scatter_(1, group.unsqueeze(1), 1.0)
    inv_size = weights.sum(-1, keepdim=True).add_(1.0).reciprocal_()  # (B, W, 1), exact small integers before
    weights.mul_(inv_size)

    def group_means(y: torch.Tensor, destinations: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(destinations * inv_size, weights, _gather_rows(y, chosen))

    return TokenMerge(rows, row_of_token, merged, num_windows, group_means)
