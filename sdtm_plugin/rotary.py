"""Rotary positions of merged and selected rows: what position a token's query and key are rotated to.

Rotary models (FLUX, Wan) rotate each token's query and key by angles of its position, from one (cos, sin) table
that the model computes once per forward and hands to every block. A merged row stands for a group of tokens, so
it needs a position of its own. Two rules:

- ``"destination"``: the row takes the angles of its group's first token (a bipartite merge's destination, an SSM
  window's first token): an exact position of the image, the merged token placed where it is kept.
- ``"mean"``: the circular mean of its tokens' angles: cos and sin are merged like the tokens (their means), and
  each (cos, sin) pair is rescaled to unit length, so the row is still a rotation (by the mean angle of the group,
  per frequency). The default: on the trained FLUX-architecture reference it matched "destination" with SDTM*-a
  and made ToMe's images much closer to the data (KID, FID) at the same adherence (docs/compatibility.md).

Merges are planned per image, so the tables of merged rows differ per image: the model's table is withheld from the
attention processor (which takes one table for the batch) and the patch rotates each query and key per row where
the attention makes them (`RowRotary`, at the q/k norms). Text rows (FLUX's joint sequence puts the text first) are
never merged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

POSITION_RULES = ("destination", "mean")


@dataclass(frozen=True)
class RotaryArg:
    """Where a merged sub-layer receives its rotary table and how the table is laid out.

    Attributes:
        name: the keyword of the (cos, sin) pair in the sub-layer's forward.
        position: its positional index, when passed positionally (Wan's blocks call ``attn1(x, None, None, rotary)``).
        seq_dim: the sequence axis of cos and sin (FLUX: (S, D), axis 0; Wan: (1, S, 1, D), axis 1).
        pairs: ``table -> (cos, sin)`` for models whose table is another form (Qwen-Image: complex image and text
            tables, `complex_pairs`); None: the argument is the (cos, sin) pair.
        per_image: the table is complex, (B, S, D/2), one per image, over [image; text] (Z-Image), and the processor
            rotates queries and keys with it: a merged call gets the table of its merged rows instead
            (`merged_complex_table`), so nothing is rotated outside the processor.
    """

    name: str
    position: int | None
    seq_dim: int
    pairs: Callable[[Any], tuple[torch.Tensor, torch.Tensor]] | None = None
    per_image: bool = False

    def find(self, args: tuple, kwargs: dict):
        """The (cos, sin) pair of a call, or None."""
        if self.name in kwargs:
            table = kwargs[self.name]
        elif self.position is not None and self.position < len(args):
            table = args[self.position]
        else:
            return None
        return self.pairs(table) if self.pairs is not None and table is not None else table

    def replace(self, args: tuple, kwargs: dict, table) -> tuple[tuple, dict]:
        if self.name in kwargs:
            return args, {**kwargs, self.name: table}
        return (*args[: self.position], table, *args[self.position + 1:]), kwargs


def complex_pairs(table: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen-Image's table, complex (image (N, D/2), text (T, D/2)) rotations of consecutive channel pairs, as
    (cos, sin) (T + N, D) over [text; image] in the interleaved convention of `rotate`."""
    image, text = table
    freqs = torch.cat([text, image], dim=0)
    return freqs.real.repeat_interleave(2, -1), freqs.imag.repeat_interleave(2, -1)


def merged_complex_table(table: torch.Tensor, merge, rule: str) -> torch.Tensor:
    """A per-image complex table (B, N + T, D/2) over [image; text] -> (B, N' + T, D/2): the image rows merged as
    `merge` merges the tokens, each group's rotation by `rule` ("mean": the unit-length mean, "destination": its
    first token's), the text rows kept."""
    n = merge.num_tokens
    image = torch.view_as_real(table[:, :n]).flatten(-2)  # (B, N, D): interleaved (cos, sin) pairs
    merged = merge.pick(image) if rule == "destination" else merge.merge(image)
    pairs = merged.float().unflatten(-1, (-1, 2))
    if rule != "destination":
        pairs = pairs * torch.rsqrt(pairs.square().sum(-1, keepdim=True).clamp_min(torch.finfo(pairs.dtype).tiny))
    return torch.cat([torch.view_as_complex(pairs.contiguous()).to(table.dtype), table[:, n:]], dim=1)


def _unit_pairs(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (cos, sin) pairs back to rotations: unit length (the mean of a full turn stays 0)."""
    scale = torch.rsqrt((cos.square() + sin.square()).clamp_min_(torch.finfo(cos.dtype).tiny))
    return cos * scale, sin * scale


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
    """The rotary tables of one attention call whose rows are not the tokens' own: its query rows a selection of them
    (token caching, `side` "query"), its key rows merged groups (SDTM with ``merge_queries=False``, `side` "key"), or
    both merged groups (SDTM, ToMe: `side` "both"). The model's table is withheld from the attention processor and
    the patch rotates each query and key at the output of the module that makes it (`RotarySite`), each row by its
    own position: a selected token's, or a merged group's by `rule`; per image, as the merges are.

    Args:
        table: the call's (cos, sin) over S = T + N rows (T text rows first), laid out as `arg` says.
        arg: where and how the table is passed.
        merge: the selection (`selection.RowSelection`) or merge (`merge.TokenMerge`) of the N image tokens.
        side: the side it reduces.
        rule: a merged group's position (`POSITION_RULES`), for sides "key" and "both".
    """

    def __init__(self, table: tuple[torch.Tensor, torch.Tensor], arg: RotaryArg, merge, side: str,
                 rule: str | None = None) -> None:
        cos, sin = table
        if cos.shape != sin.shape:
            raise ValueError(f"rotary cos and sin must have one shape, got {tuple(cos.shape)} and {tuple(sin.shape)}")
        if side not in ("query", "key", "both") or (side != "query" and rule not in POSITION_RULES):
            raise ValueError(f"side must be 'query', 'key' or 'both' (the last two with a rule of {POSITION_RULES}), "
                             f"got {side!r}, {rule!r}")
        rows = cos.shape[arg.seq_dim]
        self._cos, self._sin = (t.movedim(arg.seq_dim, 0).reshape(rows, -1) for t in (cos, sin))  # (S, D)
        self.text = rows - merge.num_tokens
        if self.text < 0:
            raise ValueError(f"the rotary table has {rows} rows, fewer than the {merge.num_tokens} image tokens")
        self.merge, self.side, self.rule = merge, side, rule
        self._tables: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def tables(self, side: str, rows: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each (B or 1, S', D), of the `side` ("query" / "key") rows of a `rows` sequence ("image",
        "text", or "joint" = [text; image])."""
        key = (side, rows)
        if key not in self._tables:
            text = (self._cos[: self.text][None], self._sin[: self.text][None])
            if rows == "text":
                self._tables[key] = text
            elif side != self.side and self.side != "both":  # the whole side: every token at its own position
                start = self.text if rows == "image" else 0
                self._tables[key] = (self._cos[start:][None], self._sin[start:][None])
            else:
                image = self._reduced_image()
                if rows == "joint":
                    batch = image[0].shape[0]
                    image = tuple(torch.cat([t.expand(batch, -1, -1), i], dim=1) for t, i in zip(text, image))
                self._tables[key] = image
        return self._tables[key]

    def _reduced_image(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each (B, N', D), of the reduced side's image rows (made once per call)."""
        cos, sin = self._cos[self.text:], self._sin[self.text:]
        if self.side == "query":  # each image's computed tokens
            return self.merge.take(cos), self.merge.take(sin)
        both = torch.cat([cos, sin], dim=-1).expand(self.merge.batch_size, -1, -1)
        merged = self.merge.pick(both) if self.rule == "destination" else self.merge.merge(both)
        cos, sin = merged.chunk(2, dim=-1)
        return _unit_pairs(cos, sin) if self.rule == "mean" else (cos, sin)

    def rotate(self, x: torch.Tensor, side: str, rows: str) -> torch.Tensor:
        """Queries or keys `x` of a `rows` sequence rotated; "image_text" ([image; text], HunyuanVideo's): the
        image rows only."""
        if rows == "image_text":
            cos, sin = self.tables(side, "image")
            n = cos.shape[1]
            return torch.cat([rotate(x[:, :n], cos, sin), x[:, n:]], dim=1)
        cos, sin = self.tables(side, rows)
        return rotate(x, cos, sin)
