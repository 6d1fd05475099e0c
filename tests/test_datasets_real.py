"""Readers for real data: Flickr8k text zip, Kaggle CSV, Karpathy JSON, registry, TFDS builder.

Small made-up folders (tmp_path, JPEGs drawn with Pillow) carry real Flickr8k caption lines when
../shared/data/flickr8k_text is present; the figures of the real files are checked on those files.
"""

import json
import logging
import sys
import types
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

import captioning.data.datasets
from captioning.data.datasets import flickr8k, kaggle, karpathy, registry
from captioning.data.datasets.base import DataError
from captioning.data.text import Vocabulary, clean_caption
from configs import scenes as base_config

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k_text"
requires_shared = pytest.mark.skipif(
    not SHARED.is_dir(), reason="../shared/data/flickr8k_text not present"
)

# Image names from the official split files: 4 train, 1 dev, 1 test.
SPLIT_NAMES = {
    "train": [
        "2513260012_03d33305cf.jpg",
        "2903617548_d3e38d7f88.jpg",
        "3338291921_fe7ae0c8f8.jpg",
        "488416045_1c6d903fe0.jpg",
    ],
    "val": ["2090545563_a4e66ec76b.jpg"],
    "test": ["3385593926_d3e9c21170.jpg"],
}
ALL_NAMES = [n for names in SPLIT_NAMES.values() for n in names]


def data_config(**fields):
    """The base config's data section with `fields` set."""
    config = base_config.get_config().data
    config.update(fields)
    return config


def token_lines(names=ALL_NAMES) -> list[str]:
    """Real `<image>#<k>\\t<caption>` lines for `names` (made-up ones without ../shared)."""
    if SHARED.is_dir():
        wanted = set(names)
        lines = (SHARED / "Flickr8k.token.txt").read_text(encoding="utf-8").splitlines()
        return [line for line in lines if line.partition("#")[0] in wanted]
    return [f"{n}#{k}\tA dog runs on the grass , number {k} ." for n in names for k in range(5)]


def draw_jpeg(path: Path, index: int = 0) -> None:
    image = Image.new("RGB", (24, 24), (255, 255, 255))
    ImageDraw.Draw(image).rectangle([4, 4, 12 + index % 8, 16], fill=(200, 30 * index % 255, 40))
    image.save(path, "JPEG")


def make_flickr8k(
    root: Path,
    *,
    lines: list[str] | None = None,
    text_sub: str = "",
    image_dir: str = "Flicker8k_Dataset",
    images=ALL_NAMES,
    encoding_prefix: bytes = b"",
    newline: str = "\n",
) -> Path:
    """A Flickr8k text-zip folder: token file, split files, JPEGs."""
    text_dir = root / text_sub
    text_dir.mkdir(parents=True, exist_ok=True)
    lines = token_lines() if lines is None else lines
    data = encoding_prefix + newline.join(lines).encode("utf-8") + newline.encode()
    (text_dir / flickr8k.TOKEN_FILE).write_bytes(data)
    for split, file_name in flickr8k.SPLIT_FILES.items():
        (text_dir / file_name).write_text("\n".join(SPLIT_NAMES[split]) + "\n")
    (root / image_dir).mkdir(exist_ok=True)
    for i, name in enumerate(images):
        draw_jpeg(root / image_dir / name, i)
    return root


def sizes(splits) -> tuple[int, ...]:
    return tuple(len(splits[s]) for s in ("train", "val", "test"))


# --------------------------------------------------------------------------------------------
# The real Flickr8k text files.


@requires_shared
def test_real_files_give_the_published_figures(caplog):
    caplog.set_level(logging.WARNING)
    splits = flickr8k.read_flickr8k(SHARED, check_images=False)
    assert sizes(splits) == (6000, 1000, 1000)
    assert [sum(len(r.captions) for r in splits[s]) for s in ("train", "val", "test")] == [
        30000,
        5000,
        5000,
    ]
    assert {r.split for s in splits for r in splits[s]} == {"train", "val", "test"}
    train_words = [clean_caption(c, min_word_len=2) for r in splits["train"] for c in r.captions]
    assert len(Vocabulary.build(train_words, min_count=10).words) == 1649
    longest = max(
        len(clean_caption(c, min_word_len=2)) for s in splits for r in splits[s] for c in r.captions
    )
    assert longest == 32
    # The stray '.1' id is normalised with a warning naming the line.
    assert any("Flickr8k.token.txt:6731" in r.getMessage() for r in caplog.records)


@requires_shared
def test_real_token_file_quirk_keeps_five_captions():
    captions = flickr8k.read_token_file(SHARED / flickr8k.TOKEN_FILE)
    assert len(captions) == 8092
    assert len(captions["2258277193_586949ec62.jpg"]) == 5
    assert captions["2258277193_586949ec62.jpg"][0] == "people waiting for the subway"
    assert all(len(c) == 5 for c in captions.values())


@requires_shared
def test_real_files_in_text_subfolder_with_image_folder(tmp_path):
    (tmp_path / "Flickr8k_text").symlink_to(SHARED, target_is_directory=True)
    names = [n for f in flickr8k.SPLIT_FILES.values() for n in (SHARED / f).read_text().split()]
    images = tmp_path / "Flicker8k_Dataset"
    images.mkdir()
    for name in names:
        (images / name).touch()  # Existence is all the reader checks.
    config = data_config(**{"dataset": "flickr8k", "dir": str(tmp_path)})
    splits = registry.load_records(config, seed=0)
    assert sizes(splits) == (6000, 1000, 1000)
    record = splits["val"][0]
    assert record.image_path == str(images.resolve() / record.image_id)


# --------------------------------------------------------------------------------------------
# Flickr8k text layout on a tiny made folder.


@pytest.mark.parametrize(
    "text_sub,image_dir", [("", "Flicker8k_Dataset"), ("Flickr8k_text", "Images")]
)
def test_flickr8k_tiny_layout(tmp_path, text_sub, image_dir):
    root = make_flickr8k(tmp_path / "flickr", text_sub=text_sub, image_dir=image_dir)
    splits = flickr8k.read_flickr8k(root)
    assert sizes(splits) == (4, 1, 1)
    assert [r.image_id for r in splits["train"]] == SPLIT_NAMES["train"]
    record = splits["val"][0]
    assert record.split == "val"
    assert Path(record.image_path).is_absolute() and Path(record.image_path).is_file()
    expected = [line.partition("\t")[2] for line in token_lines([record.image_id])]
    assert list(record.captions) == expected  # Raw, not cleaned.


def test_bom_and_crlf_parse_like_plain_files(tmp_path):
    plain = flickr8k.read_flickr8k(make_flickr8k(tmp_path / "plain"))
    odd = make_flickr8k(tmp_path / "odd", encoding_prefix=b"\xef\xbb\xbf", newline="\r\n")
    for f in flickr8k.SPLIT_FILES.values():  # CRLF and BOM in the split files as well.
        text = (odd / f).read_text()
        (odd / f).write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
    got = flickr8k.read_flickr8k(odd)
    assert [(r.image_id, r.captions) for r in got["train"]] == [
        (r.image_id, r.captions) for r in plain["train"]
    ]


def test_line_without_tab_names_file_and_line(tmp_path):
    lines = token_lines()
    lines[3] = lines[3].replace("\t", " ")
    root = make_flickr8k(tmp_path, lines=lines)
    with pytest.raises(DataError, match=r"Flickr8k\.token\.txt:4: .*no tab"):
        flickr8k.read_flickr8k(root)


def test_empty_caption_names_file_and_line(tmp_path):
    lines = token_lines()
    lines[7] = lines[7].partition("\t")[0] + "\t  "
    root = make_flickr8k(tmp_path, lines=lines)
    with pytest.raises(DataError, match=r"Flickr8k\.token\.txt:8: empty caption"):
        flickr8k.read_flickr8k(root)


def test_non_utf8_bytes_name_file_and_line(tmp_path):
    root = make_flickr8k(tmp_path)
    token = root / flickr8k.TOKEN_FILE
    data = token.read_bytes().split(b"\n")
    data[5] = data[5] + b" caf\xe9"
    token.write_bytes(b"\n".join(data))
    with pytest.raises(DataError, match=r"Flickr8k\.token\.txt:6: bytes that are not UTF-8"):
        flickr8k.read_flickr8k(root)


def test_split_image_without_captions_names_split_file_line(tmp_path):
    missing = SPLIT_NAMES["test"][0]
    lines = [line for line in token_lines() if not line.startswith(missing)]
    root = make_flickr8k(tmp_path, lines=lines)
    with pytest.raises(DataError, match=rf"Flickr_8k\.testImages\.txt:1: image {missing} has no"):
        flickr8k.read_flickr8k(root)


def test_image_listed_in_two_splits(tmp_path):
    root = make_flickr8k(tmp_path)
    with open(root / flickr8k.SPLIT_FILES["test"], "a") as f:
        f.write(SPLIT_NAMES["train"][0] + "\n")
    with pytest.raises(DataError, match=r"testImages\.txt:2: .* already listed at .*trainImages"):
        flickr8k.read_flickr8k(root)


def test_missing_image_raises_naming_image_and_folders(tmp_path):
    root = make_flickr8k(tmp_path)
    gone = SPLIT_NAMES["train"][2]
    (root / "Flicker8k_Dataset" / gone).unlink()
    with pytest.raises(DataError, match=rf"{gone} .*not found; searched .*Flicker8k_Dataset"):
        flickr8k.read_flickr8k(root)


def test_skip_bad_images_skips_reports_and_logs(tmp_path, caplog):
    root = make_flickr8k(tmp_path)
    gone = SPLIT_NAMES["train"][2]
    (root / "Flicker8k_Dataset" / gone).unlink()
    skipped = []
    config = data_config(**{"dataset": "flickr8k", "dir": str(root), "skip_bad_images": True})
    caplog.set_level(logging.WARNING)
    splits = registry.load_records(config, seed=0, skipped=skipped)
    assert sizes(splits) == (3, 1, 1)
    assert [s[0] for s in skipped] == [gone] and "not found" in skipped[0][1]
    assert any(
        "skipped 1 images" in r.getMessage() and gone in r.getMessage() for r in caplog.records
    )


def test_skip_bad_images_still_raises_when_every_image_is_missing(tmp_path):
    root = make_flickr8k(tmp_path, images=[])
    with pytest.raises(DataError, match=r"all 6 image files are missing"):
        flickr8k.read_flickr8k(root, skip_bad_images=True)


def test_stray_suffix_is_normalised_with_warning(tmp_path, caplog):
    lines = token_lines()
    name = SPLIT_NAMES["val"][0]
    index = next(i for i, line in enumerate(lines) if line.startswith(name))
    lines[index] = lines[index].replace(f"{name}#", f"{name}.1#", 1)
    caplog.set_level(logging.WARNING)
    splits = flickr8k.read_flickr8k(make_flickr8k(tmp_path, lines=lines))
    assert len(splits["val"][0].captions) == 5
    assert any(f"Flickr8k.token.txt:{index + 1}" in r.getMessage() for r in caplog.records)


def test_missing_folder_and_files_say_what_to_get(tmp_path):
    with pytest.raises(DataError, match=r"does not exist.*Flickr8k_Dataset\.zip.*Kaggle"):
        flickr8k.read_flickr8k(tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"Flickr8k\.token\.txt.*not found.*Flickr8k_text\.zip"):
        flickr8k.read_flickr8k(tmp_path)
    root = make_flickr8k(tmp_path / "noimages", images=[])
    (root / "Flicker8k_Dataset").rmdir()
    with pytest.raises(DataError, match=r"No image folder.*Flicker8k_Dataset"):
        flickr8k.read_flickr8k(root)
    config = data_config(**{"dataset": "flickr8k", "dir": ""})
    with pytest.raises(DataError, match=r"config\.data\.dir is empty"):
        registry.load_records(config, seed=0)


# --------------------------------------------------------------------------------------------
# Kaggle layout.


def make_kaggle(root: Path, rows: list[str] | None = None, n_images: int = 8) -> Path:
    names = [f"{1000 + i}_abc.jpg" for i in range(n_images)]
    if rows is None:
        rows = ["image,caption"]
        for name in names:
            rows += [f'{name},"A dog, brown and wet, runs ."', f"{name},A cat sleeps ."]
    root.mkdir(parents=True, exist_ok=True)
    (root / "captions.txt").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (root / "Images").mkdir(exist_ok=True)
    for i, name in enumerate(names):
        draw_jpeg(root / "Images" / name, i)
    return root


def test_kaggle_quoted_commas_and_seeded_split(tmp_path, caplog):
    root = make_kaggle(tmp_path / "k")
    caplog.set_level(logging.INFO)
    splits = kaggle.read_kaggle(root, seed=3)
    assert sizes(splits) == (6, 1, 1)
    assert splits["train"][0].captions == ("A dog, brown and wet, runs .", "A cat sleeps .")
    assert any("split_source=seeded" in r.getMessage() for r in caplog.records)
    again = kaggle.read_kaggle(root, seed=3)
    assert [r.image_id for r in again["train"]] == [r.image_id for r in splits["train"]]
    splits_by_seed = [
        tuple(r.image_id for r in kaggle.read_kaggle(root, seed=s)["test"]) for s in range(6)
    ]
    assert len(set(splits_by_seed)) > 1


def test_kaggle_seeded_split_sizes_for_full_flickr8k():
    split = kaggle.seeded_split([f"{i}.jpg" for i in range(8091)], seed=0)
    assert sizes(split) == (6000, 1000, 1091)


def test_kaggle_uses_official_split_files_when_present(tmp_path, caplog):
    rows = ["image,caption"] + [
        f"{line.partition('#')[0]},{line.partition(chr(9))[2]}" for line in token_lines()
    ]
    root = make_kaggle(tmp_path, rows=rows, n_images=0)
    for i, name in enumerate(ALL_NAMES):
        draw_jpeg(root / "Images" / name, i)
    for split, f in flickr8k.SPLIT_FILES.items():
        (root / f).write_text("\n".join(SPLIT_NAMES[split]) + "\n")
    caplog.set_level(logging.INFO)
    splits = kaggle.read_kaggle(root, seed=0)
    assert {s: [r.image_id for r in splits[s]] for s in splits} == SPLIT_NAMES
    assert any("split_source=official" in r.getMessage() for r in caplog.records)


def test_kaggle_bad_rows(tmp_path):
    root = make_kaggle(tmp_path / "header", rows=["img,text", "a.jpg,A dog ."], n_images=0)
    with pytest.raises(DataError, match=r"captions\.txt:1: expected the header"):
        kaggle.read_kaggle(root, seed=0)
    root = make_kaggle(tmp_path / "empty", rows=["image,caption", "a.jpg,A dog .", "b.jpg,"])
    with pytest.raises(DataError, match=r"captions\.txt:3: empty caption for b\.jpg"):
        kaggle.read_kaggle(root, seed=0)
    root = make_kaggle(tmp_path / "nocap", rows=["image,caption", "a.jpg"])
    with pytest.raises(DataError, match=r"captions\.txt:2: .*no caption"):
        kaggle.read_kaggle(root, seed=0)
    with pytest.raises(DataError, match=r"captions\.txt not found.*Kaggle"):
        kaggle.read_kaggle(tmp_path / "header" / "Images", seed=0)


def test_kaggle_bom_crlf_and_unquoted_commas(tmp_path):
    root = make_kaggle(tmp_path, n_images=4)
    rows = "image,caption\r\n" + "".join(f"{1000 + i}_abc.jpg,A dog, wet .\r\n" for i in range(4))
    (root / "captions.txt").write_bytes(b"\xef\xbb\xbf" + rows.encode())
    splits = kaggle.read_kaggle(root, seed=0)
    assert splits["train"][0].captions == ("A dog, wet .",)


# --------------------------------------------------------------------------------------------
# Karpathy JSON.


def karpathy_entry(filename, split, captions, filepath=None):
    entry = {"filename": filename, "split": split, "sentences": [{"raw": c} for c in captions]}
    if filepath:
        entry["filepath"] = filepath
    return entry


def test_karpathy_flickr_style(tmp_path):
    images = [("a.jpg", "train"), ("b.jpg", "restval"), ("c.jpg", "val"), ("d.jpg", "test")]
    data = {"images": [karpathy_entry(f, s, ["A dog runs .", "Dog."]) for f, s in images]}
    data["images"][0]["sentences"].append({"tokens": ["a", "dog"]})
    (tmp_path / "dataset_flickr8k.json").write_text(json.dumps(data))
    (tmp_path / "Images").mkdir()
    for i, (f, _) in enumerate(images):
        draw_jpeg(tmp_path / "Images" / f, i)
    splits = karpathy.read_karpathy(tmp_path)
    assert sizes(splits) == (2, 1, 1)
    assert splits["train"][0].captions == ("A dog runs .", "Dog.", "a dog")
    assert splits["train"][1].split == "train"  # restval -> train.
    assert Path(splits["test"][0].image_path) == tmp_path.resolve() / "Images" / "d.jpg"


def test_karpathy_coco_style_via_registry(tmp_path):
    images = [
        ("COCO_train2014_1.jpg", "train2014", "train"),
        ("COCO_val2014_2.jpg", "val2014", "restval"),
        ("COCO_val2014_3.jpg", "val2014", "val"),
        ("COCO_val2014_4.jpg", "val2014", "test"),
    ]
    data = {"images": [karpathy_entry(f, s, ["A cat ."], filepath=p) for f, p, s in images]}
    (tmp_path / "json").mkdir()
    (tmp_path / "json" / "dataset_coco.json").write_text(json.dumps(data))
    for i, (f, p, _) in enumerate(images):
        (tmp_path / p).mkdir(exist_ok=True)
        draw_jpeg(tmp_path / p / f, i)
    config = data_config(
        **{"dataset": "karpathy", "dir": str(tmp_path), "karpathy_json": "json/dataset_coco.json"}
    )
    splits = registry.load_records(config, seed=0)
    assert sizes(splits) == (2, 1, 1)
    assert splits["val"][0].image_path == str(tmp_path.resolve() / "val2014" / "COCO_val2014_3.jpg")
    (tmp_path / "val2014" / "COCO_val2014_4.jpg").unlink()
    with pytest.raises(DataError, match=r"COCO_val2014_4\.jpg .*searched .*val2014"):
        registry.load_records(config, seed=0)
    config.karpathy_json = ""  # Empty: the JSON is looked for in data.dir.
    with pytest.raises(DataError, match=r"No Karpathy JSON .*dataset_coco\.json"):
        registry.load_records(config, seed=0)


def test_karpathy_bad_json(tmp_path):
    (tmp_path / "dataset_flickr8k.json").write_text('{"images": [\n  {"filename": "a.jpg",,}\n]}')
    with pytest.raises(DataError, match=r"dataset_flickr8k\.json:2:\d+: not valid JSON"):
        karpathy.read_karpathy(tmp_path)
    data = {"images": [karpathy_entry("a.jpg", "train", ["  "])]}
    (tmp_path / "dataset_flickr8k.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"images\[0\] \(a\.jpg\): sentences\[0\] is empty"):
        karpathy.read_karpathy(tmp_path, check_images=False)
    data = {"images": [karpathy_entry("a.jpg", "holdout", ["A dog ."])]}
    (tmp_path / "dataset_flickr8k.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"a\.jpg\): unknown split 'holdout'"):
        karpathy.read_karpathy(tmp_path, check_images=False)
    (tmp_path / "dataset_coco.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"Several Karpathy files.*karpathy_json"):
        karpathy.read_karpathy(tmp_path)


# --------------------------------------------------------------------------------------------
# Registry and TFDS builder.


def test_registry_unknown_name_lists_valid_names():
    config = data_config(**{"dataset": "flickr30", "dir": ""})
    with pytest.raises(DataError, match=r"'flickr30'.*scenes, flickr8k, flickr8k_kaggle, karpathy"):
        registry.load_records(config, seed=0)


def test_registry_scenes_is_imported_lazily(monkeypatch):
    fake = types.ModuleType("captioning.data.datasets.scenes")
    fake.load_scenes = lambda data_config, seed: {"train": [], "val": [], "test": [], "seed": seed}
    monkeypatch.setitem(sys.modules, "captioning.data.datasets.scenes", fake)
    monkeypatch.setattr(captioning.data.datasets, "scenes", fake, raising=False)
    config = data_config(**{"dataset": "scenes"})
    assert registry.load_records(config, seed=7)["seed"] == 7


def test_tfds_builder_builds_from_manual_dir(tmp_path):
    # tensorflow-datasets 4.9.10 imports importlib_resources while building, but declares it
    # only for Python < 3.9 (requirements.txt installs it).
    import importlib_resources  # noqa: F401
    import tensorflow_datasets as tfds

    from captioning.data.datasets import tfds_flickr8k

    assert "Flickr8k_Dataset.zip" in tfds_flickr8k.Flickr8k.MANUAL_DOWNLOAD_INSTRUCTIONS
    manual = make_flickr8k(tmp_path / "manual", text_sub="Flickr8k_text")
    builder = tfds_flickr8k.Flickr8k(data_dir=str(tmp_path / "tfds"))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual))
    assert {s: builder.info.splits[s].num_examples for s in ("train", "val", "test")} == {
        "train": 4,
        "val": 1,
        "test": 1,
    }
    example = next(iter(tfds.as_numpy(builder.as_dataset(split="val"))))
    assert example["image"].shape == (24, 24, 3)
    assert example["image_id"].decode() == SPLIT_NAMES["val"][0]
    assert len(example["captions"]) == 5
