"""Images unlike the training data: do captions loop, and are the images flagged?

    python -m captioning.tools.offdist --workdir=runs/scenes [--num_random=100] [--seed=0]

Writes the five images of issue #35 (a dark image without shapes, a white background with a red
circle, random noise, a 1-pixel image, a photo-like gradient) and `--num_random` random ones
(noise, flat colours, gradients, noise with photographs' 1/f spectrum and colour statistics; sizes
from 1x1 to 4000x300) to `<workdir>/offdist/images/`, captions them through `--mode=caption`'s
path (`caption.caption_images`) with greedy, beam and sampling, each with `decode.block_repeats`
off (as the model says it) and on (the default), and prints one JSON object: per decoding, how many
captions loop (a word three times in a row or a repeated trigram) among the listed and the random
images, the share of images flagged unlike the training images, the listed images' captions, and
the flagged share of the run's evaluated splits (eval/<split>_greedy.json).
"""

from __future__ import annotations

import json
import os

import numpy as np
from absl import app, flags
from PIL import Image, ImageDraw

ODD_SIZES = ((1, 1), (2, 2), (1, 300), (4000, 300), (300, 4000), (7, 513), (3000, 40), (33, 33))
KINDS = ("noise", "flat", "gradient", "photo_stats")


def has_loop(caption: str) -> bool:
    """A word three times in a row, or a trigram said twice."""
    words = caption.split()
    trigrams = list(zip(words, words[1:], words[2:], strict=False))
    return len(set(trigrams)) < len(trigrams) or any(a == b == c for a, b, c in trigrams)


def listed_images() -> dict[str, np.ndarray]:
    """The five images of the issue: name -> [H, W, 3] uint8."""
    yy, xx = np.mgrid[0:192, 0:256] / np.array([191.0, 255.0])[:, None, None]
    sky, ground = np.array([120, 170, 230]), np.array([110, 85, 55])
    gradient = (yy[..., None] * ground + (1 - yy[..., None]) * sky) * (0.85 + 0.15 * xx[..., None])
    circle = Image.new("RGB", (128, 128), (255, 255, 255))
    ImageDraw.Draw(circle).ellipse((34, 34, 94, 94), fill=(230, 40, 40))
    return {
        "dark_no_shapes": np.full((128, 128, 3), 12, np.uint8),
        "white_red_circle": np.asarray(circle),
        "noise": np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8),
        "one_pixel": np.full((1, 1, 3), 128, np.uint8),
        "gradient_photo_like": np.clip(gradient, 0, 255).astype(np.uint8),
    }


def _photo_stats(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Noise with a 1/f amplitude spectrum (as photographs have) and photographs' mean colour and
    contrast -> [H, W, 3] float."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    amplitude = 1.0 / np.maximum(np.hypot(fy, fx), 1.0 / max(height, width))
    channels = []
    for _ in range(3):
        phase = np.exp(2j * np.pi * rng.random(amplitude.shape))
        channel = np.fft.irfft2(amplitude * phase, s=(height, width))
        channels.append((channel - channel.mean()) / (channel.std() + 1e-9))
    mixed = np.stack(channels, -1) @ np.array([[1, 0.8, 0.6], [0, 0.4, 0.4], [0, 0, 0.4]])
    return np.array([118, 112, 102]) + 55 * mixed


def random_image(rng: np.random.Generator, kind: str, height: int, width: int) -> np.ndarray:
    """One random image of `kind` (KINDS) -> [H, W, 3] uint8."""
    if kind == "noise":
        style = rng.integers(3)
        if style == 0:
            pixels = rng.integers(0, 256, (height, width, 3))
        elif style == 1:
            pixels = rng.normal(rng.uniform(30, 220, 3), rng.uniform(5, 80), (height, width, 3))
        else:
            pixels = np.where(rng.random((height, width, 1)) < 0.5, 0, 255) * np.ones(3)
    elif kind == "flat":
        pixels = np.ones((height, width, 3)) * rng.integers(0, 256, 3)
    elif kind == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:height, 0:width]
        t = np.cos(angle) * xx / max(width, 1) + np.sin(angle) * yy / max(height, 1)
        t = (t - t.min()) / (np.ptp(t) + 1e-9)
        a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        pixels = a + t[..., None] * (b - a)
    else:
        pixels = _photo_stats(rng, height, width)
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def random_images(count: int, seed: int) -> dict[str, np.ndarray]:
    """`count` random images: kinds in turn; every fourth has an odd size (ODD_SIZES, in turn),
    the others 32..640 pixels a side."""
    rng = np.random.default_rng(seed)
    images = {}
    for i in range(count):
        kind = KINDS[i % len(KINDS)]
        if i % 4 == 3:
            width, height = ODD_SIZES[(i // 4) % len(ODD_SIZES)]
        else:
            width, height = (int(v) for v in rng.integers(32, 641, 2))
        images[f"random_{i:03d}_{kind}_{width}x{height}"] = random_image(rng, kind, height, width)
    return images


def write_images(folder: str, images: dict[str, np.ndarray]) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    paths = []
    for name, pixels in images.items():
        paths.append(os.path.join(folder, f"{name}.png"))
        Image.fromarray(pixels).save(paths[-1])
    return paths


def summarize(captions: list[dict], listed: set[str]) -> dict[str, object]:
    """caption_images' results -> loops and flagged counts, listed vs random images."""
    out: dict[str, object] = {}
    for group in ("listed", "random"):
        rows = [
            c
            for c in captions
            if c["caption"] is not None and (c["path"] in listed) == (group == "listed")
        ]
        out[f"{group}_images"] = len(rows)
        out[f"{group}_loops"] = sum(has_loop(c["caption"]) for c in rows)
        out[f"{group}_flagged"] = sum(bool(c["novelty"]["unlike_training"]) for c in rows)
    return out


def offdist(workdir: str, num_random: int = 100, seed: int = 0) -> dict[str, object]:
    """Writes the images, captions them six ways -> the report (see the module docstring)."""
    from captioning import caption
    from captioning.run_dir import RunDir

    run = RunDir(workdir)
    folder = run.file(os.path.join("offdist", "images"))
    listed = write_images(folder, listed_images())
    write_images(folder, random_images(num_random, seed))
    report: dict[str, object] = {"workdir": run.path, "decodings": {}}
    for method in ("greedy", "beam", "sample"):
        for blocked in (False, True):
            config = run.config()
            config.decode.method, config.decode.block_repeats = method, blocked
            name = method + ("" if blocked else "_unblocked")
            output = run.file(os.path.join("offdist", f"captions_{name}.json"))
            captions = caption.caption_images(config, run.path, folder, output=output)
            summary = summarize(captions, set(listed))
            summary["listed_captions"] = {
                os.path.basename(c["path"]): c["caption"] for c in captions if c["path"] in listed
            }
            report["decodings"][name] = summary
    report["flagged_share"] = {}
    for name in sorted(os.listdir(run.file("eval"))) if run.has("eval") else []:
        if name.endswith("_greedy.json"):
            flagged = run.read_json(os.path.join("eval", name)).get("novelty", {})
            report["flagged_share"][name[: -len("_greedy.json")]] = flagged.get("flagged_share")
    return report


def main(argv):
    del argv
    args = flags.FLAGS
    if not args.workdir:
        raise app.UsageError("--workdir=<a finished run> is required.")
    report = offdist(args.workdir, args.num_random, args.seed)
    run_json = os.path.join(os.path.abspath(args.workdir), "offdist", "report.json")
    with open(run_json, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    # Defined here, not on import: the tests import several tools into one process.
    flags.DEFINE_string("workdir", None, "A finished run's folder.")
    flags.DEFINE_integer("num_random", 100, "Random images besides the listed five.")
    flags.DEFINE_integer("seed", 0, "Seed of the random images.")
    app.run(main)
