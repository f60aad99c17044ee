"""PNG plots of a results table: speed-up vs ratio, MACs vs fidelity, per-step token counts."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def _label(row: pd.Series) -> str:
    return f"{row['model']} {row['method']} r={row['ratio']:g}"


def speedup_vs_ratio(table: pd.DataFrame, path: Path) -> Path | None:
    data = table.dropna(subset=["speedup_pipeline"])
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
            ax.annotate(f"{row['model']} r={row['ratio']:g}", (row["macs_image_total_T"], row["psnr_db"]), fontsize=6)
    ax.set(xlabel="TMACs per image (attention included)", ylabel="PSNR vs baseline (dB)", title="Cost vs fidelity")
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
        speedup_vs_ratio(table, out / "speedup_vs_ratio.png"),
        macs_vs_fidelity(table, out / "macs_vs_fidelity.png"),
        tokens_per_step(table, out / "tokens_per_step.png"),
    ]
    return [p for p in made if p is not None]
