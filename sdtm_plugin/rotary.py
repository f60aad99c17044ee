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


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary positions applied to queries or keys `x` (B, S, H, D), or (B, S, H·D) with heads flattened (Wan's
    norms), by per-row tables `cos`, `sin` (B or 1, S, D) in the interleaved-pair convention of FLUX and Wan
    (consecutive channels 2i, 2i + 1 rotate together; the tables repeat each angle twice). Computed in fp32."""
    flat = x.dim() == 3
    heads = x.unflatten(-1, (-1, cos.shape[-1])) if flat else x
    pairs = heads.float().unflatten(-1, (-1, 2))
    turned = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    out = (heads.float() * cos.unsqueeze(2) + turned * sin.unsqueeze(2)).to(x.dtype)
    return out.flatten(-2) if flat else out


class RowRotary:
    """The rotary tables of one attention call whose query rows are a selection of its tokens while its keys are all
    of them (token caching): the model's table is withheld from the attention processor and the patch rotates each
    query and key at the output of the module that makes it (`RotarySite`), with each row's own position.

    Args:
        table: the call's (cos, sin) over S = T + N rows (T text rows first), laid out as `arg` says.
        arg: where and how the table is passed.
        selection: the computed rows (`selection.RowSelection`) of the N image tokens.
    """

    def __init__(self, table: tuple[torch.Tensor, torch.Tensor], arg: RotaryArg, selection) -> None:
        cos, sin = table
        if cos.shape != sin.shape:
            raise ValueError(f"rotary cos and sin must have one shape, got {tuple(cos.shape)} and {tuple(sin.shape)}")
        rows = cos.shape[arg.seq_dim]
        self._cos, self._sin = (t.movedim(arg.seq_dim, 0).reshape(rows, -1) for t in (cos, sin))  # (S, D)
        self.text = rows - selection.num_tokens
        if self.text < 0:
            raise ValueError(f"the rotary table has {rows} rows, fewer than the {selection.num_tokens} image tokens")
        self.selection = selection
        self._tables: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def tables(self, side: str, rows: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each (B or 1, S', D), of the `side` ("query" / "key") rows of a `rows` sequence ("image",
        "text", or "joint" = [text; image])."""
        key = (side, rows)
        if key not in self._tables:
            self._tables[key] = tuple(self._part(t, side, rows) for t in (self._cos, self._sin))
        return self._tables[key]

    def _part(self, table: torch.Tensor, side: str, rows: str) -> torch.Tensor:
        text, image = table[: self.text], table[self.text:]
        if rows == "text":
            return text[None]
        if side == "key":
            return (image if rows == "image" else table)[None]
        chosen = self.selection.take(image)  # (B, A, D): each image's computed rows
        if rows == "image":
            return chosen
        return torch.cat([text.expand(chosen.shape[0], -1, -1), chosen], dim=1)

    def rotate(self, x: torch.Tensor, side: str, rows: str) -> torch.Tensor:
        cos, sin = self.tables(side, rows)
        return rotate(x, cos, sin)
