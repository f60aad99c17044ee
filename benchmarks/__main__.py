"""``python -m benchmarks``: the harness (`benchmarks.cli`)."""

from .cli import main

main()
