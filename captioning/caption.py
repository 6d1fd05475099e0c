"""Caption new images with a trained run: `python main.py --mode=caption --workdir=RUN --images=P`.

P is an image file, a folder (its .jpg/.jpeg/.png/.bmp/.gif/.webp files, sorted, not recursive) or
a glob pattern. Everything comes from the run directory, so the images see exactly what training
saw: the run's backbone and preprocessing (`config.encoder`), its feature statistics
(`feature_stats.npz`), vocabulary (`vocab.json`) and best checkpoint; `config.decode` picks the
decoding method. Captions are printed as `path<TAB>caption` lines and written as JSON (default
`RUN/captions/captions_<method>.json`). An unreadable image is logged and listed in the JSON with
its error; the other images are still captioned. With `--config.eval.attention_maps=true` and an
attention decoder, one PNG per image shows the attention over the image for each word
(`RUN/captions/attention_<method>/`).
"""

from __future__ import annotations

import glob
import json
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from captioning import decode, input_pipeline, text, train

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


def find_images(images: str) -> list[str]:
    """An image file, a folder (its image files, sorted) or a glob -> list of file paths.

    Raises FileNotFoundError naming `images` when nothing matches.
    """
    pattern = os.path.expanduser(images)
    if os.path.isfile(pattern):
        return [pattern]
    if os.path.isdir(pattern):
        paths = [
            os.path.join(pattern, name)
            for name in sorted(os.listdir(pattern))
            if name.lower().endswith(IMAGE_EXTENSIONS)
            and os.path.isfile(os.path.join(pattern, name))
        ]
        where = f"folder {images!r} has no {'/'.join(IMAGE_EXTENSIONS)} files"
    else:
        # A glob names its files explicitly, so any extension it matches is tried.
        paths = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
        where = f"no file matches {images!r}"
    if not paths:
        raise FileNotFoundError(
            f"--images={images}: {where}; give an image file, a folder of images or a glob "
            "such as 'photos/*.jpg'."
        )
    return paths


def load_feature_stats(workdir: str) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) per feature channel that the run normalized its training features with."""
    path = os.path.join(workdir, "feature_stats.npz")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} not found: --workdir must be a run directory written by training."
        )
    stats = np.load(path)
    return stats["mean"].astype(np.float32), stats["std"].astype(np.float32)


def _decode_batches(
    decode_callable, params, features: np.ndarray, decode_config
) -> tuple[np.ndarray, np.ndarray]:
    """features [N, ...] -> (tokens [N, max_len], attention [N, max_len, L]), in batches of one
    fixed size (compiled once)."""
    # Never pad a handful of images up to a large configured batch: min(batch_size, N).
    batch_size = max(1, min(int(decode_config.batch_size), len(features)))
    sample_key = None
    if decode_config.method == "sample":
        sample_key = jax.random.key(int(decode_config.get("seed", 0)))
    tokens, attention = [], []
    batches = input_pipeline.padded_image_batches(len(features), batch_size)
    for index, (rows, valid) in enumerate(batches):
        batch = jnp.asarray(features[rows])
        if sample_key is None:
            out = decode_callable(params, batch)
        else:  # Independent draws per batch, reproducible from the seed.
            out = decode_callable(params, batch, key=jax.random.fold_in(sample_key, index))
        tokens.append(np.asarray(out.tokens)[:valid])
        attention.append(np.asarray(out.attention)[:valid])
    return np.concatenate(tokens), np.concatenate(attention)


def _save_attention_maps(output, workdir, method, paths, tokens, attention, vocab, grid_shape):
    """config.eval.attention_maps: one PNG per image next to the captions -> {path: png}."""
    from captioning import visualize

    if attention.shape[-1] == 0 or len(grid_shape) != 2:
        logging.warning("eval.attention_maps: the run's decoder has no attention; no maps drawn.")
        return {}
    folder = os.path.join(
        os.path.dirname(os.path.abspath(output)) if output else os.path.join(workdir, "captions"),
        f"attention_{method}",
    )
    names = [f"{i:03d}_{os.path.splitext(os.path.basename(p))[0]}.png" for i, p in enumerate(paths)]
    files = visualize.save_attention_maps(
        folder, paths, tokens, attention, vocab.itos, grid_shape, names=names
    )
    logging.info("Attention maps of %d images -> %s", len(files), folder)
    return dict(zip(paths, files, strict=True))


def caption_images(
    config: ml_collections.ConfigDict,
    workdir: str,
    images: str,
    *,
    output: str | None = None,
) -> list[dict[str, Any]]:
    """Captions the images named by `images` (file, folder or glob) with the run in `workdir`.

    Returns one dict per image in input order: {"path", "caption", "method"}, plus "error" (and
    caption None) for an image that could not be read. Also prints `path<TAB>caption` lines and
    writes the list, with the decoding settings and checkpoint step, to `output` (default
    `workdir/captions/captions_<method>.json`).
    """
    from captioning import features as features_lib  # TensorFlow/Keras: imported when needed.

    workdir = os.path.abspath(os.path.expanduser(workdir))
    paths = find_images(images)
    vocab = text.Vocabulary.load(os.path.join(workdir, "vocab.json"))
    mean, std = load_feature_stats(workdir)
    method = config.decode.method

    # Same backbone, weights, input size and init seed as the run's feature store.
    raw, ok_paths, failures = features_lib.encode_images(
        paths, config.encoder, batch_size=int(config.encoder.batch_size), seed=config.seed
    )
    errors = dict(failures)
    for path, reason in failures:
        logging.warning("Cannot caption %s: %s", path, reason)

    captions: dict[str, str] = {}
    maps: dict[str, str] = {}
    step = None
    if ok_paths:
        if raw.shape[-1] != mean.shape[-1]:
            raise ValueError(
                f"{workdir}/feature_stats.npz has {mean.shape[-1]} channels but config.encoder "
                f"({config.encoder.backbone}) gives {raw.shape[-1]}: caption with the run's own "
                "config (omit --config)."
            )
        features = ((raw.astype(np.float32) - mean) / std).astype(np.float32)
        graphdef, params, step = train.build_inference(
            config, workdir, len(vocab), features.shape[1:]
        )
        decode_callable = decode.decode_fn(graphdef, config.decode)
        tokens, attention = _decode_batches(decode_callable, params, features, config.decode)
        captions = dict(zip(ok_paths, vocab.decode_batch(tokens), strict=True))
        if config.eval.get("attention_maps", False):
            maps = _save_attention_maps(
                output, workdir, method, ok_paths, tokens, attention, vocab, features.shape[1:-1]
            )

    results = []
    for path in paths:
        if path in captions:
            results.append({"path": path, "caption": captions[path], "method": method})
            if path in maps:
                results[-1]["attention_map"] = maps[path]
            print(f"{path}\t{captions[path]}", file=sys.stdout)
        else:
            reason = errors.get(path, "not returned by the image encoder")
            results.append({"path": path, "caption": None, "method": method, "error": reason})
    sys.stdout.flush()

    if output is None:
        output = os.path.join(workdir, "captions", f"captions_{method}.json")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    report = {
        "workdir": workdir,
        "images": images,
        "step": None if step is None else int(step),
        "decode": config.decode.to_dict(),
        "captions": results,
    }
    with open(output, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    logging.info(
        "Captioned %d of %d images (%d unreadable) -> %s",
        len(captions),
        len(paths),
        len(paths) - len(captions),
        output,
    )
    return results
