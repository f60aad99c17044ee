"""Rotary position tables of merged sequences: what position a merged token's query and key are rotated to.

Rotary models (FLUX, Wan) rotate each token's query and key by angles of its position, from one (cos, sin) table
that the model computes once per forward and hands to every block. A merged row stands for a group of tokens, so
the table handed to a merged attention has one row per merged row. Two rules:

- ``"destination"``: the row takes the angles of its group's first token (a bipartite merge's destination, an SSM
  window's first token): an exact position of the image, the merged token placed where it is kept.
- ``"mean"``: the circular mean of its tokens' angles: cos and sin are merged like the tokens (their means), and
  each (cos, sin) pair is rescaled to unit length, so the row is still a rotation (by the mean angle of the group,
  per frequency). The default: on the trained FLUX-architecture reference it matched "destination" with SDTM*-a
  and made ToMe's images much closer to the data (KID, FID) at the same adherence (docs/compatibility.md).

Text rows (FLUX's joint sequence puts the text first) are never merged. The plan is shared by the batch (rotary
models merge with `TokenMerge.expand`d plans), so the merged table is one table, as the attention processors
expect.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .merge import TokenMerge

POSITION_RULES = ("destination", "mean")


@dataclass(frozen=True)
class RotaryArg:
    """Where a merged sub-layer receives its rotary table and how the table is laid out.

    Attributes:
        name: the keyword of the (cos, sin) pair in the sub-layer's forward.
        position: its positional index, when passed positionally (Wan's blocks call ``attn1(x, None, None, rotary)``).
        seq_dim: the sequence axis of cos and sin (FLUX: (S, D), axis 0; Wan: (1, S, 1, D), axis 1).
    """

    name: str
    position: int | None
    seq_dim: int

    def find(self, args: tuple, kwargs: dict):
        """The (cos, sin) pair of a call, or None."""
        if self.name in kwargs:
            return kwargs[self.name]
        if self.position is not None and self.position < len(args):
            return args[self.position]
        return None

    def replace(self, args: tuple, kwargs: dict, table) -> tuple[tuple, dict]:
        if self.name in kwargs:
            return args, {**kwargs, self.name: table}
        return (*args[: self.position], table, *args[self.position + 1:]), kwargs


def merge_rotary(table: tuple[torch.Tensor, torch.Tensor], merge: TokenMerge, seq_dim: int,
                 rule: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each with S = T + N rows along `seq_dim` (T text rows first, then the N tokens of `merge`'s
    plan) -> the same with T + N' rows, by `rule` ("destination" or "mean")."""
    if rule not in POSITION_RULES:
        raise ValueError(f"rule must be one of {POSITION_RULES}, got {rule!r}")
    cos, sin = table
    if cos.shape != sin.shape:
        raise ValueError(f"rotary cos and sin must have one shape, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    plan = merge.plan
    moved = torch.cat([cos.movedim(seq_dim, 0), sin.movedim(seq_dim, 0)], dim=-1)  # (S, ..., 2D)
    rows, rest = moved.shape[0], moved.shape[1:]
    text = rows - plan.num_tokens
    if text < 0:
        raise ValueError(f"the rotary table has {rows} rows along dim {seq_dim}, fewer than the {plan.num_tokens} "
                         f"merged tokens")
    image = moved[text:].reshape(1, plan.num_tokens, -1)
    if rule == "destination":
        merged = plan.pick(image)
    else:
        merged = plan.merge(image)
    merged = torch.cat([moved[:text], merged.view(-1, *rest)])
    cos, sin = merged.chunk(2, dim=-1)
    if rule == "mean":  # back to rotations: (cos, sin) pairs of unit length (the mean of a full turn stays 0)
        scale = torch.rsqrt((cos.square() + sin.square()).clamp_min_(torch.finfo(cos.dtype).tiny))
        cos, sin = cos * scale, sin * scale
    return cos.movedim(0, seq_dim), sin.movedim(0, seq_dim)
