"""Merge primitives shared by SDTM (SSM, IDM) and ToMe, built for little memory traffic and bit-reproducibility.

A `TokenMerge` is the merge of one block at one step: `merge` maps the (B, N, C) tokens to (B, N', C) rows, one row
per kept token plus one per merged group (the group's mean), and `unmerge` copies every row back to its tokens,
optionally blending merged tokens with a cache. `window_merge` (SSM) and `bipartite_merge` (IDM, ToMe) build it.

Why it is cheap and deterministic on a GPU:
- windows are strided views of the row-major (h, w) token grid, so window sums and means are plain reductions;
- similarities and group sums are matmuls in the model's dtype (tensor cores, fp32 accumulation), the group sums
  through a one-hot merge matrix instead of a float `scatter_add_` (whose CUDA atomics make results vary run to run);
- choices are stable sorts; every scatter writes unique positions; no host syncs and no loops over batch or tokens;
- unmerging is one gather, plus one `lerp` with a per-token weight (1 for tokens computed on their own, which
  `lerp` returns bit-exactly) when a cache is blended in.

Tokens beyond the last full window row/column belong to no window ("loose" tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class WindowGrid:
    """The non-overlapping ``sy x sx`` windows of an ``(h, w)`` token grid, and index tables built once per device.

    Attributes:
        window_tokens: (W, K) token index of each window's K tokens, row-major inside the window.
        others: (K, K-1) for each in-window position, the other positions.
        loose_tokens: (L,) tokens outside every full window.
    """

    grid: tuple[int, int]
    sx: int
    sy: int
    window_tokens: torch.Tensor
    others: torch.Tensor
    loose_tokens: torch.Tensor

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
        k = sx * sy
        others = torch.stack([torch.cat([torch.arange(p), torch.arange(p + 1, k)]) for p in range(k)])
        loose = (~in_window).nonzero().flatten()
        return cls(grid, sx, sy, window_tokens.to(device), others.to(device), loose.to(device))

    @property
    def num_windows(self) -> int:
        return self.window_tokens.shape[0]

    @property
    def window_size(self) -> int:
        return self.sx * self.sy

    def window_view(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, *F) -> (B, gh, sy, gw, sx, *F): a view (no copy) of the tokens covered by full windows."""
        h, w = self.grid
        gh, gw = h // self.sy, w // self.sx
        grid = x.unflatten(1, (h, w))[:, : gh * self.sy, : gw * self.sx]
        return grid.unflatten(1, (gh, self.sy)).unflatten(3, (gw, self.sx))

    def per_window(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N) -> (B, W, K): each window's values, row-major inside the window (a copy; for small tensors)."""
        return self.window_view(x).transpose(2, 3).flatten(3, 4).flatten(1, 2)

    def window_reduce(self, x: torch.Tensor, mean: bool = False) -> torch.Tensor:
        """(B, N, *F) -> (B, W, *F): the sum (or mean) over each window, windows in `window_tokens` order."""
        view = self.window_view(x)
        reduced = view.mean((2, 4)) if mean else view.sum((2, 4))
        return reduced.flatten(1, 2)


def _expand(index: torch.Tensor, channels: int) -> torch.Tensor:
    return index.unsqueeze(-1).expand(*index.shape, channels)


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B, N, C), (B, M) -> (B, M, C)."""
    return x.gather(1, _expand(index, x.shape[-1]))


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
        out = _gather_rows(x, self.rows)
        if self.num_groups:
            groups = out[:, out.shape[1] - self.num_groups:]
            groups.copy_(self._group_means(x, groups))
        return out

    def unmerge(self, y: torch.Tensor, cache: torch.Tensor | None = None, cache_weight: float = 1.0) -> torch.Tensor:
        """(B, N', C) -> (B, N, C): each token gets its row's output.

        With `cache` (B, N, C), merged tokens get ``cache_weight * row + (1 - cache_weight) * cache``; tokens computed
        on their own keep their exact output.
        """
        out = _gather_rows(y, self.row_of_token)
        if cache is None or cache_weight >= 1.0:
            return out
        return torch.lerp(cache.to(out.dtype), out, self._blend_weight(cache_weight, out.dtype))

    def _blend_weight(self, cache_weight: float, dtype: torch.dtype) -> torch.Tensor:
        key = (cache_weight, dtype)
        if key not in self._blend_weights:  # shared by the attention and MLP unmerges of the block
            one = torch.ones((), dtype=dtype, device=self.merged.device)
            self._blend_weights[key] = torch.where(self.merged, cache_weight, one).to(dtype).unsqueeze(-1)
        return self._blend_weights[key]


def staleness_priority(staleness: torch.Tensor, form: str = "linear") -> torch.Tensor:
    """P_fre from the steps T since each token was computed on its own, (B, N) -> (B, N) float.

    ``"linear"``: ``T / mean(T)`` per batch element (the paper's; all-zero T gives zeros); ``"bounded"``:
    ``T / (T + 1)``, in [0, 1).
    """
    t = staleness.float()
    if form == "bounded":
        return t / (t + 1)
    return t / t.mean(1, keepdim=True).clamp_min(1e-6)


def window_medoid_scores(x: torch.Tensor, grid: WindowGrid) -> torch.Tensor:
    """(B, N, C) -> (B, W, K): each window token's cosine similarity to the sum of its window's unit vectors."""
    unit = x * inverse_norms(x).to(x.dtype).unsqueeze(-1)
    windows = grid.window_view(unit)  # (B, gh, sy, gw, sx, C)
    summed = windows.sum((2, 4), keepdim=True, dtype=torch.float32).to(x.dtype)
    return (windows * summed).sum(-1, dtype=torch.float32).transpose(2, 3).flatten(3, 4).flatten(1, 2)


def window_scores(x: torch.Tensor, grid: WindowGrid) -> torch.Tensor:
    """(B, N, C) -> (B, W) float32: mean cosine similarity over the K(K-1) ordered pairs of each window's tokens.

    ``(|sum_k v_k|^2 - K) / (K(K-1))`` on unit vectors v: O(K C) per window. The unit vectors are in the model's
    dtype, their window sums accumulate in fp32.
    """
    k = grid.window_size
    unit = x * inverse_norms(x).to(x.dtype).unsqueeze(-1)
    summed = grid.window_view(unit).sum((2, 4), dtype=torch.float32).flatten(1, 2)  # (B, W, C)
    return (summed.pow(2).sum(-1) - k) / (k * (k - 1))


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
    device = x.device
    score = window_scores(x, grid)
    if priority is not None and priority_weight:
        score = score + priority_weight * grid.window_reduce(priority, mean=True)
    order = score.sort(dim=1, descending=True, stable=True).indices  # (B, W)
    chosen, others = order[:, :num_windows], order[:, num_windows:]
    members = grid.window_tokens[chosen]  # (B, w, K)
    kept = grid.window_tokens[others].flatten(1)
    if grid.loose_tokens.numel():
        kept = torch.cat([kept, grid.loose_tokens.expand(b, -1)], dim=1)
    n_kept = kept.shape[1]
    rows = torch.cat([kept, members[..., 0]], dim=1)  # (B, N')
    row_of_token = torch.empty(b, n, dtype=torch.long, device=device)
    row_of_token.scatter_(1, kept, torch.arange(n_kept, device=device).expand(b, -1))
    group_row = (n_kept + torch.arange(num_windows, device=device)).view(1, -1, 1).expand_as(members)
    row_of_token.scatter_(1, members.flatten(1), group_row.flatten(1))
    merged = torch.zeros(b, n, dtype=torch.bool, device=device).scatter_(1, members.flatten(1), True)

    def group_means(y: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
        return _gather_rows(grid.window_reduce(y, mean=True), chosen)  # (B, w, C), fp32 accumulation

    return TokenMerge(rows, row_of_token, merged, num_windows, group_means)


def bipartite_merge(x: torch.Tensor, grid: WindowGrid, num_merged: int, destination_score: torch.Tensor | None = None,
                    priority: torch.Tensor | None = None, priority_weight: float = 0.0) -> TokenMerge:
    """IDM / ToMe: one destination per window; the `num_merged` best-scoring sources merge into their best match.

    Each window's destination is the argmax of `destination_score` (B, W, K) over its positions (the first
    position when None). Sources are the other window tokens and the loose tokens; a source's score is its best
    cosine similarity to any destination (P_ina) plus ``priority_weight * priority`` (P_fre). Destinations become
    the group rows (a destination that receives no source keeps its own value).

    Args:
        x: (B, N, C).
        destination_score: (B, W, K) or None.
        priority: (B, N) or None.
    """
    b, n, channels = x.shape
    device = x.device
    num_windows = grid.num_windows
    if destination_score is None:
        dst_pos = torch.zeros(b, num_windows, dtype=torch.long, device=device)
    else:
        dst_pos = destination_score.argmax(-1)  # (B, W)
    window_tokens = grid.window_tokens.expand(b, -1, -1)
    dst = window_tokens.gather(2, dst_pos.unsqueeze(-1)).squeeze(-1)  # (B, W)
    src = window_tokens.gather(2, grid.others[dst_pos]).flatten(1)  # (B, W (K - 1))
    if grid.loose_tokens.numel():
        src = torch.cat([src, grid.loose_tokens.expand(b, -1)], dim=1)
    # cosines of unit vectors (<= 1: no fp16 overflow), as a matmul in the model dtype (fp32 accumulation)
    inv_norms = inverse_norms(x).to(x.dtype).unsqueeze(-1)  # (B, N, 1)
    dst_unit = _gather_rows(x, dst) * inv_norms.gather(1, dst.unsqueeze(-1))
    src_unit = _gather_rows(x, src) * inv_norms.gather(1, src.unsqueeze(-1))
    similarity = src_unit @ dst_unit.transpose(1, 2)  # (B, Ns, W)
    best, best_dst = similarity.max(-1)
    score = best.float()
    if priority is not None and priority_weight:
        score = score + priority_weight * priority.gather(1, src)
    order = score.sort(dim=1, descending=True, stable=True).indices
    chosen, unchosen = order[:, :num_merged], order[:, num_merged:]
    chosen_src = src.gather(1, chosen)  # (B, r)
    chosen_dst = best_dst.gather(1, chosen)  # (B, r) window index of each merged source
    kept = src.gather(1, unchosen)
    n_kept = kept.shape[1]
    rows = torch.cat([kept, dst], dim=1)  # (B, N')
    row_of_token = torch.empty(b, n, dtype=torch.long, device=device)
    row_of_token.scatter_(1, kept, torch.arange(n_kept, device=device).expand(b, -1))
    row_of_token.scatter_(1, dst, (n_kept + torch.arange(num_windows, device=device)).expand(b, -1))
    row_of_token.scatter_(1, chosen_src, n_kept + chosen_dst)
    merged = torch.zeros(b, n, dtype=torch.bool, device=device).scatter_(1, chosen_src, True)
    merged.scatter_(1, dst.gather(1, chosen_dst), True)
    # merge matrix: each group's mean as a (W x r) @ (r x C) matmul, deterministic (no float atomics); the 1 / size
    # weights are inside it, so no group sum is ever formed (fp16 overflows at 65504)
    assign = torch.zeros(b, num_windows, num_merged, dtype=torch.float32, device=device)
    assign.scatter_(1, chosen_dst.unsqueeze(1), 1.0)
    inv_size = (assign.sum(-1, keepdim=True) + 1).reciprocal()  # (B, W, 1)
    weights, inv_size = (assign * inv_size).to(x.dtype), inv_size.to(x.dtype)

    def group_means(y: torch.Tensor, destinations: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(destinations * inv_size, weights, _gather_rows(y, chosen_src))

    return TokenMerge(rows, row_of_token, merged, num_windows, group_means)
