"""Figures: images with their captions (samples.png) and training curves (curves.png)."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # Headless: figures are files, never windows.
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


def _load_image(path: str) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError):  # Unreadable: draw a grey tile rather than fail the figure.
        return np.full((64, 64, 3), 128, np.uint8)


def save_samples(
    path: str,
    image_paths: Sequence[str],
    captions: Mapping[str, Sequence[str]],
    references: Sequence[str] | None = None,
    columns: int = 4,
) -> None:
    """A grid of images, each titled with its caption per method and one reference."""
    if not image_paths:
        return
    rows = math.ceil(len(image_paths) / columns)
    lines_per_image = len(captions) + (references is not None)
    fig, axes = plt.subplots(
        rows, columns, figsize=(4 * columns, (3.2 + 0.45 * lines_per_image) * rows), squeeze=False
    )
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= len(image_paths):
            continue
        ax.imshow(_load_image(image_paths[i]))
        lines = [f"{method}: {caps[i]}" for method, caps in captions.items()]
        if references is not None:
            lines.append(f"ref: {references[i]}")
        title = "\n".join(textwrap.fill(line, 44) for line in lines)
        ax.set_title(title, fontsize=8, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_curves(path: str, history: Sequence[Mapping[str, float]], val_metric: str) -> None:
    """Train/validation loss and the validation metric per epoch."""
    if not history:
        return
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax_loss.plot(epochs, [h["eval_loss"] for h in history], "o-", label="validation")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy per word", title="Loss")
    ax_loss.legend()
    key = f"eval_{val_metric}"
    ax_metric.plot(epochs, [h.get(key, float("nan")) for h in history], "o-", color="C2")
    ax_metric.set(xlabel="epoch", ylabel=val_metric, title=f"Validation {val_metric}")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
