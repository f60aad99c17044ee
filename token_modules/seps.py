"""SEPS: semantic-enhanced patch slimming for image-text alignment (seeds/003, arXiv 2511.01390).

Patches are selected by `TokenSparse` under text guidance, aggregated by `TokenAggregation` (the same modules as
SDTPS), and the slimmed tokens are aligned with the caption's words. Selection depends on the caption, so every
(image, caption) pair is slimmed separately, all pairs in one batch.

Batched pairs (`SEPS.forward`, `SEPS.slim_pairs`): everything that depends on the image alone runs once per image
(normalised patches, s^im, s^dt, the score predictor, the aggregator's per-patch logits); per pair run only the
caption score s^st (one (V*N, C) x (C, T) product), the top-k, the softmax over the kept patches and the weighted
sums, so no (pairs, N, C) tensor is built. `SEPS.reference_forward` is the direct per-pair form (every pair's patches
copied and slimmed by `SEPS.slim`); it gives the same similarities and serves as the reference and the cost baseline.

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

from .selection import (
    Selection,
    TokenAggregation,
    TokenSparse,
    aggregated_count,
    cosine_scores,
    fuse_scores,
    gumbel_noise,
    keep_count,
    minmax_normalize,
    straight_through_topk,
)

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

    def _check_pairs(
        self, patches: Tensor, captions: Tensor, caption_mask: Tensor | None, dense: Tensor | None,
        dense_mask: Tensor | None,
    ) -> None:
        if patches.dim() != 3 or patches.shape[1:] != (self.num_patches, self.dim):
            raise ValueError(
                f"patches must be (B_v, N, C) = (B_v, {self.num_patches}, {self.dim}), got {tuple(patches.shape)}"
            )
        self._check_text("captions", captions, caption_mask, None)
        if dense is not None:
            # Image-side only: a description indexed by caption would be the query's ground-truth image's (leakage).
            self._check_text("dense", dense, dense_mask, patches.shape[0])

    def slim_pairs(
        self,
        patches: Tensor,
        captions: Tensor,
        caption_mask: Tensor | None = None,
        dense: Tensor | None = None,
        dense_mask: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Slimmed tokens of every (image, caption) pair: patches (B_v, N, C); captions (B_t, L, C) with caption_mask
        (B_t, L); dense (B_v, L_d, C), one description per image, with dense_mask (B_v, L_d) -> (B_v, B_t, N_c + 1, C)
        (the N_c aggregated tokens, then the extra token), equal to `slim` of each pair.

        With Gumbel selection the gates act on the kept patches and the extra token's weights as in `TokenSparse`.
        The aggregator's logits are computed once per patch from the ungated patches: its MLP starts with a
        LayerNorm, which is invariant to the gates' scale, so values and gradients are those of `slim`.
        """
        self._check_pairs(patches, captions, caption_mask, dense, dense_mask)
        v, n, c = patches.shape
        t = captions.shape[0]
        unit = F.normalize(patches, dim=-1)
        refs = [patches.mean(1)] + ([] if dense is None else [masked_mean(dense, dense_mask)])
        image_refs = (unit @ F.normalize(torch.stack(refs, 1), dim=-1).transpose(1, 2)).transpose(1, 2)  # (V, G, N)
        s_st = (unit @ F.normalize(masked_mean(captions, caption_mask), dim=-1).T).transpose(1, 2)  # (V, T, N)
        score = self._pair_score(patches, image_refs, s_st).reshape(v * t, n)

        sparse = self.sparse
        k = keep_count(n, sparse.sparse_ratio)
        if sparse.use_gumbel:
            logits = score / sparse.gumbel_tau
            if self.training:
                logits = logits + gumbel_noise(logits, generator)
            mask, order = straight_through_topk(logits, k, tau=1.0)
            gate = torch.where(mask.detach().bool(), mask, 1.0 - mask)  # 1 in value, relaxed mask's gradient
        else:
            order = score.sort(dim=-1, descending=True, stable=True).indices
            gate = None
        keep_idx, drop_idx = order[:, :k], order[:, k:]
        # Row of each kept patch in the (V*N, ...) per-image tensors; index_select's backward is a cheap index_add.
        flat = (keep_idx + n * torch.arange(v, device=patches.device).repeat_interleave(t).unsqueeze(-1)).view(-1)
        kept = patches.reshape(v * n, c).index_select(0, flat).view(v * t, k, c)  # the only per-pair copy of patches
        if gate is not None:
            kept = kept * gate.gather(1, keep_idx).unsqueeze(-1)

        # The aggregator's MLP is per token: its logits for a kept patch are that patch's row of the per-image logits.
        logits = self.aggr.weight_net(patches).reshape(v * n, -1).index_select(0, flat).view(v * t, k, -1)
        logits = (logits * self.aggr.scale).transpose(1, 2)  # (V*T, N_c, K)
        if self.use_paper_version:
            logits = logits + torch.log(score.gather(1, keep_idx).softmax(-1) + 1e-8).unsqueeze(1)
        aggregated = logits.softmax(-1) @ kept  # (V*T, N_c, C)

        if k < n:
            # Extra token as a (V, T, N) x (V, N, C) product: zero weight on the kept patches, no per-pair gather.
            weights = torch.zeros_like(score).scatter_(1, drop_idx, score.gather(1, drop_idx).softmax(-1))
            if gate is not None:
                weights = weights * gate
            extra = weights.view(v, t, n) @ patches  # (V, T, C)
        else:
            extra = patches.new_zeros(v, t, c)
        return torch.cat([aggregated.view(v, t, -1, c), extra.unsqueeze(2)], dim=2)

    def _pair_score(self, patches: Tensor, image_refs: Tensor, s_st: Tensor) -> Tensor:
        """Fused score (B_v, B_t, N) from patches (B_v, N, C), the image-side cosines (B_v, G, N) (s^im[, s^dt]) and
        the caption cosines s^st (B_v, B_t, N), as `TokenSparse.score` fuses them."""
        v, t, n = s_st.shape
        s_im, s_dt = image_refs[:, 0], image_refs[:, 1:]
        if self.sparse.predictor is None:
            return s_im.unsqueeze(1) + s_st + s_dt.sum(1, keepdim=True)
        predicted = torch.sigmoid(self.sparse.predictor(patches)).squeeze(-1)  # (V, N), once per image
        guides = minmax_normalize(s_st).unsqueeze(2)  # (V, T, 1, N)
        if s_dt.shape[1]:
            guides = torch.cat([guides, minmax_normalize(s_dt).unsqueeze(1).expand(v, t, -1, n)], 2)

        def pairs(x: Tensor) -> Tensor:
            return x.unsqueeze(1).expand(v, t, n).reshape(v * t, n)

        fused = fuse_scores(pairs(predicted), pairs(minmax_normalize(s_im)), guides.reshape(v * t, -1, n),
                            self.sparse.beta)
        return fused.view(v, t, n)

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
        description and caption j. Batched: see the module docstring."""
        return self.align(self.slim_pairs(patches, captions, caption_mask, dense, dense_mask), captions, caption_mask)

    def reference_forward(
        self,
        patches: Tensor,
        captions: Tensor,
        caption_mask: Tensor | None = None,
        dense: Tensor | None = None,
        dense_mask: Tensor | None = None,
    ) -> Tensor:
        """`forward` computed per pair: every pair's patches (B_v * B_t, N, C) copied and slimmed by `slim`, as the
        released code does; the reference for `forward` and its cost baseline. Same arguments and result."""
        self._check_pairs(patches, captions, caption_mask, dense, dense_mask)
        v, n, c = patches.shape
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
