"""A short training run on a tiny Flickr8k-layout folder: the real-data path end to end.

Uses real caption lines from ../shared/data/flickr8k_text when present (made-up ones otherwise),
Pillow-drawn JPEGs, one corrupt image, a tiny GloVe file and random-weight InceptionV3 features.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import saved_params
from PIL import Image

from captioning import cli
from captioning.data import backbone, text
from configs import flickr8k as flickr8k_config

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k_text"


def _captions(names):
    if SHARED.is_dir():
        wanted, found = set(names), {}
        with open(SHARED / "Flickr8k.token.txt", encoding="utf-8") as f:
            for line in f:
                key, caption = line.rstrip("\n").split("\t")
                image = key.split("#")[0]
                if image in wanted:
                    found.setdefault(image, []).append(caption)
        return found
    return {n: [f"a dog runs on the grass number {k}" for k in "abcde"] for n in names}


def _make_layout(root: Path) -> dict[str, list[str]]:
    if SHARED.is_dir():
        read = lambda name: (SHARED / name).read_text().split()  # noqa: E731
        splits = {
            "train": read("Flickr_8k.trainImages.txt")[:10],
            "dev": read("Flickr_8k.devImages.txt")[:3],
            "test": read("Flickr_8k.testImages.txt")[:3],
        }
    else:
        splits = {
            s: [f"{s}{i}.jpg" for i in range(n)]
            for s, n in (("train", 10), ("dev", 3), ("test", 3))
        }
    captions = _captions([n for names in splits.values() for n in names])
    (root / "Flicker8k_Dataset").mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for names in splits.values():
        for name in names:
            pixels = rng.integers(0, 255, (60, 80, 3), np.uint8)
            Image.fromarray(pixels).save(root / "Flicker8k_Dataset" / name)
            lines += [f"{name}#{k}\t{c}" for k, c in enumerate(captions[name])]
    (root / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    for split, names in splits.items():
        (root / f"Flickr_8k.{split}Images.txt").write_text("\n".join(names) + "\n")
    return splits


def _tiny_config(root: Path, tmp_path: Path, glove: Path):
    config = flickr8k_config.get_config()
    config.data.dir = str(root)
    config.data.cache_dir = str(tmp_path / "cache")
    config.data.min_count = 1
    config.encoder.weights = "none"
    config.encoder.image_size = 75
    config.encoder.batch_size = 8
    config.model.embed_dim = 8
    config.model.hidden_size = 16
    config.model.glove_path = str(glove)
    config.train.num_epochs = 1
    config.train.batch_size = 16
    config.train.warmup_steps = 1
    config.train.num_buckets = 1
    config.decode.batch_size = 4
    config.eval.meteor = False
    config.eval.num_samples = 2
    return config


def test_short_flickr8k_run_with_glove_and_a_corrupt_image(tmp_path):
    root = tmp_path / "flickr8k"
    splits = _make_layout(root)
    bad = splits["train"][0]
    (root / "Flicker8k_Dataset" / bad).write_bytes(b"not a jpeg at all")
    glove = tmp_path / "glove.6B.8d.txt"
    rng = np.random.default_rng(1)
    glove_words = ["dog", "the", "in", "man", "on", "with", "and"]
    glove.write_text(
        "".join(f"{w} {' '.join(f'{x:.4f}' for x in rng.normal(size=8))}\n" for w in glove_words)
    )
    config = _tiny_config(root, tmp_path, glove)
    workdir = tmp_path / "run"

    with pytest.raises(Exception, match=bad):  # Undecodable image: named, not dropped silently.
        cli.run("train", config, str(workdir))

    config.data.skip_bad_images = True
    report = cli.run("train", config, str(workdir))
    skipped = (workdir / "skipped_images.txt").read_text()
    assert bad in skipped
    assert len(report["captions"]) == 3 and "CIDEr" in report["metrics"]

    # The frozen GloVe rows are exactly the file's vectors after training.
    vocab = text.Vocabulary.load(str(workdir / "vocab.json"))
    _, params = saved_params(workdir)
    table = np.asarray(
        params["embed"]["embedding"]["value"]
        if isinstance(params["embed"]["embedding"], dict)
        else params["embed"]["embedding"]
    )
    vectors = {
        line.split()[0]: np.array(line.split()[1:], np.float32)
        for line in glove.read_text().splitlines()
    }
    checked = [w for w in glove_words if w in vocab.stoi]
    assert checked
    for word in checked:
        np.testing.assert_allclose(table[vocab.stoi[word]], vectors[word], rtol=1e-5)
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["data"]["dataset"] == "flickr8k"


def test_imagenet_weights_offline_give_a_clear_error(tmp_path, monkeypatch):
    root = tmp_path / "flickr8k"
    _make_layout(root)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "empty_keras_home"))
    config = _tiny_config(root, tmp_path, tmp_path / "unused.txt")
    config.model.glove_path = ""
    config.encoder.weights = "imagenet"
    with pytest.raises(backbone.WeightsNotFoundError) as error:
        cli.run("train", config, str(tmp_path / "run"))
    message = str(error.value)
    assert "encoder.weights" in message
    assert "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5" in message
    assert os.path.join(str(tmp_path / "empty_keras_home"), "models") in message
