"""SEPS: semantic-enhanced patch slimming for image-text alignment (seeds/003, arXiv 2511.01390).

Patches are selected by `TokenSparse` under text guidance, aggregated by `TokenAggregation` (the same modules as
SDTPS), and the slimmed tokens are aligned with the caption's words. Selection depends on the caption, so every
(image, caption) pair is slimmed separately, all pairs in one batch.

``use_paper_version`` switches both the scoring and the similarity (research/token_modules.md §3.2-3.3):
- paper: s = (1-2b) sigmoid(MLP(v)) + b (s^st + s^dt + 2 s^im), min-max normalised sources (Eq. 1-3); similarity
  with plain cosine A plus ``MLP(TOPK(.))`` relevance terms (Eq. 5);
- released code: s = s^im + s^st (+ s^dt), raw cosines, no predictor; A = LeakyReLU_0.1(cosine) and
  S = mean_words max_patches A + mean_patches max_words A (the two terms summed).
s^im is the cosine to the mean of the image's patches, s^st to the mean caption word, s^dt to the mean word of the
dense description.

Fixes of the released code: the selection runs with gradients (the code wraps it in ``no_grad``, so patches get
none); the dense description is an **image-side** input, indexed by image (B_v): the released evaluation attaches the
description of the caption's ground-truth image to the query, which leaks the answer; no ratio loss (constant with a
fixed keep count).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .selection import Selection, TokenAggregation, TokenSparse, aggregated_count, cosine_scores

Tensor = torch.Tensor


def masked_mean(x: Tensor, mask: Tensor | None) -> Tensor:
    """Mean over the valid positions: x (B, L, C), mask (B, L) True = valid or None -> (B, C)."""
    if mask is None:
        return x.mean(1)
    w = mask.to(x.dtype).unsqueeze(-1)
    return (x * w).sum(1) / w.sum(1).clamp_min(1.0)


def _topk_padded(x: Tensor, valid: Tensor, k: int) -> Tensor:
    """Top-k of the valid entries of x (..., L), zero-filled where fewer than k are valid -> (..., k)."""
    x = x.masked_fill(~valid, float("-inf"))
    if x.shape[-1] < k:
        x = F.pad(x, (0, k - x.shape[-1]), value=float("-inf"))
    top = x.topk(k, dim=-1).values
    return top.masked_fill(torch.isinf(top), 0.0)


class PatchWordAlignment(nn.Module):
    """Image-text similarity from patch-word alignment over L2-normalised features.

    Code form: A = LeakyReLU_0.1(words @ patches^T); S = mean_words max_patches A + mean_patches max_words A.
    Paper form (Eq. 5): A = words @ patches^T (cosine); each of the two terms gets ``+ MLP(top-k of its max vector)``
    (MLP k -> 2k -> 1, top-k zero-padded when there are fewer than k entries; k and the MLP are unspecified in the
    paper).
    Padded words (``word_mask`` False) never count: they are left out of the word mean and of the max over words.
    """

    def __init__(self, paper_form: bool = False, topk: int = 5, negative_slope: float = 0.1) -> None:
        super().__init__()
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        self.paper_form = paper_form
        self.topk = topk
        self.negative_slope = negative_slope
        if paper_form:
            self.word_mlp = nn.Sequential(nn.Linear(topk, 2 * topk), nn.GELU(), nn.Linear(2 * topk, 1))
            self.patch_mlp = nn.Sequential(nn.Linear(topk, 2 * topk), nn.GELU(), nn.Linear(2 * topk, 1))

    def forward(self, tokens: Tensor, words: Tensor, word_mask: Tensor | None = None) -> Tensor:
        """tokens (B_v, P, C) shared by all captions, or (B_v, B_t, P, C) per pair; words (B_t, L, C); word_mask
        (B_t, L) True = real word -> S (B_v, B_t)."""
        if tokens.dim() == 3:
            tokens = tokens.unsqueeze(1)
        if tokens.dim() != 4 or words.dim() != 3 or tokens.shape[-1] != words.shape[-1]:
            raise ValueError(
                f"tokens must be (B_v, P, C) or (B_v, B_t, P, C) and words (B_t, L, C) with the same C, got "
                f"{tuple(tokens.shape)} and {tuple(words.shape)}"
            )
        if tokens.shape[1] not in (1, words.shape[0]):
            raise ValueError(f"tokens' pair dim must be 1 or B_t={words.shape[0]}, got {tokens.shape[1]}")
        t, l = words.shape[:2]
        if word_mask is None:
            word_mask = torch.ones(t, l, dtype=torch.bool, device=words.device)
        elif word_mask.shape != (t, l):
            raise ValueError(f"word_mask must be (B_t, L) = {(t, l)}, got {tuple(word_mask.shape)}")
        word_mask = word_mask.bool()
        a = F.normalize(words, dim=-1).unsqueeze(0) @ F.normalize(tokens, dim=-1).transpose(-1, -2)  # (V, T, L, P)
        if not self.paper_form:
            a = F.leaky_relu(a, self.negative_slope)
        valid = word_mask[None, :, :, None]  # (1, T, L, 1)
        word_best = a.amax(-1)  # (V, T, L): best patch of every word
        patch_best = a.masked_fill(~valid, float("-inf")).amax(-2)  # (V, T, P): best real word of every patch
        w = valid.squeeze(-1).to(a.dtype)
        s = (word_best * w).sum(-1) / w.sum(-1).clamp_min(1.0) + patch_best.mean(-1)
        if self.paper_form:
            wm = word_mask[None].expand_as(word_best)
            s = s + self.word_mlp(_topk_padded(word_best, wm, self.topk)).squeeze(-1)
            pm = torch.ones_like(patch_best, dtype=torch.bool)
            s = s + self.patch_mlp(_topk_padded(patch_best, pm, self.topk)).squeeze(-1)
        return s


class SEPS(nn.Module):
    """Text-guided patch slimming + patch-word alignment: (image, caption) pairs -> similarity matrix.

    Args:
        dim: channel size C shared by patches and words.
        num_patches: patches per image N (fixes N_c).
        sparse_ratio, aggr_ratio: as in `MultiModalSDTPS` (ViT: 0.5, 0.4; Swin: 0.8, 0.6).
        beta: fusion weight in [0, 0.5] (paper scoring).
        use_paper_version: paper scoring and similarity, or the released code's (module docstring).
        paper_alignment: override the similarity form alone (None: follow ``use_paper_version``), e.g. to compare
            the paper's scoring against other token reductions under one shared similarity.
        hidden_ratio: aggregator MLP width as a fraction of C.
        use_gumbel, gumbel_tau: Gumbel top-k with straight-through gradients, see `TokenSparse`.
        topk: k of the paper similarity's relevance MLPs.
    The aggregation adds log(importance) in the paper version only (the released code has none).
    """

    def __init__(
        self,
        dim: int = 512,
        num_patches: int = 196,
        sparse_ratio: float = 0.5,
        aggr_ratio: float = 0.4,
        beta: float = 0.25,
        use_paper_version: bool = True,
        paper_alignment: bool | None = None,
        hidden_ratio: float = 0.2,
        use_gumbel: bool = False,
        gumbel_tau: float = 1.0,
        topk: int = 5,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.num_patches = num_patches
        self.num_aggregated = aggregated_count(num_patches, sparse_ratio, aggr_ratio)
        self.use_paper_version = use_paper_version
        scoring = "paper" if use_paper_version else "sum"
        self.sparse = TokenSparse(dim, sparse_ratio, beta, scoring, 0.25, use_gumbel, gumbel_tau)
        self.aggr = TokenAggregation(dim, self.num_aggregated, hidden_ratio)
        paper_form = use_paper_version if paper_alignment is None else paper_alignment
        self.align = PatchWordAlignment(paper_form=paper_form, topk=topk)

    def _check_text(self, name: str, x: Tensor, mask: Tensor | None, batch: int | None) -> None:
        if x.dim() != 3 or x.shape[-1] != self.dim or (batch is not None and x.shape[0] != batch):
            b = "B" if batch is None else batch
            raise ValueError(f"{name} must be ({b}, L, C={self.dim}), got {tuple(x.shape)}")
        if mask is not None:
            if mask.shape != x.shape[:2]:
                raise ValueError(
                    f"{name}_mask must be {tuple(x.shape[:2])} (True = real word), got {tuple(mask.shape)}"
                )
            if not mask.bool().any(-1).all():
                raise ValueError(f"{name}_mask must keep at least one real word per row")

    def slim(
        self,
        patches: Tensor,
        caption: Tensor,
        caption_mask: Tensor | None = None,
        dense: Tensor | None = None,
        dense_mask: Tensor | None = None,
    ) -> tuple[Tensor, Selection]:
        """Slim each image under its own row's texts: patches (B, N, C), caption (B, L, C), dense (B, L_d, C) the
        description *of that image*; masks (B, L) True = real word -> ((B, N_c + 1, C), `Selection`)."""
        if patches.dim() != 3 or patches.shape[1:] != (self.num_patches, self.dim):
            raise ValueError(
                f"patches must be (B, N, C) = (B, {self.num_patches}, {self.dim}), got {tuple(patches.shape)}"
            )
        b = patches.shape[0]
        self._check_text("caption", caption, caption_mask, b)
        refs = [patches.mean(1), masked_mean(caption, caption_mask)]
        if dense is not None:
            self._check_text("dense", dense, dense_mask, b)
            refs.append(masked_mean(dense, dense_mask))
        scores = cosine_scores(patches, torch.stack(refs, 1))  # (B, 1 + G, N): s^im, s^st[, s^dt]
        sel = self.sparse(patches, scores[:, 0], scores[:, 1:])
        importance = sel.keep_score.softmax(-1) if self.use_paper_version else None
        return torch.cat([self.aggr(sel.tokens, importance), sel.extra], dim=1), sel

    def forward(
        self,
        patches: Tensor,
        captions: Tensor,
        caption_mask: Tensor | None = None,
        dense: Tensor | None = None,
        dense_mask: Tensor | None = None,
    ) -> Tensor:
        """patches (B_v, N, C); captions (B_t, L, C) with caption_mask (B_t, L); dense (B_v, L_d, C), one description
        per **image**, with dense_mask (B_v, L_d) -> similarity S (B_v, B_t). S[i, j] depends only on image i, its
        description and caption j."""
        if patches.dim() != 3:
            raise ValueError(f"patches must be (B_v, N, C), got {tuple(patches.shape)}")
        v, n, c = patches.shape
        self._check_text("captions", captions, caption_mask, None)
        if dense is not None:
            # Image-side only: a description indexed by caption would be the query's ground-truth image's (leakage).
            self._check_text("dense", dense, dense_mask, v)
        t, l = captions.shape[:2]
        pair_patches = patches.unsqueeze(1).expand(v, t, n, c).reshape(v * t, n, c)
        pair_caps = captions.unsqueeze(0).expand(v, t, l, c).reshape(v * t, l, c)
        pair_cmask = None if caption_mask is None else caption_mask.unsqueeze(0).expand(v, t, l).reshape(v * t, l)
        pair_dense = pair_dmask = None
        if dense is not None:
            ld = dense.shape[1]
            pair_dense = dense.unsqueeze(1).expand(v, t, ld, c).reshape(v * t, ld, c)
            if dense_mask is not None:
                pair_dmask = dense_mask.unsqueeze(1).expand(v, t, ld).reshape(v * t, ld)
        tokens, _ = self.slim(pair_patches, pair_caps, pair_cmask, pair_dense, pair_dmask)
        return self.align(tokens.view(v, t, -1, c), captions, caption_mask)
