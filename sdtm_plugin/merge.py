"""Merge primitives shared by SDTM (SSM, IDM) and ToMe.

A merge is described by one integer map, ``target[b, n]``: the token that token ``n`` is averaged into (itself if it
stays). `MergePlan` turns it into a gather/scatter plan; `window_merge_plan` (SSM) and `bipartite_merge_plan`
(IDM, ToMe) build it. All ops are batched over (B, N); no loops over batch or tokens, no host syncs.

Tokens are laid out row-major on an ``(h, w)`` grid, as diffusers' patch embeddings produce them. Windows are
``sy`` rows by ``sx`` columns; tokens beyond the last full window row/column belong to no window.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class WindowLayout:
    """Index tables of the non-overlapping windows of one grid, built once per (grid, window, device).

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
    def build(cls, grid: tuple[int, int], sx: int, sy: int, device: torch.device) -> "WindowLayout":
        h, w = grid
        if h < sy or w < sx:
            raise ValueError(f"token grid {h}x{w} is smaller than one {sy}x{sx} (sy x sx) window; use smaller sx/sy")
        # built on the CPU once per grid (boolean indexing has no meta-device kernel), then moved
        gh, gw = h // sy, w // sx
        ids = torch.arange(h * w).view(h, w)
        window_tokens = ids[: gh * sy, : gw * sx].reshape(gh, sy, gw, sx).permute(0, 2, 1, 3).reshape(gh * gw, sy * sx)
        in_window = torch.zeros(h * w, dtype=torch.bool)
        in_window[window_tokens.flatten()] = True
        k = sx * sy
        others = torch.stack([torch.cat([torch.arange(p), torch.arange(p + 1, k)]) for p in range(k)])
        loose_tokens = (~in_window).nonzero().flatten()
        return cls(grid, sx, sy, window_tokens.to(device), others.to(device), loose_tokens.to(device))

    @property
    def num_windows(self) -> int:
        return self.window_tokens.shape[0]

    def windows(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, *F) -> (B, W, K, *F), the tokens of every full window."""
        return x[:, self.window_tokens]


class MergePlan:
    """Gather/scatter plan from a token -> target map.

    Kept tokens keep their relative order; every merged group becomes the mean of its members, sitting at its
    target's position. Tokens that merge with nothing pass through bit-exactly (multiplied by 1.0).

    Args:
        target: (B, N) long, ``target[b, n]`` is the kept token that ``n`` merges into (``n`` itself if kept).
            Targets must be kept tokens.
        num_rows: N' = number of kept tokens, the same for every batch element (known on the host).
    """

    def __init__(self, target: torch.Tensor, num_rows: int) -> None:
        batch, n = target.shape
        kept = target == torch.arange(n, device=target.device)
        row = kept.cumsum(1) - 1
        self.num_tokens = n
        self.num_rows = num_rows
        self.row_of_token = row.gather(1, target)  # (B, N)
        sizes = torch.zeros(batch, num_rows, device=target.device).scatter_add_(
            1, self.row_of_token, torch.ones(batch, n, device=target.device)
        )
        self.inv_row_size = sizes.reciprocal().unsqueeze(-1)  # (B, N', 1)
        self.merged = (sizes.gather(1, self.row_of_token) > 1).unsqueeze(-1)  # (B, N, 1): shares its row

    def _index(self, channels: int) -> torch.Tensor:
        return self.row_of_token.unsqueeze(-1).expand(-1, -1, channels)

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, N', C): each row is the mean of the tokens mapped to it."""
        b, n, c = x.shape
        if n != self.num_tokens:
            raise ValueError(f"merge expected {self.num_tokens} tokens, got {n} (shape {tuple(x.shape)})")
        # sums accumulate in fp32 at least: K fp16 tokens can overflow, bf16 sums lose the low bits
        acc = torch.promote_types(x.dtype, torch.float32)
        rows = x.new_zeros(b, self.num_rows, c, dtype=acc).scatter_add_(1, self._index(c), x.to(acc))
        return (rows * self.inv_row_size).to(x.dtype)

    def unmerge(self, y: torch.Tensor, cache: torch.Tensor | None = None, cache_weight: float = 1.0) -> torch.Tensor:
        """(B, N', C) -> (B, N, C): each token gets its row's output.

        With `cache` (B, N, C), tokens that were merged get ``cache_weight * row + (1 - cache_weight) * cache``
        instead; tokens computed on their own keep their exact output.
        """
        out = y.gather(1, self._index(y.shape[-1]))
        if cache is None or cache_weight >= 1.0:
            return out
        return torch.where(self.merged, torch.lerp(cache.to(out.dtype), out, cache_weight), out)


def _normalized(x: torch.Tensor) -> torch.Tensor:
    # fp32: the window score ``|sum v|^2 - K`` cancels, and fp16/bf16 unit vectors would reorder near-tied choices
    return F.normalize(x.float(), dim=-1)


def staleness_priority(staleness: torch.Tensor) -> torch.Tensor:
    """P_fre = T / mean(T) per batch element, (B, N) -> (B, N) float; all-zero T gives zeros."""
    t = staleness.float()
    return t / t.mean(1, keepdim=True).clamp_min(1e-6)


def window_merge_plan(
    metric: torch.Tensor,
    layout: WindowLayout,
    num_windows: int,
    priority: torch.Tensor | None = None,
    priority_weight: float = 0.0,
) -> MergePlan:
    """SSM: merge the `num_windows` windows with the highest ``P_sim + priority_weight * P_fre`` whole.

    P_sim is the mean cosine similarity over the K(K-1) ordered pairs of distinct tokens in the window, computed as
    ``(|sum_k v_k|^2 - K) / (K(K-1))`` on unit vectors (O(K C), not O(K^2 C)). P_fre is the window mean of
    `priority`. The merged token sits at the window's first position (its position changes no value: attention
    and the MLP are permutation-equivariant).

    Args:
        metric: (B, N, C) features compared (the sub-layer input).
        priority: (B, N) per-token P_fre, or None.
    """
    k = layout.sx * layout.sy
    windows = layout.windows(_normalized(metric))  # (B, W, K, C)
    summed = windows.sum(2).float()
    score = (summed.pow(2).sum(-1) - k) / (k * (k - 1))  # (B, W)
    if priority is not None and priority_weight:
        score = score + priority_weight * layout.windows(priority).mean(-1)
    chosen = score.topk(num_windows, dim=1).indices  # (B, w)
    members = layout.window_tokens[chosen]  # (B, w, K)
    target = torch.arange(metric.shape[1], device=metric.device).repeat(metric.shape[0], 1)
    target.scatter_(1, members.flatten(1), members[..., :1].expand_as(members).flatten(1))
    return MergePlan(target, metric.shape[1] - num_windows * (k - 1))


def bipartite_merge_plan(
    metric: torch.Tensor,
    layout: WindowLayout,
    num_merged: int,
    destination_score: torch.Tensor | None = None,
    priority: torch.Tensor | None = None,
    priority_weight: float = 0.0,
) -> MergePlan:
    """IDM / ToMe: one destination per window, the `num_merged` best-scoring sources merge into their best match.

    Each window's destination is the argmax of `destination_score` (B, W, K) over its positions (first position
    when None). Sources are the other window tokens and the loose tokens; a source's score is its best cosine
    similarity to any destination (P_ina) plus ``priority_weight * priority`` (P_fre). A destination that receives
    no source stays unmerged.

    Args:
        metric: (B, N, C).
        destination_score: (B, W, K) or None.
        priority: (B, N) or None.
    """
    batch, n, _ = metric.shape
    x = _normalized(metric)
    if destination_score is None:
        dst_pos = torch.zeros(batch, layout.num_windows, dtype=torch.long, device=metric.device)
    else:
        dst_pos = destination_score.argmax(-1)  # (B, W)
    window_tokens = layout.window_tokens.expand(batch, -1, -1)
    dst = window_tokens.gather(2, dst_pos.unsqueeze(-1)).squeeze(-1)  # (B, W)
    src = window_tokens.gather(2, layout.others[dst_pos]).flatten(1)  # (B, W*(K-1))
    if layout.loose_tokens.numel():
        src = torch.cat([src, layout.loose_tokens.expand(batch, -1)], dim=1)
    channels = x.shape[-1]
    similarity = x.gather(1, src.unsqueeze(-1).expand(-1, -1, channels)) @ x.gather(
        1, dst.unsqueeze(-1).expand(-1, -1, channels)
    ).transpose(1, 2)  # (B, Ns, W)
    best, best_dst = similarity.max(-1)
    if priority is not None and priority_weight:
        best = best + priority_weight * priority.gather(1, src)
    chosen = best.topk(num_merged, dim=1).indices  # (B, r)
    target = torch.arange(n, device=metric.device).repeat(batch, 1)
    target.scatter_(1, src.gather(1, chosen), dst.gather(1, best_dst.gather(1, chosen)))
    return MergePlan(target, n - num_merged)
