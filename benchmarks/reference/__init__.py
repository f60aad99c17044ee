"""Reference models the harness measures: their procedural data, analytic checkers and training (issue 28)."""
