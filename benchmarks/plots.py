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


def speedup_vs_quality(table: pd.DataFrame, path: Path) -> Path | None:
    """Denoiser speed-up against prompt adherence and FID (trained models), each model's Pareto frontier drawn."""
    data = table.dropna(subset=["speedup_denoiser", "adherence"])
    if data.empty:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, metric, higher, name in ((axes[0], "adherence", True, "prompt adherence (higher is better)"),
                                     (axes[1], "fid", False, "FID vs the data (lower is better)")):
        for model, group in data.groupby("model"):
            for method, points in group.groupby("method"):
                ax.scatter(points["speedup_denoiser"], points[metric], label=f"{model} {method}", s=22)
            front = pareto_front(group["speedup_denoiser"].to_numpy(), group[metric].to_numpy(), higher)
            rows = group.iloc[front]
            ax.step(rows["speedup_denoiser"], rows[metric], where="post", color="k", lw=0.8, alpha=0.6)
            for _, row in rows.iterrows():
                ax.annotate(row["label"], (row["speedup_denoiser"], row[metric]), fontsize=5)
        ax.set(xlabel="denoiser speed-up vs baseline (same run)", ylabel=metric, title=name)
    axes[0].legend(fontsize=6)
    fig.suptitle("Speed-up vs image quality (learned weights); black: Pareto frontier")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def sample_path(out: Path, model: str, label: str) -> Path:
    """Where a job's first generated images (uint8, (n, H, W, 3)) are kept for the sample grid."""
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)
    return out / "samples" / model.replace("/", "_") / f"{slug}.npy"


def sample_grids(table: pd.DataFrame, out: Path) -> list[Path]:
    """Per model, one PNG: a row per method setting, the same prompts and seeds in every column."""
    made = []
    for model, group in table.groupby("model"):
        rows, names = [], []
        for _, row in group.iterrows():
            path = sample_path(out, model, row["label"])
            if path.exists():
                rows.append(np.load(path)[:8])
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
