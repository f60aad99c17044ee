"""Register tokens for cross-modal alignment (seeds/002), with nested dropout and an InfoNCE + regulariser loss.

K learnable register tokens (the first ``num_overlapping`` carry information shared across modalities, the rest
complementary, modality-specific information) cross-attend to each modality's frozen token sequence through a small
pre-norm transformer: cross-attention in every layer, causal self-attention among registers from the second layer
on. All modalities run through the same registers and layers in one batched pass ``(M*B, K, D)``.

Fixes of the reference implementation (research/token_modules.md §0.5):
- registers attend to a token **sequence** (B, N, C), never to one pooled vector, so that they can differ;
- nested dropout draws one uniform ``u`` per sample and drops token k when ``u < p_k``: the kept set is always a
  prefix, and the marginal drop probabilities are ``linspace(0, rate, K)``;
- the complementary regulariser is finite, with a gradient, for any number of complementary tokens (one included).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor


@dataclass
class RegisterTokenConfig:
    """Register-token module settings; defaults follow seeds/002 (4 tokens, 3 overlapping, 768-d, 2 layers, 8 heads).

    ``feature_dims`` maps a modality to the channel size C of its frozen token sequence (default: ``dim``).
    """

    modalities: tuple[str, ...] = ("vision", "tactile", "text")
    num_tokens: int = 4
    num_overlapping: int = 3
    dim: int = 768
    num_layers: int = 2
    num_heads: int = 8
    mlp_ratio: float = 4.0
    nested_dropout_rate: float = 0.5
    feature_dims: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.modalities) < 1 or len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"modalities must be >= 1 distinct names, got {self.modalities}")
        if self.num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {self.num_tokens}")
        if not 1 <= self.num_overlapping <= self.num_tokens:
            raise ValueError(f"num_overlapping must be in [1, num_tokens={self.num_tokens}], got {self.num_overlapping}")
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by num_heads ({self.num_heads})")
        if not 0.0 <= self.nested_dropout_rate < 1.0:
            raise ValueError(f"nested_dropout_rate must be in [0, 1), got {self.nested_dropout_rate}")
        unknown = set(self.feature_dims) - set(self.modalities)
        if unknown:
            raise ValueError(f"feature_dims has unknown modalities {sorted(unknown)}; accepted: {self.modalities}")

    @property
    def num_complementary(self) -> int:
        return self.num_tokens - self.num_overlapping


class NestedDropout(nn.Module):
    """Prefix-keeping dropout over K ordered tokens; identity in eval mode.

    One uniform draw ``u`` per sample; token k is dropped when ``u < p_k`` with ``p = linspace(0, rate, K)``. As
    ``p`` is increasing the dropped set is a suffix, ``P(drop k) = p_k``, and token 0 (``p_0 = 0``) is never dropped.
    """

    def __init__(self, num_tokens: int, rate: float) -> None:
        super().__init__()
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"rate must be in [0, 1), got {rate}")
        self.register_buffer("drop_probs", torch.linspace(0.0, rate, num_tokens), persistent=False)

    def sample_keep(self, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
        """(B, K) boolean keep mask, always a prefix; all True in eval mode."""
        probs = self.drop_probs
        if not self.training:
            return torch.ones(batch_size, probs.numel(), dtype=torch.bool, device=probs.device)
        u = torch.rand(batch_size, 1, generator=generator, device=probs.device)
        return u >= probs

    def forward(self, x: Tensor, fill: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """x: (*, B, K, D), fill: (D,) value of dropped tokens -> ((*, B, K, D), keep mask (B, K)).

        Leading dims (e.g. modalities) share the sample's draw."""
        keep = self.sample_keep(x.shape[-3], generator)
        return torch.where(keep[..., None], x, fill.to(x.dtype)), keep


def _mlp(dim: int, ratio: float) -> nn.Sequential:
    hidden = int(dim * ratio)
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class RegisterBlock(nn.Module):
    """Pre-norm block: cross-attention to features, optional causal self-attention, MLP; one residual each.

    Causal self-attention (register i sees registers j <= i) keeps the prefix self-contained, so the tokens kept by
    nested dropout never depend on the dropped ones.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, self_attn: bool) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm_self = nn.LayerNorm(dim) if self_attn else None
        self.self_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True) if self_attn else None
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = _mlp(dim, mlp_ratio)

    def forward(self, x: Tensor, feats: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """x: (B, K, D) registers, feats: (B, N, D), key_padding_mask: (B, N) True = ignore -> (B, K, D)."""
        kv = self.norm_kv(feats)
        x = x + self.cross_attn(self.norm_q(x), kv, kv, key_padding_mask=key_padding_mask, need_weights=False)[0]
        if self.self_attn is not None:
            k = x.shape[1]
            future = torch.ones(k, k, dtype=torch.bool, device=x.device).triu(1)
            h = self.norm_self(x)
            x = x + self.self_attn(h, h, h, attn_mask=future, need_weights=False)[0]
        return x + self.mlp(self.norm_mlp(x))


class RegisterTokenModule(nn.Module):
    """Learnable register tokens that summarise each modality's frozen token sequence.

    Args:
        config: sizes and schedule, see `RegisterTokenConfig`.
        encoders: optional frozen stage-1 encoders, one per modality, each mapping its raw input to a token sequence
            (B, N, C). They are put in eval mode, get ``requires_grad=False`` and run under ``no_grad``. Without
            encoders, `forward` takes the token sequences directly.

    Output of `forward` (the seeds/002 "Model Output"), for the modalities given:
        overlapping_tokens: {m: (B, num_overlapping, D)}
        complementary_tokens: {m: (B, num_complementary, D)}
        register_tokens: {m: (B, K, D)} all registers of modality m
        stage1_features: {m: (B, N_m, C_m)} the frozen token sequences
        nested_dropout_mask: (B, K) bool, True = kept (one draw per sample, shared by the modalities; all True in eval)
    Dropped registers are replaced by a learnable mask token (as in FlexTok), after encoding; `RegisterTokenLoss`
    ignores them, so the mask token is only trained by a downstream consumer of the fixed-length output.
    """

    def __init__(self, config: RegisterTokenConfig, encoders: Mapping[str, nn.Module] | None = None) -> None:
        super().__init__()
        self.config = c = config
        self.registers = nn.Parameter(torch.randn(c.num_tokens, c.dim) * 0.02)
        self.mask_token = nn.Parameter(torch.zeros(c.dim))
        self.adapters = nn.ModuleDict({m: nn.Linear(c.feature_dims.get(m, c.dim), c.dim) for m in c.modalities})
        self.blocks = nn.ModuleList(
            RegisterBlock(c.dim, c.num_heads, c.mlp_ratio, self_attn=i > 0) for i in range(c.num_layers)
        )
        self.norm = nn.LayerNorm(c.dim)
        self.nested_dropout = NestedDropout(c.num_tokens, c.nested_dropout_rate)
        self.encoders = None
        if encoders is not None:
            unknown = set(encoders) - set(c.modalities)
            if unknown:
                raise ValueError(f"encoders has unknown modalities {sorted(unknown)}; accepted: {c.modalities}")
            self.encoders = nn.ModuleDict(dict(encoders))
            self.encoders.requires_grad_(False)
            self.encoders.eval()

    def train(self, mode: bool = True) -> "RegisterTokenModule":
        super().train(mode)
        if self.encoders is not None:
            self.encoders.eval()  # frozen: no dropout / batch-norm updates, whatever the module's mode
        return self

    def _features(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        if not inputs:
            raise ValueError(f"inputs must contain at least one modality of {self.config.modalities}")
        unknown = set(inputs) - set(self.config.modalities)
        if unknown:
            raise ValueError(f"unknown modalities {sorted(unknown)}; accepted: {self.config.modalities}")
        if self.encoders is None:
            return dict(inputs)
        missing = set(inputs) - set(self.encoders)
        if missing:
            raise ValueError(f"no frozen encoder for modalities {sorted(missing)}; encoders: {list(self.encoders)}")
        with torch.no_grad():
            return {m: self.encoders[m](x) for m, x in inputs.items()}

    def forward(
        self,
        inputs: Mapping[str, Tensor],
        key_padding_masks: Mapping[str, Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, object]:
        """inputs: {m: raw input (with encoders) or token sequence (B, N_m, C_m)}; key_padding_masks: {m: (B, N_m)}
        True = padding. Returns the dictionary described in the class docstring."""
        c = self.config
        feats = self._features(inputs)
        masks = dict(key_padding_masks or {})
        names = list(feats)
        batch = None
        for m in names:
            f = feats[m]
            if f.dim() != 3 or f.shape[1] < 2:
                raise ValueError(
                    f"features of '{m}' must be a token sequence (B, N, C) with N >= 2, got {tuple(f.shape)}: "
                    "registers attending to one pooled vector all receive the same update"
                )
            want_c = c.feature_dims.get(m, c.dim)
            if f.shape[2] != want_c:
                raise ValueError(f"features of '{m}' have C={f.shape[2]}, expected feature_dims['{m}']={want_c}")
            if batch is None:
                batch = f.shape[0]
            elif f.shape[0] != batch:
                raise ValueError(f"all modalities need the same batch size, got {batch} and {f.shape[0]} ('{m}')")
            if m in masks and masks[m].shape != f.shape[:2]:
                raise ValueError(f"key_padding_masks['{m}'] must be (B, N)={tuple(f.shape[:2])}, got {tuple(masks[m].shape)}")

        # one batched pass over modalities: pad sequences to the longest, padding hidden by the key mask
        n_max = max(feats[m].shape[1] for m in names)
        kv = torch.cat([F.pad(self.adapters[m](feats[m]), (0, 0, 0, n_max - feats[m].shape[1])) for m in names])
        pad = torch.cat([
            F.pad(masks.get(m, torch.zeros(feats[m].shape[:2], dtype=torch.bool, device=kv.device)),
                  (0, n_max - feats[m].shape[1]), value=True)
            for m in names
        ])
        x = self.registers.expand(kv.shape[0], -1, -1)
        for block in self.blocks:
            x = block(x, kv, pad)
        x = self.norm(x).view(len(names), batch, c.num_tokens, c.dim)

        x, keep = self.nested_dropout(x, self.mask_token, generator)  # one draw per sample, shared by modalities
        k = c.num_overlapping
        return {
            "overlapping_tokens": {m: x[i, :, :k] for i, m in enumerate(names)},
            "complementary_tokens": {m: x[i, :, k:] for i, m in enumerate(names)},
            "register_tokens": {m: x[i] for i, m in enumerate(names)},
            "stage1_features": feats,
            "nested_dropout_mask": keep,
        }


def info_nce(za: Tensor, zb: Tensor, logit_scale: Tensor | float) -> tuple[Tensor, Tensor]:
    """Symmetric InfoNCE over batches of pairs. za, zb: (P, B, D) L2-normalised; matched rows are positives.

    Returns (loss (P,), logits (P, B, B)); loss = mean of CE(a->b) and CE(b->a) with targets arange(B).
    """
    logits = logit_scale * za @ zb.transpose(1, 2)
    p, b, _ = logits.shape
    target = torch.arange(b, device=logits.device).repeat(p)
    ce_ab = F.cross_entropy(logits.reshape(p * b, b), target, reduction="none").view(p, b).mean(1)
    ce_ba = F.cross_entropy(logits.transpose(1, 2).reshape(p * b, b), target, reduction="none").view(p, b).mean(1)
    return (ce_ab + ce_ba) / 2, logits


def topk_accuracy(logits: Tensor, k: int) -> Tensor:
    """(P, B, B) similarity -> (P,) fraction of rows and columns whose match (the diagonal) is in the top k."""
    b = logits.shape[-1]
    k = min(k, b)
    target = torch.arange(b, device=logits.device)[:, None]
    rows = (logits.topk(k, dim=2).indices == target).any(-1).float().mean(-1)
    cols = (logits.transpose(1, 2).topk(k, dim=2).indices == target).any(-1).float().mean(-1)
    return (rows + cols) / 2


class RegisterTokenLoss(nn.Module):
    """InfoNCE between pooled overlapping tokens for every enabled modality pair + w * complementary regulariser.

    Pooled token: mean over the *kept* overlapping tokens (nested dropout mask), L2-normalised. Temperature: a
    learnable logit scale initialised to 1/0.07 and clamped to 100 (CLIP), or fixed with ``learnable_scale=False``.

    Complementary regulariser, per modality, on the kept complementary tokens c_i and the pooled overlapping token o:
        norm: mean_i ||c_i||^2 / D, an L2 penalty keeping the complementary tokens small;
        diversity: mean over distinct pairs of {o, c_1, ..} of squared cosine similarity, which pushes complementary
            tokens away from the shared content and from each other. With one complementary token the (o, c_1) pair
            still exists, so the term is finite and has a gradient (the reference's within-set mean was NaN).

    Returns a dict: ``loss``, ``overlapping_loss``, ``complementary_reg``, and per enabled pair "a-b":
    ``loss/a-b``, ``acc1/a-b``, ``acc5/a-b`` (retrieval accuracy in the batch, averaged over both directions).
    """

    def __init__(
        self,
        modalities: Sequence[str],
        num_overlapping: int,
        complementary_weight: float = 0.01,
        disabled_pairs: Sequence[tuple[str, str]] = (),
        temperature: float = 0.07,
        learnable_scale: bool = True,
        max_logit_scale: float = 100.0,
    ) -> None:
        super().__init__()
        if num_overlapping < 1:
            raise ValueError(f"num_overlapping must be >= 1, got {num_overlapping}")
        if complementary_weight < 0:
            raise ValueError(f"complementary_weight must be >= 0, got {complementary_weight}")
        if not 0 < temperature <= 1:
            raise ValueError(f"temperature must be in (0, 1], got {temperature}")
        self.modalities = tuple(modalities)
        for pair in disabled_pairs:
            if len(pair) != 2 or not set(pair) <= set(self.modalities):
                raise ValueError(f"disabled_pairs entry {pair} must be two of {self.modalities}")
        self.disabled = {frozenset(p) for p in disabled_pairs}
        self.num_overlapping = num_overlapping
        self.complementary_weight = complementary_weight
        self.max_logit_scale = max_logit_scale
        scale = torch.tensor(math.log(1.0 / temperature))
        self.log_logit_scale = nn.Parameter(scale) if learnable_scale else nn.Buffer(scale)

    @property
    def logit_scale(self) -> Tensor:
        return self.log_logit_scale.exp().clamp(max=self.max_logit_scale)

    def pairs(self, names: Sequence[str]) -> list[tuple[str, str]]:
        """Enabled modality pairs among ``names``, in configuration order."""
        ordered = [m for m in self.modalities if m in names]
        return [p for p in itertools.combinations(ordered, 2) if frozenset(p) not in self.disabled]

    @staticmethod
    def pooled(overlapping: Tensor, keep: Tensor) -> Tensor:
        """(..., B, k, D) tokens, (B, k) keep -> (..., B, D) L2-normalised mean of the kept tokens."""
        w = keep.to(overlapping.dtype)[..., None]
        return F.normalize((overlapping * w).sum(-2) / w.sum(-2).clamp(min=1), dim=-1)

    def complementary_reg(self, comp: Tensor, pooled: Tensor, keep: Tensor) -> Tensor:
        """comp: (M, B, n_c, D), pooled: (M, B, D), keep: (B, n_c) -> scalar (0 when n_c == 0)."""
        if comp.shape[2] == 0:
            return comp.new_zeros(())
        w = keep.to(comp.dtype).expand(comp.shape[:3])
        norm = (comp.pow(2).mean(-1) * w).sum() / w.sum().clamp(min=1)
        z = F.normalize(torch.cat([pooled[:, :, None], comp], dim=2), dim=-1)  # (M, B, 1 + n_c, D)
        cos2 = (z @ z.transpose(-1, -2)).pow(2)
        wz = torch.cat([torch.ones_like(w[..., :1]), w], dim=-1)
        pair_w = wz[..., :, None] * wz[..., None, :] * (1 - torch.eye(wz.shape[-1], device=z.device, dtype=z.dtype))
        diversity = (cos2 * pair_w).sum() / pair_w.sum().clamp(min=1)
        return norm + diversity

    def forward(self, outputs: Mapping[str, object]) -> dict[str, Tensor]:
        ov_d, comp_d = outputs["overlapping_tokens"], outputs["complementary_tokens"]
        names = list(ov_d)
        unknown = set(names) - set(self.modalities)
        if unknown:
            raise ValueError(f"unknown modalities {sorted(unknown)}; accepted: {self.modalities}")
        ov = torch.stack([ov_d[m] for m in names])  # (M, B, k, D)
        if ov.shape[2] != self.num_overlapping:
            raise ValueError(f"expected {self.num_overlapping} overlapping tokens (num_overlapping), got {ov.shape[2]}")
        comp = torch.stack([comp_d[m] for m in names])
        b = ov.shape[1]
        keep = outputs.get("nested_dropout_mask")
        if keep is None:
            keep = torch.ones(b, ov.shape[2] + comp.shape[2], dtype=torch.bool, device=ov.device)
        k = self.num_overlapping
        z = self.pooled(ov, keep[:, :k])

        result: dict[str, Tensor] = {}
        pairs = self.pairs(names)
        if pairs:
            ia = torch.tensor([names.index(a) for a, _ in pairs], device=z.device)
            ib = torch.tensor([names.index(b_) for _, b_ in pairs], device=z.device)
            per_pair, logits = info_nce(z[ia], z[ib], self.logit_scale)
            overlapping = per_pair.mean()
            with torch.no_grad():
                acc1, acc5 = topk_accuracy(logits, 1), topk_accuracy(logits, 5)
            for i, (a, b_) in enumerate(pairs):
                result[f"loss/{a}-{b_}"] = per_pair[i].detach()
                result[f"acc1/{a}-{b_}"] = acc1[i]
                result[f"acc5/{a}-{b_}"] = acc5[i]
        else:
            overlapping = z.new_zeros(())
        reg = self.complementary_reg(comp, z, keep[:, k:])
        result.update(loss=overlapping + self.complementary_weight * reg, overlapping_loss=overlapping,
                      complementary_reg=reg)
        return result
