"""Token caching's primitives: the rows a cached step computes, and the scores that choose them; and the guidance
scores IBTM chooses SDTM's destinations by (`guidance_energy`, `guidance_scores`).

A `RowSelection` is the token-caching counterpart of a `TokenMerge`: ``(B, N, C) -> (B, A, C)`` keeps the A rows a
block computes (one row gather), and ``(B, A, C) -> (B, N, C)`` writes their outputs into the block's full-length
cached output (one row scatter into a copy), so every other token keeps its own cached value: no token takes
another's output. Rows are chosen per image (`choose_rows`), sorted in token order, with unique positions: no float
atomics, no host sync, one static length A per token grid.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .merge import _take_rows, channel_sketch


class RowSelection:
    """The A of N tokens per image that a block computes on a cached step.

    Args:
        rows: (B, A) long, each image's computed tokens, ascending.
        num_tokens: N.

    Attributes:
        flat_rows: (B·A,) the computed tokens' rows of the flattened (B·N, C) tokens.
        age: (B, N, 1) steps since each token was last computed (0 for the computed ones), set by the method.
        gap: (B·A, 1) steps between the computed tokens' previous computation and this one, set by the method.
    """

    def __init__(self, rows: torch.Tensor, num_tokens: int) -> None:
        self.batch_size, self.num_rows = rows.shape
        self.num_tokens = num_tokens
        self.rows = rows
        offsets = torch.arange(0, self.batch_size * num_tokens, num_tokens, device=rows.device).unsqueeze(1)
        self.flat_rows = (rows + offsets).view(-1)
        self.age: torch.Tensor | None = None
        self.gap: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.rows.device

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, A, C): the computed tokens' rows."""
        if x.shape[:2] != (self.batch_size, self.num_tokens):
            raise ValueError(f"expected {self.num_tokens} tokens in a batch of {self.batch_size}, got shape "
                             f"{tuple(x.shape)}")
        return _take_rows(x, self.flat_rows)

    def unmerge(self, y: torch.Tensor, cache: torch.Tensor | None = None, cache_weight: float = 1.0) -> torch.Tensor:
        """(B, A, C) outputs of the computed rows -> (B, N, C): `cache` (B, N, C) with those rows replaced (a new
        tensor: the cache passed in is not modified). `cache_weight` is unused (every other token keeps its own
        cached value whole)."""
        if y.shape[:2] != (self.batch_size, self.num_rows):
            raise ValueError(f"expected {self.num_rows} rows in a batch of {self.batch_size}, got shape "
                             f"{tuple(y.shape)}")
        if cache is None:
            raise RuntimeError("a token-cached sub-layer has no cached output to complete its rows; the block must run "
                               "dense first")
        b, n, c = cache.shape
        return cache.to(y.dtype).reshape(b * n, c).index_copy(0, self.flat_rows, y.reshape(-1, c)).view(b, n, c)

    def merged_flags(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(B, N) 1 for the tokens served from the cache, 0 for the computed ones."""
        flags = torch.ones(self.batch_size * self.num_tokens, dtype=dtype or torch.float32, device=self.device)
        return flags.index_fill_(0, self.flat_rows, 0).view(self.batch_size, self.num_tokens)

    def take(self, table: torch.Tensor) -> torch.Tensor:
        """(N, *F) values per token (a rotary table) -> (B, A, *F): each image's computed tokens' values."""
        return table[self.rows]


def change_scores(sketch: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """(B, N) float32 relative change ``|s - r| / |r|`` of each token's sketch `sketch` since `reference` (B, N, D),
    its sketch when it was last computed."""
    diff = torch.linalg.vector_norm(sketch - reference, dim=-1, dtype=torch.float32)
    base = torch.linalg.vector_norm(reference, dim=-1, dtype=torch.float32)
    return diff / base.clamp_min_(torch.finfo(torch.float32).tiny)


def token_sketch(x: torch.Tensor, dim: int | None) -> torch.Tensor:
    """(B, N, C) -> (B, N, D) what a token's change is measured on: a `dim`-channel count sketch (None: x itself)."""
    return x if dim is None else channel_sketch(x, dim)


def choose_rows(score: torch.Tensor, num_rows: int) -> torch.Tensor:
    """(B, N) scores -> (B, num_rows) long: each image's highest-scoring tokens, in ascending token order."""
    top = score.topk(num_rows, dim=1, sorted=False).indices
    return top.sort(dim=1).values


def guidance_energy(output: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
    """A classifier-free-guidance batch's denoiser output -> (B, 1, *S) float32 ``|eps_c - eps_u|^2`` summed over
    channels, where the batch's two halves are the unconditional and conditional inputs (either order).

    `output`: (2B, C, *S) a spatial output (S: the latent's (H, W) or (F, H, W)), or (2B, N, C) a token sequence on
    `grid` (FLUX, Qwen-Image), laid out row-major as the grid.
    """
    if output.shape[0] % 2:
        raise ValueError(f"idm_destination='guidance' needs the unconditional and conditional inputs in one batch "
                         f"(an even batch), got a batch of {output.shape[0]}")
    unconditional, conditional = output.detach().float().chunk(2)
    energy = (conditional - unconditional).square_()
    if energy.dim() == 3 and energy.shape[1] == math.prod(grid):  # tokens: (B, N, C)
        return energy.sum(-1).view(-1, 1, *grid)
    if energy.dim() - 2 != len(grid):
        raise ValueError(f"a denoiser output of shape {tuple(output.shape)} does not lie on the "
                         f"{'x'.join(map(str, grid))} token grid")
    return energy.sum(1, keepdim=True)


def guidance_scores(energy: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
    """(B, 1, *S) `guidance_energy` -> (B, N) float32 its mean over each token's patch of `grid` (S a multiple of
    the grid, or the grid of a U-Net level below it)."""
    pool = F.adaptive_avg_pool3d if len(grid) == 3 else F.adaptive_avg_pool2d
    return pool(energy, grid).flatten(1)
