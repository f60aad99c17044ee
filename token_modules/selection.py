"""Scored top-k patch selection and learned token aggregation, shared by SDTPS (seeds/000) and SEPS (seeds/003).

`TokenSparse` fuses score sources into one score per patch, keeps the top ``ceil(N * sparse_ratio)`` patches and
summarises the discarded ones in an extra token. `TokenAggregation` merges the N_s kept patches into N_c tokens with
learned, row-softmax weights. Both are batched; nothing loops over batch or tokens.

Fixes of the reference code (research/token_modules.md §0, §2.4, §3.3):
- no ``no_grad`` anywhere: patches get gradient through the kept tokens, the extra token and the aggregation;
- the optional Gumbel straight-through mask is *used*: kept and discarded patches are multiplied by gates that equal
  1 in the forward pass and carry the relaxed mask's gradient, so the score predictor learns through the selection
  itself; the relaxation is a sigmoid around the top-k threshold (slope <= 1/(4 tau)), never a ``* 1e10`` mask;
- no ratio loss: with a fixed keep count it would be a constant.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor

SCORINGS = ("paper", "sum")


def minmax_normalize(x: Tensor, eps: float = 1e-8) -> Tensor:
    """Per-row min-max normalisation to [0, 1] over the last dim, (..., N) -> (..., N); constant rows give 0."""
    lo = x.amin(-1, keepdim=True)
    hi = x.amax(-1, keepdim=True)
    return (x - lo) / (hi - lo + eps)


def fuse_scores(
    predicted: Tensor,
    self_score: Tensor,
    guide_scores: Tensor | None,
    beta: float,
    guide_mask: Tensor | None = None,
) -> Tensor:
    """s = (1 - 2 beta) s^p + 2 beta s^self + 2 beta mean_g s^guide_g, all inputs already normalised.

    predicted, self_score: (B, N); guide_scores: (B, G, N) or None -> (B, N). With G = 2 this is the seeds' formula
    ``(1-2b) s^p + b (s^cross1 + s^cross2 + 2 s^im)`` (SEPS: ``s^st + s^dt``); averaging the guides keeps the same
    weights for any number of them (SDTPS with M modalities has M - 1 guides).

    guide_mask: (B, G) bool, False = that guide is unavailable for that sample (e.g. a missing modality). The mean then
    runs over the available guides only (masked entries, even NaN, are never read); a sample with no available guide
    gives the guide weight to s^self: s = (1 - 2 beta) s^p + 4 beta s^self, so the predictor keeps its share.
    """
    score = (1.0 - 2.0 * beta) * predicted + 2.0 * beta * self_score
    if guide_scores is None or guide_scores.shape[1] == 0:
        return score
    if guide_mask is None:
        return score + 2.0 * beta * guide_scores.mean(1)
    valid = guide_mask.bool().unsqueeze(-1)  # (B, G, 1)
    count = valid.sum(1)  # (B, 1)
    guide = torch.where(valid, guide_scores, 0.0).sum(1) / count.clamp_min(1)
    return score + 2.0 * beta * torch.where(count > 0, guide, self_score)


def cosine_scores(tokens: Tensor, refs: Tensor) -> Tensor:
    """Cosine similarity of every token to every reference: tokens (B, N, C), refs (B, G, C) -> (B, G, N)."""
    return F.normalize(refs, dim=-1) @ F.normalize(tokens, dim=-1).transpose(1, 2)


def _count(x: float) -> float:
    # N * ratio in floats can land just off an integer (0.7 * 10 = 7.000000000000001); round before ceil/floor.
    return round(x, 6)


def keep_count(num_tokens: int, sparse_ratio: float) -> int:
    """Number of kept patches N_s = max(1, ceil(N * sparse_ratio)); sparse_ratio must be in (0, 1]."""
    if not 0.0 < sparse_ratio <= 1.0:
        raise ValueError(f"sparse_ratio must be in (0, 1], got {sparse_ratio}")
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    return max(1, math.ceil(_count(num_tokens * sparse_ratio)))


def aggregated_count(num_tokens: int, sparse_ratio: float, aggr_ratio: float) -> int:
    """Number of aggregated tokens N_c = floor(N * sparse_ratio * aggr_ratio) (128, 0.5, 0.4 -> 25), checked to lie
    in [1, N_s]."""
    keep_count(num_tokens, sparse_ratio)  # validates sparse_ratio
    if not 0.0 < aggr_ratio <= 1.0:
        raise ValueError(f"aggr_ratio must be in (0, 1], got {aggr_ratio}")
    n_c = math.floor(_count(num_tokens * sparse_ratio * aggr_ratio))
    if n_c < 1:
        raise ValueError(
            f"num_patches * sparse_ratio * aggr_ratio must be >= 1 (N_c >= 1), got {num_tokens} * {sparse_ratio} * "
            f"{aggr_ratio} = {num_tokens * sparse_ratio * aggr_ratio:.3g}"
        )
    return n_c  # <= N_s, as aggr_ratio <= 1


def gumbel_noise(like: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Standard Gumbel(0, 1) noise shaped like ``like``: -log(E), E ~ Exp(1)."""
    e = torch.empty_like(like).exponential_(generator=generator)
    return -e.log()


def straight_through_topk(logits: Tensor, k: int, tau: float = 1.0) -> tuple[Tensor, Tensor]:
    """Hard top-k mask with a straight-through relaxed gradient.

    logits: (B, N) -> (mask (B, N) equal to the hard 0/1 top-k mask in value, indices (B, N) sorted by descending
    logit). The gradient is that of ``sigmoid((logits - t) / tau)``, t the midpoint between the k-th and (k+1)-th
    logits (detached): a relaxed top-k whose soft mass is ~k, unlike a softmax over all N (mass 1, gradient ~1/N).
    """
    order = logits.sort(dim=-1, descending=True, stable=True).indices
    hard = torch.zeros_like(logits).scatter_(-1, order[:, :k], 1.0)
    if k == logits.shape[-1]:
        return hard, order
    top = logits.gather(-1, order[:, k - 1 : k + 1]).detach()
    soft = torch.sigmoid((logits - top.mean(-1, keepdim=True)) / tau)
    return hard + (soft - soft.detach()), order  # exactly `hard` in value


class Selection(NamedTuple):
    """Output of `TokenSparse`.

    tokens: (B, N_s, C) kept patches, in descending order of the (Gumbel-perturbed, if on) score
    extra: (B, 1, C) softmax(discarded scores)-weighted sum of the discarded patches (zeros when none is discarded)
    mask: (B, N) 1 = kept; with Gumbel it carries the straight-through gradient
    keep_idx: (B, N_s) indices of the kept patches
    score: (B, N) fused score (before any Gumbel noise)
    keep_score: (B, N_s) fused score of the kept patches
    """

    tokens: Tensor
    extra: Tensor
    mask: Tensor
    keep_idx: Tensor
    score: Tensor
    keep_score: Tensor


class TokenSparse(nn.Module):
    """Scored top-k patch selection with an extra token for the discarded patches.

    Scoring (``scoring``):
        "paper": s = fuse_scores(sigmoid(MLP(x)), mm(s^self), mm(s^guide), beta), MLP C -> C*predictor_ratio -> 1,
                 mm = per-sample min-max (SDTPS; SEPS paper Eq. 1-3);
        "sum":   s = s^self + sum_g s^guide_g, raw (the released SEPS/LAPS code; no learned predictor).
    Selection: keep the top ``ceil(N * sparse_ratio)`` scores; with ``use_gumbel`` the top-k is drawn on
    ``s / tau + Gumbel`` in training (sampling without replacement), and the straight-through mask gates the patches.

    Args:
        dim: channel size C.
        sparse_ratio: kept fraction, in (0, 1].
        beta: fusion weight, in [0, 0.5] ("paper" scoring).
        scoring: "paper" or "sum".
        predictor_ratio: hidden width of the score MLP as a fraction of C.
        use_gumbel: Gumbel top-k with straight-through gradients.
        gumbel_tau: temperature > 0 of the Gumbel top-k and of its relaxation.
    """

    def __init__(
        self,
        dim: int,
        sparse_ratio: float = 0.5,
        beta: float = 0.25,
        scoring: str = "paper",
        predictor_ratio: float = 0.25,
        use_gumbel: bool = False,
        gumbel_tau: float = 1.0,
    ) -> None:
        super().__init__()
        keep_count(1, sparse_ratio)  # validates the ratio
        if not 0.0 <= beta <= 0.5:
            raise ValueError(f"beta must be in [0, 0.5], got {beta}")
        if scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
        if gumbel_tau <= 0:
            raise ValueError(f"gumbel_tau must be > 0, got {gumbel_tau}")
        hidden = max(1, int(dim * predictor_ratio))
        self.sparse_ratio = sparse_ratio
        self.beta = beta
        self.scoring = scoring
        self.use_gumbel = use_gumbel
        self.gumbel_tau = gumbel_tau
        self.predictor = (
            nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 1)) if scoring == "paper" else None
        )

    def score(
        self,
        tokens: Tensor,
        self_score: Tensor,
        guide_scores: Tensor | None = None,
        guide_mask: Tensor | None = None,
    ) -> Tensor:
        """Fused score (B, N) from tokens (B, N, C), self_score (B, N) and guide_scores (B, G, N), both raw;
        guide_mask (B, G) False = guide unavailable ("paper": see `fuse_scores`; "sum": left out of the sum)."""
        if self.predictor is None:
            if guide_scores is None:
                return self_score
            if guide_mask is not None:
                guide_scores = torch.where(guide_mask.bool().unsqueeze(-1), guide_scores, 0.0)
            return self_score + guide_scores.sum(1)
        predicted = torch.sigmoid(self.predictor(tokens)).squeeze(-1)
        guides = None if guide_scores is None else minmax_normalize(guide_scores)
        return fuse_scores(predicted, minmax_normalize(self_score), guides, self.beta, guide_mask)

    def forward(
        self,
        tokens: Tensor,
        self_score: Tensor,
        guide_scores: Tensor | None = None,
        generator: torch.Generator | None = None,
        guide_mask: Tensor | None = None,
    ) -> Selection:
        """tokens (B, N, C); self_score (B, N) similarity to the own global; guide_scores (B, G, N) similarities to
        the guiding features (other modalities, texts) or None; guide_mask (B, G) bool, False = that guide is
        unavailable for that sample -> `Selection`."""
        if tokens.dim() != 3:
            raise ValueError(f"tokens must be (B, N, C), got shape {tuple(tokens.shape)}")
        b, n, c = tokens.shape
        if self_score.shape != (b, n):
            raise ValueError(f"self_score must be (B, N) = {(b, n)}, got {tuple(self_score.shape)}")
        if guide_scores is not None and (guide_scores.dim() != 3 or guide_scores.shape[::2] != (b, n)):
            raise ValueError(f"guide_scores must be (B, G, N) with B={b}, N={n}, got {tuple(guide_scores.shape)}")
        if guide_mask is not None and (guide_scores is None or guide_mask.shape != guide_scores.shape[:2]):
            expected = "None (no guide_scores)" if guide_scores is None else f"(B, G) = {tuple(guide_scores.shape[:2])}"
            raise ValueError(f"guide_mask must be {expected}, got {tuple(guide_mask.shape)}")
        k = keep_count(n, self.sparse_ratio)
        score = self.score(tokens, self_score, guide_scores, guide_mask)

        if self.use_gumbel:
            logits = score / self.gumbel_tau
            if self.training:
                logits = logits + gumbel_noise(logits, generator)
            mask, order = straight_through_topk(logits, k, tau=1.0)  # logits are already divided by tau
            # Gates are 1 in value; their gradient is the relaxed mask's, so the selection itself trains the scores.
            gate = torch.where(mask.detach().bool(), mask, 1.0 - mask)
            tokens = tokens * gate.unsqueeze(-1)
        else:
            order = score.sort(dim=-1, descending=True, stable=True).indices
            mask = torch.zeros_like(score).scatter_(-1, order[:, :k], 1.0)

        keep_idx, drop_idx = order[:, :k], order[:, k:]
        kept = tokens.gather(1, keep_idx.unsqueeze(-1).expand(-1, -1, c))
        if k < n:
            dropped = tokens.gather(1, drop_idx.unsqueeze(-1).expand(-1, -1, c))
            weights = score.gather(1, drop_idx).softmax(-1)
            extra = weights.unsqueeze(1) @ dropped  # (B, 1, C)
        else:
            extra = tokens.new_zeros(b, 1, c)
        return Selection(kept, extra, mask, keep_idx, score, score.gather(1, keep_idx))


class TokenAggregation(nn.Module):
    """Learned aggregation of N_s tokens into N_c: W = softmax(scale * MLP(LN(x))^T [+ log importance]), out = W @ x.

    MLP: LayerNorm -> Linear(C -> hidden_ratio * C) -> GELU -> Linear(-> N_c). Rows of W sum to 1 over the N_s
    sources, so every output token is a convex combination of the inputs (a set function of them).

    Args:
        dim: channel size C.
        num_out: N_c >= 1.
        hidden_ratio: hidden width as a fraction of C (0.2 in seeds/000: 512 -> 102).
    """

    def __init__(self, dim: int, num_out: int, hidden_ratio: float = 0.2) -> None:
        super().__init__()
        if num_out < 1:
            raise ValueError(f"num_out (N_c) must be >= 1, got {num_out}")
        if hidden_ratio <= 0:
            raise ValueError(f"hidden_ratio must be > 0, got {hidden_ratio}")
        hidden = max(1, int(dim * hidden_ratio))
        self.num_out = num_out
        self.weight_net = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, num_out)
        )
        self.scale = nn.Parameter(torch.ones(1))

    def weights(self, x: Tensor, importance: Tensor | None = None, eps: float = 1e-8) -> Tensor:
        """Aggregation weights (B, N_c, N_s), rows summing to 1; x (B, N_s, C), importance (B, N_s) >= 0 or None."""
        if x.dim() != 3:
            raise ValueError(f"x must be (B, N_s, C), got shape {tuple(x.shape)}")
        if x.shape[1] < self.num_out:
            raise ValueError(
                f"TokenAggregation needs N_s >= N_c: got N_s={x.shape[1]} source tokens for num_out N_c={self.num_out}"
            )
        if importance is not None and importance.shape != x.shape[:2]:
            raise ValueError(f"importance must be (B, N_s) = {tuple(x.shape[:2])}, got {tuple(importance.shape)}")
        logits = self.weight_net(x).transpose(1, 2) * self.scale
        if importance is not None:
            logits = logits + torch.log(importance + eps).unsqueeze(1)
        return logits.softmax(-1)

    def forward(self, x: Tensor, importance: Tensor | None = None) -> Tensor:
        """x (B, N_s, C), importance (B, N_s) or None -> (B, N_c, C)."""
        return self.weights(x, importance) @ x
