"""SDTPS: multi-modal patch selection for RGB/NIR/TIR re-identification (seeds/000).

Each modality m has its own `TokenSparse` and `TokenAggregation`. Its patches are scored by a learned predictor,
their cosine similarity to m's own global feature (s^im) and to every other modality's global (s^cross: the
cross-modal guidance), fused as ``(1-2b) s^p + b (s^cross1 + s^cross2 + 2 s^im)``. The top ``ceil(N * sparse_ratio)``
patches are aggregated into N_c = floor(N * sparse_ratio * aggr_ratio) tokens, and an extra token summarises the
discarded ones: (B, N, C) -> (B, N_c + 1, C); 128 -> 64 -> 25 + 1 = 26 with the defaults.

Missing modalities: ``present={m: (B,) bool}`` marks, per sample, which modalities exist (a key left out = present
everywhere). Where modality m is absent for sample b:
- m's patches and global are replaced by zeros before anything is computed, so their values (even NaN) influence no
  output and receive zero gradient;
- m's outputs are zero: tokens (N_c + 1, C) = 0, mask all 0 (nothing selected), score 0;
- m's global guides no other modality: each modality's cross-modal term averages over the *present* others only, and
  with none present its weight goes to the own-global term, s = (1-2b) s^p + 4b s^im (`fuse_scores`).
A sample with every modality absent gets all-zero outputs.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .selection import TokenAggregation, TokenSparse, aggregated_count, cosine_scores

Tensor = torch.Tensor
GUIDANCE = ("global", "aligned")


class SDTPSOutput(NamedTuple):
    """tokens: {m: (B, N_c + 1, C)} = [aggregated; extra]; masks: {m: (B, N)} 1 = kept; scores: {m: (B, N)} fused."""

    tokens: dict[str, Tensor]
    masks: dict[str, Tensor]
    scores: dict[str, Tensor]


class MultiModalSDTPS(nn.Module):
    """Sparse-dense token-aware patch selection over M >= 2 aligned modalities.

    Args:
        dim: channel size C.
        num_patches: patches per modality N (fixes N_c, the aggregator's output size).
        modalities: names, >= 2 distinct; with M modalities each one is guided by the other M - 1 globals (averaged,
            so the seeds' weights hold for any M, see `fuse_scores`).
        sparse_ratio: kept fraction in (0, 1].
        aggr_ratio: N_c / (N * sparse_ratio), in (0, 1].
        beta: score fusion weight in [0, 0.5].
        hidden_ratio: aggregator MLP width as a fraction of C.
        use_importance: add log(softmax(kept scores)) to the aggregation logits (a weak prior, as in the reference).
        use_gumbel, gumbel_tau: Gumbel top-k with straight-through gradients, see `TokenSparse`.
        guidance: what a patch is compared with in the other modalities: ``"global"`` (the seeds': their global
            features) or ``"aligned"`` (their patch at the same index, for spatially registered modalities such as
            RGB/NIR/TIR crops: content present at the same place in every modality scores high, clutter of one
            modality low; a global has no position and cannot tell the two apart).
    """

    def __init__(
        self,
        dim: int = 512,
        num_patches: int = 128,
        modalities: Sequence[str] = ("rgb", "nir", "tir"),
        sparse_ratio: float = 0.5,
        aggr_ratio: float = 0.4,
        beta: float = 0.25,
        hidden_ratio: float = 0.2,
        use_importance: bool = True,
        use_gumbel: bool = False,
        gumbel_tau: float = 1.0,
        guidance: str = "global",
    ) -> None:
        super().__init__()
        if guidance not in GUIDANCE:
            raise ValueError(f"guidance must be one of {GUIDANCE}, got {guidance!r}")
        modalities = tuple(modalities)
        if len(modalities) < 2 or len(set(modalities)) != len(modalities):
            raise ValueError(f"modalities must be >= 2 distinct names, got {modalities}")
        self.modalities = modalities
        self.dim = dim
        self.num_patches = num_patches
        self.num_aggregated = aggregated_count(num_patches, sparse_ratio, aggr_ratio)
        self.use_importance = use_importance
        self.guidance = guidance
        self.sparse = nn.ModuleDict(
            {m: TokenSparse(dim, sparse_ratio, beta, "paper", 0.25, use_gumbel, gumbel_tau) for m in modalities}
        )
        self.aggr = nn.ModuleDict({m: TokenAggregation(dim, self.num_aggregated, hidden_ratio) for m in modalities})
        m = len(modalities)
        # others[i] = indices of the modalities that guide modality i
        others = torch.tensor([[j for j in range(m) if j != i] for i in range(m)], dtype=torch.long)
        self.register_buffer("others", others, persistent=False)

    @property
    def num_out_tokens(self) -> int:
        return self.num_aggregated + 1

    def _check(self, patches: Mapping[str, Tensor], globals_: Mapping[str, Tensor]) -> None:
        for name, d in (("patches", patches), ("globals_", globals_)):
            if set(d) != set(self.modalities):
                raise ValueError(f"{name} must have exactly the modalities {self.modalities}, got {sorted(d)}")
        ref = patches[self.modalities[0]].shape
        for m in self.modalities:
            p, g = patches[m], globals_[m]
            if p.dim() != 3 or p.shape[1:] != (self.num_patches, self.dim) or p.shape != ref:
                raise ValueError(
                    f"patches[{m!r}] must be (B, N, C) = (B, {self.num_patches}, {self.dim}) with the same B for every "
                    f"modality, got {tuple(p.shape)} (first modality: {tuple(ref)})"
                )
            if g.shape != (ref[0], self.dim):
                raise ValueError(f"globals_[{m!r}] must be (B, C) = {(ref[0], self.dim)}, got {tuple(g.shape)}")

    def _presence(self, present: Mapping[str, Tensor], batch: int, device: torch.device) -> Tensor:
        """{m: (B,) bool} -> (M, B) bool, modalities left out count as present."""
        unknown = set(present) - set(self.modalities)
        if unknown:
            raise ValueError(
                f"present has unknown modalities {sorted(unknown)}; expected a subset of {self.modalities}"
            )
        rows = []
        for m in self.modalities:
            if m not in present:
                rows.append(torch.ones(batch, dtype=torch.bool, device=device))
                continue
            x = present[m]
            if not isinstance(x, Tensor) or x.dtype != torch.bool or x.shape != (batch,):
                got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
                raise ValueError(f"present[{m!r}] must be a bool tensor of shape (B,) = ({batch},), got {got}")
            rows.append(x.to(device))
        return torch.stack(rows)

    def forward(
        self,
        patches: Mapping[str, Tensor],
        globals_: Mapping[str, Tensor],
        generator: torch.Generator | None = None,
        present: Mapping[str, Tensor] | None = None,
    ) -> SDTPSOutput:
        """patches {m: (B, N, C)}, globals_ {m: (B, C)}, present {m: (B,) bool} or None (all present) -> `SDTPSOutput`
        with tokens {m: (B, N_c + 1, C)}; absent modalities as in the module docstring."""
        self._check(patches, globals_)
        names = self.modalities
        p = torch.stack([patches[m] for m in names])  # (M, B, N, C)
        g = torch.stack([globals_[m] for m in names])  # (M, B, C)
        num_mod, b, n, c = p.shape
        pres = None
        if present is not None:
            pres = self._presence(present, b, p.device)  # (M, B)
            # where, not multiply: an absent modality may be filled with NaN / inf, which must not leak (0 * NaN = NaN)
            p = torch.where(pres[..., None, None], p, 0.0)
            g = torch.where(pres[..., None], g, 0.0)
        # All modality pairs in one batched op: sims[i, :, j] = cos(patches of i, global of j), (M, B, M, N).
        g_all = g.transpose(0, 1).unsqueeze(0).expand(num_mod, -1, -1, -1)  # (M, B, M, C)
        sims = cosine_scores(p.reshape(num_mod * b, n, c), g_all.reshape(num_mod * b, num_mod, c))
        sims = sims.view(num_mod, b, num_mod, n)
        idx = torch.arange(num_mod, device=p.device)
        self_s = sims[idx, :, idx]  # (M, B, N)
        if self.guidance == "global":
            cross = sims.permute(0, 2, 1, 3)[idx[:, None], self.others].transpose(1, 2)  # (M, B, M-1, N)
        else:  # cos(patch n of i, patch n of j) for every pair, (M, M, B, N)
            unit = F.normalize(p, dim=-1)
            aligned = torch.einsum("ibnc,jbnc->ijbn", unit, unit)
            cross = aligned[idx[:, None], self.others].transpose(1, 2)  # (M, B, M-1, N)

        tokens, masks, scores = {}, {}, {}
        for i, m in enumerate(names):  # M independent modules, each fully batched
            guide_mask = None if pres is None else pres[self.others[i]].T  # (B, M-1): which guides exist
            sel = self.sparse[m](p[i], self_s[i], cross[i], generator=generator, guide_mask=guide_mask)
            importance = sel.keep_score.softmax(-1) if self.use_importance else None
            tokens[m] = torch.cat([self.aggr[m](sel.tokens, importance), sel.extra], dim=1)
            masks[m], scores[m] = sel.mask, sel.score
            if pres is not None:
                here = pres[i]
                tokens[m] = torch.where(here[:, None, None], tokens[m], 0.0)
                masks[m] = torch.where(here[:, None], masks[m], 0.0)
                scores[m] = torch.where(here[:, None], scores[m], 0.0)
        return SDTPSOutput(tokens, masks, scores)
