"""Reference models the harness measures: their procedural data, analytic checkers and training (issue 28).

Shipped trained pipelines live in `WEIGHTS` (``<name>/``, loaded with `from_pretrained`)."""

from pathlib import Path

WEIGHTS = Path(__file__).parent / "weights"
