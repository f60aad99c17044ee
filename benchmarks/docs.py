"""Regenerate the generated parts of the docs: tables from the code and from a run's results, and the figures.

    python -m benchmarks.docs                                # MAC tables (meta device, a few minutes on CPU)
    python -m benchmarks.docs --frontier outputs/frontier    # + the report-set results and figures of that run
    python -m benchmarks.docs --frontier outputs/tc --section token-caching   # a partial frontier (--only): its
                                                             # own blocks (frontier-token-caching, ...) and figures
    python -m benchmarks.docs --scale outputs/s256 outputs/s1024   # the same settings at 256 and 1,024 tokens

A generated block sits between a ``<!-- generated: NAME -->`` line and a ``<!-- /generated: NAME -->`` line;
everything else in the docs is written by hand. `tests/test_docs.py` fails when the MAC table drifts from the code.
"""

from __future__ import annotations

import argparse
import re
import shutil
import tempfile
from pathlib import Path

from .cli import main as benchmark


ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
IMAGES = DOCS / "img"
MAX_FIGURE_BYTES = 200 * 1024

# full-size MACs of one transformer forward at 1024^2 with classifier-free guidance (batch 2)
MAC_SETTINGS = {"sd3-medium": ["baseline", "sdtm", "sdtm:ratio=0.35,protect_steps_frequency=-1"],
                "pixart-xl-2-1024": ["baseline", "sdtm", "sdtm:ratio=0.35,protect_steps_frequency=-1"]}


def replace_block(text: str, name: str, content: str) -> str:
    """`text` with the generated block `name` replaced by `content` (the block must exist)."""
    pattern = re.compile(rf"(<!-- generated: {re.escape(name)} -->\n).*?(<!-- /generated: {re.escape(name)} -->)",
                         re.S)
    if not pattern.search(text):
        raise ValueError(f"no generated block {name!r} (<!-- generated: {name} --> ... <!-- /generated: {name} -->)")
    return pattern.sub(lambda m: m.group(1) + content.rstrip("\n") + "\n" + m.group(2), text)


def read_block(text: str, name: str) -> str:
    match = re.search(rf"<!-- generated: {re.escape(name)} -->\n(.*?)<!-- /generated: {re.escape(name)} -->", text,
                      re.S)
    if match is None:
        raise ValueError(f"no generated block {name!r}")
    return match.group(1)


def mac_table() -> str:
    """Markdown: linear-only and total TMACs per forward for `MAC_SETTINGS`, beside the paper's figures."""
    from .macs import PAPER_TMACS

    rows = []
    with tempfile.TemporaryDirectory() as out:
        for model, methods in MAC_SETTINGS.items():
            table = benchmark(["--macs-only", "--model", model, "--method", *methods, "--out", f"{out}/{model}",
                               "--log-level", "ERROR"])
            rows += table.to_dict("records")
    lines = ["| model | setting | steps | paper (linear) | linear | total (attention included) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        paper = PAPER_TMACS.get((row["model"], row["label"]))
        lines.append(f"| {row['model']} | {row['label']} | {row['steps']} | {f'{paper:.2f} T' if paper else '—'} | "
                     f"{row['macs_forward_linear_G'] / 1e3:.3f} T | {row['macs_forward_total_G'] / 1e3:.3f} T |")
    return "\n".join(lines) + "\n"


# the merge path's own MACs against what merging saves: the default (128-channel sketches), exact global matching
# (the paper's), window-local matching and narrower sketches
SHARE_MODELS = ["pixart-xl-2-1024", "pixart-sigma-xl-2-2k"]
SHARE_METHODS = ["baseline", "sdtm", "sdtm:match_dim=null", "sdtm:match_radius=1", "sdtm:match_radius=2",
                 "sdtm:match_dim=64"]


def merge_share_table() -> str:
    """Markdown: per model and matching, the merge path's MACs per forward (averaged over the steps) as a share of
    the MACs the merged model's own ops save."""
    with tempfile.TemporaryDirectory() as out:
        table = benchmark(["--macs-only", "--model", *SHARE_MODELS, "--method", *SHARE_METHODS, "--out", out,
                           "--log-level", "ERROR"])
    lines = ["| model | setting | total per forward | merge path | saved by the model's ops | merge share |",
             "| --- | --- | --- | --- | --- | --- |"]
    for model, rows in table.groupby("model", sort=False):
        base = rows.loc[rows["method"] == "baseline", "macs_forward_total_G"].iloc[0]
        for _, row in rows[rows["method"] != "baseline"].iterrows():
            merge = row["macs_merge_G"]
            saved = base - (row["macs_forward_total_G"] - merge)
            lines.append(f"| {model} | {row['label']} | {row['macs_forward_total_G']:.1f} G | {merge:.2f} G | "
                         f"{saved:.1f} G | {merge / saved:.2%} |")
    return "\n".join(lines) + "\n"


def _shrink(source: Path, target: Path) -> Path:
    """Copy a PNG into the docs, re-encoded with fewer colours until it is at most `MAX_FIGURE_BYTES`."""
    from PIL import Image

    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    image = Image.open(source).convert("RGB")
    for colours, scale in ((256, 1.0), (128, 1.0), (64, 0.85), (32, 0.7)):
        if target.stat().st_size <= MAX_FIGURE_BYTES:
            break
        size = (int(image.width * scale), int(image.height * scale))
        image.resize(size, Image.LANCZOS).quantize(colours).save(target, optimize=True)
    return target


def figures(run: Path, suffix: str = "") -> list[Path]:
    """The speed-quality plane and the sample grid of a frontier run, into docs/img (names ending in `suffix`)."""
    return [_shrink(run / "report" / f"{name}.png", IMAGES / f"{name}{suffix}.png")
            for name in ("speedup_vs_quality", "samples_pixart-shapes")]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.docs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--frontier", type=Path, default=None, help="a `python -m benchmarks.frontier` output folder")
    parser.add_argument("--section", default=None,
                        help="write a partial frontier's tables into the blocks NAME-SECTION (frontier-SECTION, ...) "
                             "and its figures as FIGURE-SECTION.png, leaving the full frontier's in place")
    parser.add_argument("--scale", type=Path, nargs="+", default=None, metavar="RUN",
                        help="runs of the same settings on reference models of different token counts (each with "
                             "report/ and speed/ folders): the block 'scale'")
    args = parser.parse_args(argv)
    suffix = f"-{args.section}" if args.section else ""
    results = DOCS / "results.md"
    text = replace_block(results.read_text(), "macs", mac_table())
    merge_path = DOCS / "merge_path.md"
    merge_path.write_text(replace_block(merge_path.read_text(), "merge-share", merge_share_table()))
    if args.frontier is not None:
        from .frontier import report_tables, tune_table

        text = replace_block(text, "tune" + suffix, tune_table(args.frontier))
        tables = report_tables(args.frontier)
        readme = ROOT / "README.md"
        readme.write_text(replace_block(readme.read_text(), "summary" + suffix, tables.pop("summary")))
        for name, content in tables.items():
            text = replace_block(text, name + suffix, content)
        for path in figures(args.frontier, suffix):
            print(f"wrote {path} ({path.stat().st_size // 1024} KB)")
    if args.scale:
        from .frontier import scale_table

        text = replace_block(text, "scale", scale_table(args.scale))
    results.write_text(text)
    print(f"wrote {results}")


if __name__ == "__main__":
    main()
