"""Caption new images with a trained run: `python main.py --mode=caption --workdir=RUN --images=P`.

P is an image file, a folder (its .jpg/.jpeg/.png/.bmp/.gif/.webp files, sorted, not recursive) or
a glob pattern. Everything comes from the run directory, so the images see exactly what training
saw: the run's backbone and preprocessing (`config.encoder`), its feature statistics
(`feature_stats.npz`), vocabulary (`vocab.json`) and best checkpoint; `config.decode` picks the
decoding method. Captions are printed as `path<TAB>caption` lines and written as JSON (default
`RUN/captions/captions_<method>.json`). Each caption comes with how far its image's features lie
from the training images' (`evaluation.novelty`: a distance and its percentile among the
validation images); an image beyond the validation split's 99th percentile gets
`<TAB>[unlike the training images]` at the end of its printed line and `"unlike_training": true`.
An unreadable image is logged and listed in the JSON with its error; the other images are still
captioned. With `--config.eval.attention_maps=true` and an
attention decoder, one PNG per image shows the attention over the image for each word
(`RUN/captions/attention_<method>/`).
"""

from __future__ import annotations

import glob
import json
import os
import sys
from typing import Any

import ml_collections
from absl import logging

from captioning.decoding import decode
from captioning.evaluation.novelty import Novelty
from captioning.run_dir import RunDir

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
UNLIKE_MARK = "[unlike the training images]"  # Ends the printed line of a flagged image.


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


def _save_attention_maps(output, workdir, method, paths, tokens, attention, vocab, grid_shape):
    """config.eval.attention_maps: one PNG per image next to the captions -> {path: png}."""
    from captioning.evaluation import visualize

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

    Returns one dict per image in input order: {"path", "caption", "method", "novelty":
    {"distance", "percentile", "unlike_training"}}, or "error" (and caption None) for an image
    that could not be read. Also prints `path<TAB>caption` lines (`<TAB>UNLIKE_MARK` added for a
    flagged image) and writes the list, with the decoding settings, checkpoint step and the
    novelty threshold, to `output` (default `workdir/captions/captions_<method>.json`).
    """
    from captioning.data import backbone  # TensorFlow/Keras: imported when needed.

    run = RunDir(workdir)
    workdir = run.path
    paths = find_images(images)
    vocab, stats = run.vocab(), run.feature_stats()
    method = config.decode.method

    # Same backbone, weights, input size and init seed as the run's feature store.
    raw, ok_paths, failures = backbone.encode_images(
        paths, config.encoder, batch_size=int(config.encoder.batch_size), seed=config.seed
    )
    errors = dict(failures)
    for path, reason in failures:
        logging.warning("Cannot caption %s: %s", path, reason)

    captions: dict[str, str] = {}
    maps: dict[str, str] = {}
    novelty: dict[str, dict] = {}
    calibration = None
    step = None
    if ok_paths:
        run.check_channels(
            stats,
            raw.shape[-1],
            f"config.encoder ({config.encoder.backbone})",
            "caption with the run's own config (omit --config).",
        )
        which = config.eval.get("checkpoint", "best")
        graphdef, params, step, _ = run.restore(config.model, len(vocab), raw.shape[1:], which)
        decoded = decode.decode_split(
            decode.decode_fn(graphdef, config.decode, stats),
            params,
            raw,
            batch_size=config.decode.batch_size,
            seed=config.decode.seed,
        )
        captions = dict(zip(ok_paths, vocab.decode_batch(decoded.tokens), strict=True))
        distance = Novelty.for_run(run, config)
        novelty = dict(zip(ok_paths, distance.describe(distance.score(raw)), strict=True))
        calibration = {"calibrated": distance.calibrated, "threshold": distance.threshold}
        if config.eval.attention_maps:
            maps = _save_attention_maps(
                output,
                workdir,
                method,
                ok_paths,
                decoded.tokens,
                decoded.attention,
                vocab,
                raw.shape[1:-1],
            )

    results = []
    for path in paths:
        if path in captions:
            results.append(
                {
                    "path": path,
                    "caption": captions[path],
                    "method": method,
                    "novelty": novelty[path],
                }
            )
            if path in maps:
                results[-1]["attention_map"] = maps[path]
            mark = f"\t{UNLIKE_MARK}" if novelty[path]["unlike_training"] else ""
            print(f"{path}\t{captions[path]}{mark}", file=sys.stdout)
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
        "novelty": calibration,  # Threshold: the validation split's 99th percentile distance.
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
