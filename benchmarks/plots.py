"""PNG plots of a results table: speed-up vs quality with the Pareto frontier, sample grids, speed-up vs ratio,
MACs vs fidelity, per-step token counts."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def _label(row: pd.Series) -> str:
    return f"{row['model']} {row['label']}"


def pareto_front(speed: np.ndarray, score: np.ndarray, higher_is_better: bool = True) -> np.ndarray:
    """Indices of the points no other point beats on both speed-up and quality, by increasing speed-up."""
    quality = score if higher_is_better else -score
    order = np.lexsort((-quality, -speed))  # fastest first, best quality first among equals
    front, best = [], -np.inf
    for i in order:
        if quality[i] > best:
            front.append(i)
            best = quality[i]
    return np.array(front[::-1], dtype=int)


QUALITY_PANELS = (("adherence", "prompt adherence, %", True), ("detail", "detail vs the data, %", True),
                  ("kid", "KID vs the data (x1000)", False))


def speed_column(table: pd.DataFrame) -> str:
    """The measured denoiser speed-up where the table has one, else the MAC ratio."""
    return "speedup_denoiser" if table["speedup_denoiser"].notna().any() else "macs_speedup"


def speedup_vs_quality(table: pd.DataFrame, path: Path) -> Path | None:
    """Speed-up against adherence, detail and KID with their 95 % intervals (trained models), the Pareto frontier
    drawn; settings at equal quality to the baseline (non-inferiority) filled, the others hollow; points numbered,
    the numbers keyed beside the panels."""
    data = table.dropna(subset=["adherence"])
    if data.empty:
        return None
    models = list(dict.fromkeys(data["model"]))
    fig, axes = plt.subplots(len(models), len(QUALITY_PANELS) + 1, figsize=(17, 4.6 * len(models)), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 1, 1, 0.9]})
    colours = plt.get_cmap("tab10")
    for row_axes, model in zip(axes, models):
        group = data[data["model"] == model].reset_index(drop=True)
        speed = speed_column(group)
        methods = list(dict.fromkeys(group["method"]))
        at_equal = group["equal_quality"].astype(str) == "True"
        for ax, (metric, name, higher) in zip(row_axes, QUALITY_PANELS):
            for i, row in group.iterrows():
                colour = colours(methods.index(row["method"]) % 10)
                err = [[row[metric] - row[f"{metric}_low"]], [row[f"{metric}_high"] - row[metric]]]
                ax.errorbar(row[speed], row[metric], yerr=err, fmt="o", ms=6, capsize=2, lw=0.8, color=colour,
                            mfc=colour if at_equal[i] else "white")
                ax.annotate(str(i + 1), (row[speed], row[metric]), xytext=(4, 3), textcoords="offset points",
                            fontsize=7)
            front = group.iloc[pareto_front(group[speed].to_numpy(), group[metric].to_numpy(), higher)]
            ax.step(front[speed], front[metric], where="post", color="k", lw=0.7, alpha=0.5)
            base = group[group["method"] == "baseline"]
            if not base.empty:
                ax.axhline(base[metric].iloc[0], color="grey", ls="--", lw=0.7)
            ax.set_xlabel("denoiser speed-up (same run)" if speed == "speedup_denoiser" else "MACs speed-up")
            ax.set_ylabel(name)
            ax.set_title(f"{model}: {name.split(',')[0]} ({'higher' if higher else 'lower'} is better)", fontsize=9)
            ax.grid(alpha=0.3)
        key = row_axes[-1]
        key.axis("off")
        lines = [f"{i + 1:>2}  {textwrap.shorten(label, 58)}" for i, label in enumerate(group["label"])]
        key.text(0, 1, "\n".join(lines), va="top", family="monospace", fontsize=7, transform=key.transAxes)
        handles = [plt.Line2D([], [], marker="o", ls="", color=colours(k % 10), label=m) for k, m in enumerate(methods)]
        key.legend(handles=handles, loc="lower left", fontsize=7, frameon=False, ncol=2)
    fig.suptitle("Speed-up vs image quality on learned weights: 95 % intervals; filled = equal quality to the "
                 "baseline (non-inferiority); black: Pareto frontier; dashed: baseline", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def slug(label: str) -> str:
    """A setting's label as a file name."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)


def sample_path(out: Path, model: str, label: str) -> Path:
    """Where a job's first generated images (uint8, (n, H, W, 3)) are kept for the sample grid."""
    return out / "samples" / model.replace("/", "_") / f"{slug(label)}.npy"


def sample_grids(table: pd.DataFrame, out: Path) -> list[Path]:
    """Per model, one PNG: a row per method setting, the same prompts and seeds in every column (video models: the
    frames of the first video)."""
    made = []
    for model, group in table.groupby("model"):
        rows, names = [], []
        for _, row in group.iterrows():
            path = sample_path(out, model, row["label"])
            if path.exists():
                images = np.load(path)
                rows.append((images[0] if images.ndim == 5 else images)[:8])  # a video: the first one's frames
                names.append(row["label"])
        if not rows:
            continue
        n = min(len(r) for r in rows)
        fig, axes = plt.subplots(len(rows), n, figsize=(1.3 * n + 2.2, 1.35 * len(rows)), squeeze=False)
        for i, (images, name) in enumerate(zip(rows, names)):
            for j in range(n):
                axes[i, j].imshow(images[j], interpolation="nearest")
                axes[i, j].set_xticks([])
                axes[i, j].set_yticks([])
            # labels of composed settings run long: wrap them inside the left margin
            axes[i, 0].set_ylabel(textwrap.fill(name, 34), fontsize=6, rotation=0, ha="right", va="center")
        fig.suptitle(f"{model}: same prompts and seeds per column", fontsize=8)
        fig.tight_layout()
        target = out / f"samples_{model.replace('/', '_')}.png"
        fig.savefig(target, dpi=110)
        plt.close(fig)
        made.append(target)
    return made


def speedup_vs_ratio(table: pd.DataFrame, path: Path) -> Path | None:
    data = table[table["ratio"] > 0].dropna(subset=["speedup_pipeline"])
    if data.empty:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for (model, method), group in data.groupby(["model", "method"]):
        group = group.sort_values("ratio")
        ax.plot(group["ratio"], group["speedup_pipeline"], "o-", label=f"{model} {method} (pipeline)")
        ax.plot(group["ratio"], group["speedup_denoiser"], "x--", label=f"{model} {method} (denoiser)")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set(xlabel="merge ratio", ylabel="speed-up vs baseline (same run)", title="Speed-up")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def macs_vs_fidelity(table: pd.DataFrame, path: Path) -> Path | None:
    data = table[table["method"] != "baseline"].dropna(subset=["psnr_db"])
    if data.empty:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, group in data.groupby("method"):
        ax.scatter(group["macs_image_total_T"], group["psnr_db"], label=method)
        for _, row in group.iterrows():
            ax.annotate(_label(row), (row["macs_image_total_T"], row["psnr_db"]), fontsize=5)
    ax.set(xlabel="TMACs per image (attention included)", ylabel="PSNR vs baseline (dB)",
           title="Cost vs fidelity to the baseline (not image quality)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def tokens_per_step(table: pd.DataFrame, path: Path) -> Path | None:
    data = table.dropna(subset=["tokens_per_step"])
    if data.empty:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for _, row in data.iterrows():
        counts = json.loads(row["tokens_per_step"])
        for ax, role in zip(axes, ("attn", "mlp")):
            ax.plot(range(len(counts[role])), counts[role], ".-", label=_label(row))
    for ax, role in zip(axes, ("self-attention", "MLP")):
        ax.set(xlabel="denoising step", title=f"tokens entering {role} (mean over blocks)")
    axes[0].set_ylabel("tokens")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_all(table: pd.DataFrame, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    made = [
        speedup_vs_quality(table, out / "speedup_vs_quality.png"),
        speedup_vs_ratio(table, out / "speedup_vs_ratio.png"),
        macs_vs_fidelity(table, out / "macs_vs_fidelity.png"),
        tokens_per_step(table, out / "tokens_per_step.png"),
    ]
    return [p for p in made if p is not None] + sample_grids(table, out)
