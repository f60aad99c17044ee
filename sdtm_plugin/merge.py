"""Merge primitives shared by SDTM (SSM, IDM) and ToMe, built for few kernels, little memory traffic and
bit-reproducibility.

A `TokenMerge` is the merge of one block at one step. Its plan is one permutation of the (B, N, C) tokens: the
*head* holds the tokens that are merged into groups, the *tail* the tokens kept as they are. `merge` gathers the
tokens in plan order (one row gather), reduces the head to one mean per group and puts the tail after it, giving
(B, N', C) rows ``[groups..., kept tokens...]``; `unmerge` copies every row back to its tokens (one row gather),
blending merged tokens with a cache when asked (one `lerp`). `window_merge` (SSM) and `bipartite_merge` (IDM, ToMe)
build it; `choose_destinations` picks the latter's destinations and ranking bias, for several blocks at once.

Why it is cheap and deterministic on a GPU:
- SSM scores windows with one pooling matmul per band of token rows (no unit-vector copy of the tokens), and its
  head is whole windows, so a group mean is a mean over K consecutive rows;
- similarities are matmuls in the model's dtype (tensor cores, fp32 accumulation); IDM's plan is made
  group-contiguous (its head sorted by group), so a group mean is a segment mean over consecutive rows (O(N C), no
  (W x H) merge matrix, no float `scatter_add_` whose CUDA atomics would make results vary run to run);
- choices are stable sorts; every scatter writes unique positions; no host syncs, no loops over batch or tokens;
- index tables that depend only on the grid, the batch and the merged counts are built once and cached.

Windows and their index tables: `sdtm_plugin.grid`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .grid import WindowGrid, cached_tables


@dataclass(frozen=True)
class Destinations:
    """Each window's destination for `bipartite_merge`, with the bias that ranks its tokens.

    Leading dimensions (...) hold several blocks' choices (SDTM chooses for every block of a grid once per forward);
    index them to get one block's.

    Attributes:
        rows: (..., B·W) long, the row of the flattened (B·N, C) tokens of each window's destination.
        source_bias: (..., B, N) float32, added to each token's best similarity before ranking: the weighted prior
            P_fre for sources; for destinations, keys above any score that rank them first, in window order.
    """

    rows: torch.Tensor
    source_bias: torch.Tensor

    def __getitem__(self, index) -> "Destinations":
        return Destinations(self.rows[index], self.source_bias[index])


@dataclass(frozen=True)
class _Layout:
    """Index tables of a merge's output layout, shared by every merge with the same counts.

    Attributes:
        row_offsets: (B, 1) first output row of each batch element in the flattened (B·N', C) output.
        tail_rows: (B, N - H) output rows of the kept tokens.
        kept_flags: (B, N' - G) zeros in the model dtype: kept rows are no group.
        position_rows: (B·N,) output row of every plan position when each group is a run of `group_size` head
            positions (SSM), else None.
        row_flags: (B·N',) 1 for group rows, 0 for kept rows, when every group has `group_size` > 1 members (SSM).
    """

    row_offsets: torch.Tensor
    tail_rows: torch.Tensor
    kept_flags: torch.Tensor
    position_rows: torch.Tensor | None
    row_flags: torch.Tensor | None


@cached_tables(maxsize=64)
def _layout(batch: int, num_tokens: int, head: int, num_groups: int, group_size: int | None, dtype: torch.dtype,
            device: torch.device) -> _Layout:
    rows = num_tokens - head + num_groups
    row_offsets = torch.arange(0, batch * rows, rows, device=device).unsqueeze(1)
    tail_rows = torch.arange(num_groups, rows, device=device) + row_offsets
    kept_flags = torch.zeros(batch, rows - num_groups, dtype=dtype, device=device)
    position_rows = row_flags = None
    if group_size is not None:
        head_rows = torch.arange(head, device=device).div(group_size, rounding_mode="floor") + row_offsets
        position_rows = torch.cat([head_rows, tail_rows], dim=1).flatten()
        group_flags = torch.ones(batch, num_groups, dtype=dtype, device=device)
        row_flags = torch.cat([group_flags, kept_flags], dim=1).flatten()
    return _Layout(row_offsets, tail_rows, kept_flags, position_rows, row_flags)


def _take_rows(x: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """(B, N, C), (B·M,) rows of the flattened (B·N, C) tokens -> (B, M, C).

    An `index_select` of whole rows: `gather` with the index expanded over C copies element by element (~6x slower
    on CPU for (2, 1024, 384)), and so does indexing with a (B, M) index (~2x).
    """
    b, n, c = x.shape
    return x.reshape(b * n, c).index_select(0, flat).view(b, -1, c)


def unit_vectors(x: torch.Tensor) -> torch.Tensor:
    """(B, N, C) -> (B, N, C) ``x / ||x||`` in x's dtype (the norm accumulated in fp32); zero vectors stay zero.

    The merged tensors are sub-layer inputs, layer-normalised, so their norms fit any float dtype.
    """
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return x / norm.clamp_min_(torch.finfo(x.dtype).tiny)


def _mul32(x: torch.Tensor, factor: int) -> torch.Tensor:
    """``x * factor mod 2**32`` for int64 `x` in [0, 2**32), in 16-bit halves of `factor` so no product overflows."""
    low = x * (factor & 0xFFFF)
    high = (x * (factor >> 16) & 0xFFFF) << 16
    return (low + high) & 0xFFFFFFFF


def hash32(index: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2**32) -> well-mixed 32-bit hashes (the "lowbias32" integer hash: xor-shifts and odd
    multipliers, each output bit depending on every input bit), the same on every device and under compile."""
    x = index & 0xFFFFFFFF
    x = _mul32(x ^ (x >> 16), 0x7FEB352D)
    x = _mul32(x ^ (x >> 15), 0x846CA68B)
    return x ^ (x >> 16)


@cached_tables(maxsize=16)
def _sketch_signs(channels: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(C,) fixed pseudo-random +-1 per channel, the top bit of a hash of its index (`hash32`): no generator, the same
    on every device and under `torch.compile`; built once per width, device and dtype in eager mode."""
    index = torch.arange(channels, device=device, dtype=torch.int64)
    return 1 - 2 * (hash32(index) >> 31).to(dtype)


def channel_sketch(x: torch.Tensor, dim: int) -> torch.Tensor:
    """(B, N, C) -> (B, N, dim): a signed count sketch of the channels, channel i adding ``s_i x_i`` to sketch
    channel ``i % dim`` with a fixed sign ``s_i``. Inner products are kept in expectation (the cross terms cancel over
    the signs) with an error of order ``|x| |y| / sqrt(dim)``, small for the near-parallel tokens a merge pairs; it
    costs one multiply-add per element (O(N C), no matmul), so a similarity over sketches costs dim / C of one over
    the tokens. C not a multiple of `dim` is zero-padded."""
    c = x.shape[-1]
    if dim >= c:
        return x
    signed = x * _sketch_signs(c, x.device, x.dtype)
    if c % dim:
        signed = torch.nn.functional.pad(signed, (0, dim - c % dim))
    return signed.unflatten(-1, (-1, dim)).sum(-2)


class TokenMerge:
    """The merge of one block's tokens: (B, N, C) -> (B, N', C) and back.

    Args:
        order: (B, N) long, the rows of the flattened (B·N, C) input in plan order: per batch element, `head` tokens
            that form the groups, then the kept tokens.
        head: H.
        num_groups: G; N' = G + N - H.
        reduce_head: ``(B, H, C) -> (B, G, C)``, each group's mean from the head tokens in plan order.
        row_of_token: (B·N,) long, the row of the flattened (B·N', C) output that each token of the flattened input
            reads.
        row_flags: ``() -> (B·N',)``, 1 for the rows of groups of more than one token, 0 for the others (a group of
            one and a kept token are computed on their own), in `dtype`; called when first needed.
        dtype: the model dtype of the merged tokens.
        group_starts: ``() -> (B, G)`` long, the head position of each group's first token (a bipartite group's
            destination, a window's first token); called when first needed.
    """

    def __init__(self, order: torch.Tensor, head: int, num_groups: int,
                 reduce_head: Callable[[torch.Tensor], torch.Tensor], row_of_token: torch.Tensor,
                 row_flags: Callable[[], torch.Tensor], dtype: torch.dtype,
                 group_starts: Callable[[], torch.Tensor]) -> None:
        self.batch_size, self.num_tokens = order.shape
        self.dtype = dtype
        self.head, self.num_groups = head, num_groups
        self._order = order.view(-1)
        self._reduce_head = reduce_head
        self._row_of_token = row_of_token
        self._row_flags = row_flags
        self._group_starts = group_starts
        self._flags: dict[torch.dtype, torch.Tensor] = {}
        self._key_bias: dict[torch.dtype, torch.Tensor] = {}
        self._blend_weights: dict[tuple[float, torch.dtype], torch.Tensor] = {}

    @property
    def device(self) -> torch.device:
        return self._order.device

    @property
    def num_rows(self) -> int:
        return self.num_groups + self.num_tokens - self.head

    @property
    def row_of_token(self) -> torch.Tensor:
        """(B, N) the row of the (B, N', C) output each token reads (for inspection; the hot path keeps flat rows)."""
        offsets = torch.arange(0, self.batch_size * self.num_rows, self.num_rows, device=self._order.device)
        return self._row_of_token.view(self.batch_size, -1) - offsets.unsqueeze(1)

    def merged_flags(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(B, N) 1 for the tokens that share their row with others, else 0, in `dtype` (default: the model's; built
        once per dtype)."""
        dtype = dtype or self.dtype
        if dtype not in self._flags:
            flags = self._flags.get(self.dtype)
            if flags is None:
                flags = self._flags[self.dtype] = self._row_flags().take(self._row_of_token).view(self.batch_size, -1)
            self._flags[dtype] = flags.to(dtype)
        return self._flags[dtype]

    @property
    def merged(self) -> torch.Tensor:
        """(B, N) bool: the tokens that share their row with others."""
        return self.merged_flags() > 0

    def key_bias(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(B, N') the log of each row's group size, in `dtype` (default: the model's): added to the attention logits
        of a merged key, a row stands for all of its tokens (proportional attention; 0 for a token on its own). Its
        exponentials sum to N per batch element."""
        dtype = dtype or self.dtype
        if dtype not in self._key_bias:
            rows = self.batch_size * self.num_rows
            ones = torch.ones_like(self._row_of_token, dtype=torch.float32)
            sizes = torch.zeros(rows, device=self.device, dtype=torch.float32).index_add_(0, self._row_of_token, ones)
            self._key_bias[dtype] = sizes.log_().view(self.batch_size, self.num_rows).to(dtype)
        return self._key_bias[dtype]

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, N', C): each group's mean (fp32 accumulation), then the kept tokens unchanged."""
        if x.shape[:2] != (self.batch_size, self.num_tokens):
            raise ValueError(f"merge expected {self.num_tokens} tokens in a batch of {self.batch_size}, got shape "
                             f"{tuple(x.shape)}")
        ordered = _take_rows(x, self._order)
        return torch.cat([self._reduce_head(ordered[:, : self.head]), ordered[:, self.head:]], dim=1)

    def pick(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, N', C) like `merge`, but each group takes its first token's values instead of the mean
        (positions: a merged token placed at its destination)."""
        if x.shape[:2] != (self.batch_size, self.num_tokens):
            raise ValueError(f"pick expected {self.num_tokens} tokens in a batch of {self.batch_size}, got shape "
                             f"{tuple(x.shape)}")
        ordered = _take_rows(x, self._order)
        starts = self._group_starts().unsqueeze(-1).expand(-1, -1, x.shape[-1])
        return torch.cat([ordered[:, : self.head].gather(1, starts), ordered[:, self.head:]], dim=1)

    def unmerge(self, y: torch.Tensor, cache: torch.Tensor | None = None, cache_weight: float = 1.0) -> torch.Tensor:
        """(B, N', C) -> (B, N, C): each token gets its row's output.

        With `cache` (B, N, C), merged tokens get ``cache_weight * row + (1 - cache_weight) * cache``; tokens computed
        on their own keep their exact output (`lerp` with weight 0 returns its start bit-exactly).
        """
        if y.shape[:2] != (self.batch_size, self.num_rows):
            raise ValueError(f"unmerge expected {self.num_rows} rows in a batch of {self.batch_size}, got shape "
                             f"{tuple(y.shape)}")
        out = _take_rows(y, self._row_of_token)
        if cache is None or cache_weight >= 1.0:
            return out
        return torch.lerp(out, cache.to(out.dtype), self._blend_weight(cache_weight, out.dtype))

    def _blend_weight(self, cache_weight: float, dtype: torch.dtype) -> torch.Tensor:
        key = (cache_weight, dtype)
        if key not in self._blend_weights:  # shared by the attention and MLP unmerges of the block
            self._blend_weights[key] = self.merged_flags(dtype).mul(1.0 - cache_weight).unsqueeze(-1)
        return self._blend_weights[key]


def staleness_priority(staleness: torch.Tensor, form: str = "linear") -> torch.Tensor:
    """P_fre from the steps T since each token was computed on its own, (..., B, N) -> (..., B, N) float32.

    ``"linear"``: ``T / mean(T)`` per batch element (the paper's; all-zero T gives zeros); ``"bounded"``:
    ``T / (T + 1)``, in [0, 1).
    """
    if form == "bounded":
        return staleness / (staleness + 1.0)
    return staleness / staleness.mean(-1, keepdim=True, dtype=torch.float32).clamp_min_(1e-6)


def window_medoid_scores(x: torch.Tensor, grid: WindowGrid, unit: torch.Tensor | None = None) -> torch.Tensor:
    """(B, N, C) -> (B, W, K): each window token's cosine similarity to the sum of its window's unit vectors.

    `unit`: ``unit_vectors(x)`` when the caller has them (a bipartite merge of the same tokens needs them too).
    """
    unit = unit_vectors(x) if unit is None else unit
    windows = grid.window_view(unit)  # (B, gf, st, gh, sy, gw, sx, C)
    gf, gh, gw = grid.counts
    summed = grid.window_unit_sums(x).view(x.shape[0], gf, 1, gh, 1, gw, 1, -1)
    scores = (windows * summed).sum(-1, dtype=torch.float32)  # (B, gf, st, gh, sy, gw, sx)
    return scores.permute(0, 1, 3, 5, 2, 4, 6).flatten(4).flatten(1, 3)


def _window_unit_sums(x: torch.Tensor, grid: WindowGrid) -> torch.Tensor:
    """(B, N, C) -> (B, W) float32 ``|sum_k v_k|^2`` over each window's unit vectors v."""
    return torch.linalg.vector_norm(grid.window_unit_sums(x), dim=-1, dtype=torch.float32).square_()


def window_scores(x: torch.Tensor, grid: WindowGrid) -> torch.Tensor:
    """(B, N, C) -> (B, W) float32: mean cosine similarity over the K(K-1) ordered pairs of each window's tokens.

    ``(|sum_k v_k|^2 - K) / (K(K-1))`` on unit vectors v: O(K C) per window.
    """
    k = grid.window_size
    return (_window_unit_sums(x, grid) - k) / (k * (k - 1))


def _check_input(x: torch.Tensor, grid: WindowGrid) -> None:
    if x.dim() != 3 or x.shape[1] != grid.num_tokens:
        raise ValueError(f"x must be (B, {grid.num_tokens}, C) for the {'x'.join(map(str, grid.grid))} token grid, got "
                         f"shape {tuple(x.shape)}")


def _check_count(name: str, value: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
        raise ValueError(f"{name} must be an int in [0, {high}], got {value!r}")


def _check_shape(name: str, tensor: torch.Tensor | None, tail: tuple[int, ...], meaning: str) -> None:
    if tensor is not None and tuple(tensor.shape[tensor.dim() - len(tail):]) != tail:
        raise ValueError(f"{name} must end in {tail} ({meaning}), got shape {tuple(tensor.shape)}")


def window_merge(x: torch.Tensor, grid: WindowGrid, num_windows: int, window_priority: torch.Tensor | None = None,
                 priority_weight: float = 0.0) -> TokenMerge:
    """SSM: merge the `num_windows` windows of highest ``P_sim + priority_weight * P_fre`` whole, into their mean.

    Ties go to the lower window index.

    Args:
        x: (B, N, C) the compared features (the sub-layer input).
        grid: the window grid of the N tokens.
        num_windows: windows merged (w); N' = N - w (K - 1).
        window_priority: (B, W) P_fre of each window (its tokens' mean: ``grid.window_reduce(P_fre, mean=True)``);
            None for none.
    """
    _check_input(x, grid)
    b, n, _ = x.shape
    _check_count("num_windows", num_windows, grid.num_windows)
    _check_shape("window_priority", window_priority, (b, grid.num_windows), "B, W")
    k = grid.window_size
    # ranked on |sum v|^2 = K + K(K-1) P_sim: the same order as P_sim, with the prior scaled to match
    score = _window_unit_sums(x, grid)
    if window_priority is not None and priority_weight:
        score = score.add_(window_priority, alpha=priority_weight * k * (k - 1))
    order = score.sort(dim=1, descending=True, stable=True).indices  # (B, W): the merged windows first
    tables = grid.batch_tables(b)
    # plan order: the merged windows' K tokens each (the head), the kept windows' tokens, the loose tokens
    order = tables.window_tokens.gather(1, order.unsqueeze(-1).expand(-1, -1, k)).flatten(1)
    if tables.loose_tokens.shape[1]:
        order = torch.cat([order, tables.loose_tokens], dim=1)
    head = num_windows * k
    layout = _layout(b, n, head, num_windows, k, x.dtype, x.device)
    # each token's output row: the inverse of the plan order
    row_of_token = torch.empty_like(order).view(-1).scatter_(0, order.view(-1), layout.position_rows)

    def window_means(ordered_head: torch.Tensor) -> torch.Tensor:  # (B, w·K, C) -> (B, w, C)
        return ordered_head.unflatten(1, (num_windows, k)).mean(2)

    def window_starts() -> torch.Tensor:
        return torch.arange(0, head, k, device=x.device).expand(b, -1)

    return TokenMerge(order, head, num_windows, window_means, row_of_token, lambda: layout.row_flags, x.dtype,
                      window_starts)


def choose_destinations(grid: WindowGrid, batch: int, choice: torch.Tensor | None = None,
                        priority: torch.Tensor | None = None, priority_weight: float = 0.0) -> Destinations:
    """Each window's destination: the argmax of `choice` over its K tokens (its first token when None).

    Batched over any leading dimensions (...) of `choice` and `priority`, which must agree.

    Args:
        batch: B.
        choice: (..., B, W, K) or None.
        priority: (..., B, N) float32 P_fre of the sources, weighted by `priority_weight`; None for none.
    """
    _check_shape("choice", choice, (batch, grid.num_windows, grid.window_size), "B, W, K")
    _check_shape("priority", priority, (batch, grid.num_tokens), "B, N")
    if choice is not None and priority is not None and choice.shape[:-3] != priority.shape[:-2]:
        raise ValueError(f"choice {tuple(choice.shape)} and priority {tuple(priority.shape)} must have the same leading "
                         f"dimensions")
    tables = grid.batch_tables(batch)
    if choice is not None:
        rows = tables.window_tokens.expand(choice.shape).gather(-1, choice.argmax(-1, keepdim=True)).flatten(-3)
    else:
        lead = priority.shape[:-2] if priority is not None else ()
        rows = tables.first_tokens.expand(*lead, -1)
    if priority is not None and priority_weight:
        bias = priority.mul(priority_weight)
    else:
        bias = torch.zeros(*rows.shape[:-1], batch, grid.num_tokens, device=rows.device)
    # destinations are no sources: keys above any score, decreasing with the window, rank them first
    flat_rows = rows.reshape(-1, rows.shape[-1])
    bias.view(-1, batch * grid.num_tokens).scatter_(1, flat_rows, tables.destination_keys.expand(flat_rows.shape))
    return Destinations(rows, bias)


@cached_tables(maxsize=8)
def first_token_destinations(grid: WindowGrid, batch: int) -> Destinations:
    """Each window's first token as its destination, no prior (`choose_destinations` without a choice)."""
    return choose_destinations(grid, batch)


def _local_best(unit: torch.Tensor, grid: WindowGrid, destination_unit: torch.Tensor,
                radius: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N) each token's best cosine to the destinations of the windows within `radius` windows of its own, and
    that window: O(N J C) for J = (2 radius + 1)^2 candidates, against O(N W C) for all W destinations.

    Args:
        unit: (B, N, C) unit vectors; destination_unit: (B, W, C) those of each window's destination.
    """
    b, n, c = unit.shape
    windows, loose = grid.neighbour_windows(radius)
    tables = grid.batch_tables(b)
    w, k = grid.num_windows, grid.window_size
    tokens = _take_rows(unit, tables.window_tokens.flatten()).view(b, w, k, c)
    sims = torch.matmul(tokens, destination_unit[:, windows].transpose(-1, -2))  # (B, W, K, J)
    best_in_window, pick = sims.max(-1)
    best = torch.empty(b * n, dtype=sims.dtype, device=unit.device)
    best_window = torch.empty(b * n, dtype=torch.long, device=unit.device)
    best.scatter_(0, tables.window_tokens.flatten(), best_in_window.flatten())
    best_window.scatter_(0, tables.window_tokens.flatten(), windows.expand(b, w, -1).gather(2, pick).flatten())
    if len(loose):  # tokens outside every full window: their nearest window's candidates
        loose_unit = _take_rows(unit, tables.loose_tokens.flatten())  # (B, L, C)
        loose_sims = (loose_unit.unsqueeze(2) * destination_unit[:, loose]).sum(-1, dtype=sims.dtype)  # (B, L, J)
        loose_best, loose_pick = loose_sims.max(-1)
        best.scatter_(0, tables.loose_tokens.flatten(), loose_best.flatten())
        best_window.scatter_(0, tables.loose_tokens.flatten(), loose.expand(b, -1, -1).gather(2, loose_pick[..., None])
                             .flatten())
    return best.view(b, n), best_window.view(b, n)


def bipartite_merge(x: torch.Tensor, grid: WindowGrid, num_merged: int, destinations: Destinations | None = None,
                    unit: torch.Tensor | None = None, radius: int | None = None,
                    sketch_dim: int | None = None) -> TokenMerge:
    """IDM / ToMe: one destination per window; the `num_merged` best-scoring sources merge into their best match.

    Sources are the tokens that are no destination (the other window tokens and the loose tokens); a source's score
    is its best cosine similarity to any destination (P_ina) plus its `source_bias` (the weighted P_fre); ties go
    to the lower token index. Each destination is a group (one that receives no source is a group of one, not
    merged).

    Args:
        x: (B, N, C).
        destinations: one block's `choose_destinations` (rows (B·W,), bias (B, N)); None: each window's first token,
            no prior.
        unit: ``unit_vectors(x)`` when the caller has them.
        radius: match each source only with the destinations of the windows within this many windows of its own
            (linear cost, `_local_best`); None: with every destination (the paper's and ToMe's global matching).
        sketch_dim: compare `channel_sketch`es of this many channels instead of the tokens (`unit` is then unused);
            None: the tokens themselves.
    """
    _check_input(x, grid)
    b, n, _ = x.shape
    num_windows = grid.num_windows
    tables = grid.batch_tables(b)
    _check_count("num_merged", num_merged, n - num_windows)
    if destinations is None:
        destinations = first_token_destinations(grid, b)
    if destinations.rows.shape != (b * num_windows,) or destinations.source_bias.shape != (b, n):
        raise ValueError(f"destinations must be one block's (rows ({b * num_windows},), source_bias ({b}, {n})), got "
                         f"{tuple(destinations.rows.shape)} and {tuple(destinations.source_bias.shape)}")
    dst = destinations.rows
    # cosines of unit vectors (<= 1: no fp16 overflow) of every token to every destination, one matmul in the model
    # dtype (fp32 accumulation); scoring all N tokens instead of gathering the N - W sources costs W more rows
    if sketch_dim is not None:
        unit = unit_vectors(channel_sketch(x, sketch_dim))
    elif unit is None:
        unit = unit_vectors(x)
    if radius is None:
        best, best_window = torch.bmm(unit, _take_rows(unit, dst).transpose(1, 2)).max(-1)  # (B, N)
    else:
        best, best_window = _local_best(unit, grid, _take_rows(unit, dst), radius)
    # plan order: the destinations and the merged sources (the head), then the kept sources
    ordered = torch.add(best, destinations.source_bias).sort(dim=1, descending=True, stable=True).indices
    head = num_windows + num_merged
    layout = _layout(b, n, head, num_windows, None, x.dtype, x.device)
    # each token's output row: its window's group for the destinations and merged sources, its own for the kept
    window_of_token = best_window.view(-1).scatter_(0, dst, tables.window_ids).view(b, n)
    # the head made group-contiguous: sorted by window, stably (each group's destination first, then its sources in
    # score order), so a group's mean is a mean over consecutive rows: O(H C), no (W x H) merge matrix
    by_window = window_of_token.gather(1, ordered[:, :head]).sort(dim=1, stable=True)
    ordered = torch.cat([ordered[:, :head].gather(1, by_window.indices), ordered[:, head:]], dim=1)
    sizes = torch.zeros(b, num_windows, dtype=torch.long, device=x.device).scatter_add_(
        1, by_window.values, torch.ones_like(by_window.values))  # (B, W) >= 1: the destination
    row_of_token = window_of_token.add_(layout.row_offsets)
    row_of_token.scatter_(1, ordered[:, head:], layout.tail_rows)

    def group_means(ordered_head: torch.Tensor) -> torch.Tensor:  # (B', H, C) -> (B', W, C), B' = B or (expand) more
        # a segment mean per group, deterministic (no float atomics), accumulated in fp32 (an fp16 sum of a large
        # group could overflow at 65504)
        images = ordered_head.shape[0]
        rows = ordered_head.reshape(-1, ordered_head.shape[-1]).float()
        lengths = sizes.view(-1) if images == b else sizes.expand(images, -1).reshape(-1)
        # unsafe: skip the length checks, whose .item() would make the host wait for the device at every merge
        # (the sizes are valid by construction: each >= 1, summing to H)
        means = torch.segment_reduce(rows, "mean", lengths=lengths, axis=0, unsafe=True)
        return means.view(images, num_windows, -1).to(ordered_head.dtype)

    def row_flags() -> torch.Tensor:
        return torch.cat([(sizes > 1).to(x.dtype), layout.kept_flags], dim=1).view(-1)

    def group_starts() -> torch.Tensor:  # each group's destination: the first of its run
        return sizes.cumsum(1).sub_(sizes)

    return TokenMerge(ordered + tables.offsets, head, num_windows, group_means, row_of_token.view(-1), row_flags,
                      x.dtype, group_starts)
