"""--mode=caption on a fake run directory: folders, files, globs, unreadable images, no match."""

import json
import os

import numpy as np
import pytest
from conftest import make_run_dir
from PIL import Image

from captioning import caption, cli
from captioning.data import text
from captioning.run_dir import RunDir
from configs import test as test_config

WORDS = ["red", "blue", "circle", "square", "left", "of"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory as training leaves it, with an untrained model (no training needed)."""
    config = test_config.get_config()
    config.decode.batch_size = 2  # 3 images -> a full and a padded batch.
    config.decode.max_len = 6
    return make_run_dir(tmp_path_factory.mktemp("run"), config, WORDS, mean=0.1, std=2.0, step=7)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """3 readable images (png, jpg, bmp) unlike each other, 1 corrupt .jpg and a text file that
    is ignored."""
    folder = tmp_path_factory.mktemp("images")
    noise = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    red = np.zeros((48, 64, 3), np.uint8)
    red[10:30, 20:44, 0] = 255  # A red square on black.
    white = np.full((48, 64, 3), 255, np.uint8)
    for name, pixels in (("a.png", noise), ("b.jpg", red), ("c.bmp", white)):
        Image.fromarray(pixels).save(folder / name)
    (folder / "broken.jpg").write_bytes(b"this is not a jpeg")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_caption_folder_reports_unreadable_image(run_dir, image_dir, capsys):
    config = RunDir(run_dir).config()
    results = caption.caption_images(config, run_dir, str(image_dir))
    names = [os.path.basename(r["path"]) for r in results]
    assert names == ["a.png", "b.jpg", "broken.jpg", "c.bmp"]  # Sorted; notes.txt ignored.
    good = [r for r in results if "error" not in r]
    bad = [r for r in results if "error" in r]
    assert len(good) == 3 and all(isinstance(r["caption"], str) for r in good)
    assert [os.path.basename(r["path"]) for r in bad] == ["broken.jpg"]
    assert bad[0]["caption"] is None and bad[0]["error"]
    assert all(r["method"] == "greedy" for r in results)
    assert set(" ".join(r["caption"] for r in good).split()) <= set(WORDS) | {text.UNK}

    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == [r["path"] for r in good]

    with open(os.path.join(run_dir, "captions", "captions_greedy.json"), encoding="utf-8") as f:
        report = json.load(f)
    assert report["captions"] == results and report["step"] == 7
    assert report["decode"]["method"] == "greedy"


def test_caption_is_deterministic_per_image(run_dir, image_dir, tmp_path):
    """A file alone gets the caption it got in the folder (padding and batching do not leak)."""
    config = RunDir(run_dir).config()
    in_folder = caption.caption_images(
        config, run_dir, str(image_dir), output=str(tmp_path / "a.json")
    )
    alone = caption.caption_images(
        config, run_dir, str(image_dir / "b.jpg"), output=str(tmp_path / "b.json")
    )
    captions = {r["caption"] for r in in_folder if "error" not in r}
    assert len(captions) > 1, in_folder  # Were all alike, the equality would hold vacuously.
    assert len(alone) == 1 and alone[0]["caption"] == in_folder[1]["caption"]


@pytest.mark.parametrize("method", ["beam", "sample"])
def test_caption_glob_with_other_methods(run_dir, image_dir, tmp_path, method):
    config = RunDir(run_dir).config()
    config.decode.method = method
    output = tmp_path / "out" / "captions.json"
    results = caption.caption_images(config, run_dir, str(image_dir / "*.jpg"), output=str(output))
    assert [os.path.basename(r["path"]) for r in results] == ["b.jpg", "broken.jpg"]
    assert isinstance(results[0]["caption"], str) and "error" in results[1]
    assert json.loads(output.read_text())["captions"] == results


def test_cli_caption_uses_the_run_config(run_dir, image_dir):
    results = cli.run("caption", None, run_dir, images=str(image_dir / "a.png"))
    assert len(results) == 1 and "error" not in results[0]


def test_no_matching_images_is_a_clear_error(run_dir, tmp_path):
    config = RunDir(run_dir).config()
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match="empty"):
        caption.caption_images(config, run_dir, str(empty))
    pattern = str(tmp_path / "*.png")
    with pytest.raises(FileNotFoundError, match=r"\*\.png"):
        caption.caption_images(config, run_dir, pattern)


def test_caption_scores_how_unlike_the_training_images_each_image_is(tmp_path, capsys):
    """Every caption carries its image's distance and percentile; an image beyond the
    validation split's 99th percentile is marked in the JSON and on its printed line."""
    from captioning.data import backbone
    from captioning.evaluation.novelty import Novelty

    config = test_config.get_config()
    config.data.cache_dir = str(tmp_path / "cache")
    run_dir = make_run_dir(tmp_path / "run", config, WORDS, mean=0.1, std=2.0)
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(np.full((40, 40, 3), 45, np.uint8)).save(folder / "dark.png")
    noise = np.random.default_rng(1).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "noise.png")
    # A calibration whose 99th percentile lies between the two images' distances.
    raw, _, _ = backbone.encode_images(
        [str(folder / "dark.png"), str(folder / "noise.png")], config.encoder, batch_size=2
    )
    stats = RunDir(run_dir).feature_stats()
    channels = stats.mean.shape[-1]
    plain = Novelty(stats, np.zeros(channels), np.ones(channels), None)
    dark, loud = plain.score(raw)
    assert dark != loud
    low, high = sorted((dark, loud))
    percentiles = np.linspace(0, (low + high) / 2, 100).tolist() + [high * 10]
    Novelty(stats, plain.mean, plain.std, np.asarray(percentiles)).save(run_dir)

    results = caption.caption_images(RunDir(run_dir).config(), run_dir, str(folder))
    novelty = {os.path.basename(r["path"]): r["novelty"] for r in results}
    unlike = "noise.png" if loud > dark else "dark.png"
    like = ({"dark.png", "noise.png"} - {unlike}).pop()
    assert novelty[unlike]["unlike_training"] and not novelty[like]["unlike_training"]
    assert novelty[unlike]["percentile"] > 99 > novelty[like]["percentile"]
    assert novelty[like]["distance"] == pytest.approx(min(dark, loud), rel=1e-3)
    lines = dict(line.split("\t", 1) for line in capsys.readouterr().out.strip().splitlines())
    marked = {os.path.basename(p) for p, rest in lines.items() if caption.UNLIKE_MARK in rest}
    assert marked == {unlike}
    report = json.loads((tmp_path / "run" / "captions" / "captions_greedy.json").read_text())
    assert report["novelty"]["calibrated"] and report["novelty"]["threshold"] > 0
