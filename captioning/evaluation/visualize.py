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
    """A grid of images, each titled with its caption per method and its reference text."""
    if not image_paths:
        return
    rows = math.ceil(len(image_paths) / columns)
    titles = []
    for i in range(len(image_paths)):
        lines = [f"{method}: {caps[i]}" for method, caps in captions.items()]
        if references is not None:
            lines.append(f"refs: {references[i]}")
        titles.append("\n".join(textwrap.fill(line, 44) for line in lines))
    # Room for the longest wrapped title above each image: 8 pt text at matplotlib's 1.2 line
    # spacing is 0.133 inch a line; 0.16 leaves room for the font's ascent and the title pad.
    image_h = 3.6
    title_h = 0.16 * max(t.count("\n") + 1 for t in titles) + 0.3
    fig_h = rows * (image_h + title_h)
    fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, fig_h), squeeze=False)
    fig.subplots_adjust(
        left=0.01,
        right=0.99,
        bottom=0.01,
        top=1 - title_h / fig_h,
        wspace=0.05,
        hspace=title_h / image_h,
    )
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= len(image_paths):
            continue
        ax.imshow(_load_image(image_paths[i]))
        title = titles[i]
        ax.set_title(title, fontsize=8, loc="left")
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_curves(path: str, history: Sequence[Mapping[str, float]], keys: Sequence[str]) -> None:
    """Train/validation loss per epoch, and one panel per history key in `keys` (e.g.
    eval_selection, train_reward); keys that no epoch has are left out."""
    keys = [k for k in keys if any(k in h for h in history)]
    if not history:
        return
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 1 + len(keys), figsize=(4.5 * (1 + len(keys)), 3.5), squeeze=False)
    ax_loss = axes[0, 0]
    ax_loss.plot(epochs, [h.get("train_loss", float("nan")) for h in history], "o-", label="train")
    if any("eval_loss" in h for h in history):
        ax_loss.plot(epochs, [h.get("eval_loss", float("nan")) for h in history], "o-", label="val")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax_loss.legend()
    for ax, key in zip(axes[0, 1:], keys, strict=True):
        ax.plot(epochs, [h.get(key, float("nan")) for h in history], "o-", color="C2")
        ax.set(xlabel="epoch", ylabel=key, title=key.replace("_", " "))
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def save_attention_maps(
    folder: str,
    image_paths: Sequence[str],
    tokens: np.ndarray,
    attention: np.ndarray,
    itos: Sequence[str],
    grid_shape: tuple[int, int],
    *,
    names: Sequence[str] | None = None,
    columns: int = 5,
    size: int = 224,
) -> list[str]:
    """One PNG per image: the caption, then the attention over the image for every word.

    The figure of Show, Attend and Tell: each word's attention weights (a grid_shape map) are
    upsampled (bicubic) to the image and overlaid on it, bright where the decoder looked.

    Args:
      folder: output folder (created); files are `names[i]` or `<index>_<image stem>.png`.
      image_paths: N image files.
      tokens: [N, T] int generated word ids (as decoded: `<end>` ends a caption).
      attention: [N, T, L] float attention of the step that produced each token, L = H * W.
      itos: id -> word (`Vocabulary.itos`).
      grid_shape: (H, W) of the feature map, row-major over the L locations.
      names: optional file names, one per image.
      columns: panels per row.
      size: the image is drawn as a size x size square, as the backbone saw it (the features are
        computed on a square resize, so the grid lines up with the squashed image).

    Returns the written file paths.
    """
    import os

    from captioning.data import text  # Special token ids only.

    height, width = grid_shape
    if attention.shape[-1] != height * width:
        raise ValueError(
            f"attention has {attention.shape[-1]} locations but grid_shape {grid_shape} has "
            f"{height * width}; pass the (H, W) of the spatial features."
        )
    os.makedirs(folder, exist_ok=True)
    written = []
    for i, image_path in enumerate(image_paths):
        words, maps = [], []
        for token, weights in zip(tokens[i], attention[i], strict=True):
            token = int(token)
            if token == text.END_ID:
                break
            if token in (text.PAD_ID, text.START_ID):
                continue
            words.append(itos[token] if 0 <= token < len(itos) else text.UNK)
            maps.append(np.asarray(weights, np.float32).reshape(height, width))
        image = np.asarray(
            Image.fromarray(_load_image(image_path)).resize((size, size), Image.BICUBIC)
        )
        panels = 1 + len(words)
        rows = math.ceil(panels / columns)
        fig, axes = plt.subplots(rows, columns, figsize=(2.4 * columns, 2.6 * rows), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        axes.flat[0].imshow(image)
        axes.flat[0].set_title(textwrap.fill(" ".join(words) or "(empty)", 28), fontsize=8)
        for ax, word, weights in zip(axes.flat[1:], words, maps, strict=False):
            # Scaled to the word's peak so every panel uses the full range; the peak weight is
            # in the title, since a flat map scaled up would otherwise look as sharp.
            upsampled = Image.fromarray(weights / max(weights.max(), 1e-12))
            upsampled = np.clip(np.asarray(upsampled.resize((size, size), Image.BICUBIC)), 0, 1)
            ax.imshow(image)
            ax.imshow(upsampled, cmap="gray", alpha=0.65, vmin=0.0, vmax=1.0)
            ax.set_title(f"{word} ({weights.max():.2f})", fontsize=9)
        fig.tight_layout()
        if names is not None:
            name = names[i]
        else:
            name = f"{i:03d}_{os.path.splitext(os.path.basename(image_path))[0]}.png"
        path = os.path.join(folder, name)
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    return written
