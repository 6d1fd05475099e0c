"""Tests for the synthetic scenes dataset: generation, rendering, captions, scoring, caching."""

import dataclasses
import os
import re
import types
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from captioning.data.datasets import registry, scene_captions, scenes
from captioning.data.datasets.base import SPLITS, DataError, ImageRecord
from captioning.data.text import clean_caption
from captioning.evaluation import metrics
from configs import scenes as scenes_config

NUM_SCENES = 150  # Enough to meet every caption family and object count, fast to make.


@pytest.fixture(scope="module")
def sample():
    """(scenes, captions, metas) for NUM_SCENES scenes of seed 0."""
    objects = scenes.generate_scenes(NUM_SCENES, seed=0)
    rng = np.random.default_rng(0)
    captions = [scene_captions.make_captions(o, rng) for o in objects]
    metas = [{"objects": [dataclasses.asdict(x) for x in o]} for o in objects]
    return objects, captions, metas


def _data_config(tmp_path, **overrides):
    """The scenes config's data fields, small; a namespace so tests can set ill-typed values."""
    fields = scenes_config.get_config().data.to_dict()
    fields.update(cache_dir=str(tmp_path / "cache"), num_train=10, num_val=4, num_test=3)
    fields.update(perturbed_test=False, train_jitter=0.0, train_objects=scenes.UNIFORM_OBJECTS)
    fields.update(image_size=64)
    fields.update(overrides)
    return types.SimpleNamespace(**fields)


def _obj(colour, shape, x, y, size="small"):
    return {"colour": colour, "shape": shape, "size": size, "x": x, "y": y, "radius": 0.07}


# A tiny hand-made set: two objects side by side, one alone, three in an L.
PAIR = {"objects": [_obj("red", "circle", 0.2, 0.5), _obj("blue", "square", 0.8, 0.5)]}
ALONE = {"objects": [_obj("green", "star", 0.5, 0.5)]}
TRIO = {
    "objects": [
        _obj("red", "circle", 0.2, 0.2),
        _obj("blue", "square", 0.7, 0.05),
        _obj("yellow", "triangle", 0.2, 0.8),
    ]
}


# ---------------------------------------------------------------------------------- generation


def test_generate_scenes_is_deterministic():
    first = scenes.generate_scenes(30, seed=5)
    assert first == scenes.generate_scenes(30, seed=5)
    assert first != scenes.generate_scenes(30, seed=6)
    assert scenes.generate_scenes(10, seed=5) == first[:10]  # More images keep the first ones.


def test_scenes_are_valid_layouts(sample):
    objects, _, _ = sample
    counts = {len(o) for o in objects}
    assert counts == {1, 2, 3}
    for scene in objects:
        assert len({o.pair for o in scene}) == len(scene)  # No repeated (colour, shape).
        for o in scene:
            assert o.colour in scenes.COLOURS and o.shape in scene_captions.SHAPES
            extent = o.radius * 1.1
            assert extent + 0.02 < o.x < 0.98 - extent
            assert extent + 0.02 < o.y < 0.98 - extent
        for i, a in enumerate(scene):
            for b in scene[i + 1 :]:
                dx, dy = abs(a.x - b.x), abs(a.y - b.y)
                assert np.hypot(dx, dy) > 1.1 * (a.radius + b.radius)  # No overlap.
                assert max(dx, dy) >= 1.5 * min(dx, dy)  # Relation clearly along one axis.


def test_sizes_are_clearly_different(sample):
    objects, _, _ = sample
    radii = {
        s: [o.radius for scene in objects for o in scene if o.size == s]
        for s in scene_captions.SIZES
    }
    assert max(radii["small"]) * 1.5 < min(radii["large"])


# ----------------------------------------------------------------------------------- rendering


def _mask(pixels):
    return np.any(pixels != np.array(scenes.BACKGROUND, np.uint8), axis=-1)


def test_render_scene_shape_colours_and_no_overlap(sample):
    objects, _, _ = sample
    for scene in objects[:20]:
        image = scenes.render_scene(scene, 96)
        assert image.shape == (96, 96, 3) and image.dtype == np.uint8
        np.testing.assert_array_equal(image, scenes.render_scene(scene, 96))
        masks = [_mask(scenes.render_scene([o], 96)) for o in scene]
        for o, mask in zip(scene, masks, strict=True):
            assert mask.sum() > 20  # Visible...
            colour = np.all(image == np.array(scenes.COLOURS[o.colour], np.uint8), axis=-1)
            assert colour[mask].mean() > 0.99  # ...in its own colour, not covered by another.
            frame = mask.copy()
            frame[2:-2, 2:-2] = False
            assert not frame.any()  # A margin of a few pixels all round.
        total = np.sum(masks, axis=0)
        assert total.max() <= 1  # No two objects share a pixel.


# ------------------------------------------------------------------------------------ captions


def test_make_captions_is_deterministic(sample):
    objects, _, _ = sample
    first = [scene_captions.make_captions(o, np.random.default_rng(3)) for o in objects[:10]]
    again = [scene_captions.make_captions(o, np.random.default_rng(3)) for o in objects[:10]]
    other = [scene_captions.make_captions(o, np.random.default_rng(4)) for o in objects[:10]]
    assert first == again and first != other


def test_captions_are_distinct_short_and_name_every_object(sample):
    objects, captions, _ = sample
    for scene, caps in zip(objects, captions, strict=True):
        assert (
            len(caps) == scene_captions.NUM_CAPTIONS
            and len(set(caps)) == scene_captions.NUM_CAPTIONS
        )
        truth = {o.pair for o in scene}
        for caption in caps:
            words = clean_caption(caption)
            assert 3 <= len(words) <= scene_captions.MAX_CAPTION_WORDS, caption
            assert not re.search(r"\d", caption)
            assert set(scene_captions.parse_objects(caption)) == truth, caption
            relations = scene_captions.parse_relations(caption)
            if len(scene) > 1:
                assert relations, f"multi-object caption states no relation: {caption}"
            by_pair = {o.pair: o for o in scene}
            for x, r, y in relations:
                assert scene_captions.spatial_relation(by_pair[x], by_pair[y]) == r, caption


def test_vocabulary_is_small(sample):
    _, captions, _ = sample
    vocab = {w for caps in captions for c in caps for w in clean_caption(c)}
    assert 40 <= len(vocab) <= 100, sorted(vocab)
    assert set(scenes.COLOURS) | set(scene_captions.SHAPES) <= vocab


def test_single_object_captions_state_the_position():
    obj = scene_captions.SceneObject("circle", "red", "large", x=0.15, y=0.2, radius=0.1)
    for caption in scene_captions.make_captions([obj], np.random.default_rng(0)):
        words = clean_caption(caption)
        assert "left" in words and ({"top", "upper"} & set(words)), caption


# ----------------------------------------------------------------------------- parsing, scores


def test_parse_objects_and_relations():
    caption = "There is a big red circle to the left of a little blue square."
    assert scene_captions.parse_objects(caption) == [("red", "circle"), ("blue", "square")]
    red, blue = ("red", "circle"), ("blue", "square")
    assert scene_captions.parse_relations(caption) == [(red, "left", blue)]
    assert scene_captions.parse_relations("a blue square on the right of a red circle") == [
        (blue, "right", red)
    ]
    assert scene_captions.parse_relations("a red circle on top of a blue square") == [
        (red, "above", blue)
    ]
    assert scene_captions.parse_relations("a red circle beneath a blue square") == [
        (red, "below", blue)
    ]
    sides = "a red circle on the left and a blue square on the right"
    assert scene_captions.parse_relations(sides) == [(red, "left", blue), (blue, "right", red)]
    tail = "a red circle and a blue square side by side, with the red circle on the left"
    assert scene_captions.parse_relations(tail) == [(red, "left", blue)]
    assert scene_captions.parse_relations("a red circle in the top left") == []
    assert scene_captions.parse_objects("a red and a blue square") == [("blue", "square")]
    assert scene_captions.parse_objects("a red big circle") == [("red", "circle")]


def test_attribute_accuracy_on_hand_made_examples():
    metas = [PAIR, ALONE]
    right = ["A red circle to the left of a blue square.", "A green star in the middle."]
    assert scene_captions.attribute_accuracy(right, metas) == 1.0
    swapped = ["A red circle to the left of a green square.", "A green star in the middle."]
    assert scene_captions.attribute_accuracy(swapped, metas) == 0.5
    invented = ["A red circle left of a blue square and a white star.", "A green star."]
    assert scene_captions.attribute_accuracy(invented, metas) == 0.5
    missing = ["A red circle.", "A green circle."]
    assert scene_captions.attribute_accuracy(missing, metas) == 0.0
    with pytest.raises(ValueError, match="2 metas"):
        scene_captions.attribute_accuracy(right[:1], metas)


def test_relation_accuracy_on_hand_made_examples():
    assert (
        scene_captions.relation_accuracy(["a red circle to the left of a blue square"], [PAIR])
        == 1.0
    )
    assert (
        scene_captions.relation_accuracy(["a red circle to the right of a blue square"], [PAIR])
        == 0.0
    )
    assert (
        scene_captions.relation_accuracy(["a red circle above a blue square"], [PAIR]) == 0.0
    )  # Axis.
    both_sides = "a red circle on the left and a blue square on the left"
    assert scene_captions.relation_accuracy([both_sides], [PAIR]) == 0.5
    # Ineligible images (one object named, or one in the image) do not count.
    captions = ["a red circle", "a red circle left of a blue square", "a green star"]
    assert scene_captions.relation_accuracy(captions, [PAIR, PAIR, ALONE]) == 1.0
    # Naming two objects without a relation scores 0 for that image.
    captions = ["a red circle and a blue square", "a blue square right of a red circle"]
    assert scene_captions.relation_accuracy(captions, [PAIR, PAIR]) == 0.5
    trio = "a red circle above a yellow triangle and a blue square right of the yellow triangle"
    assert scene_captions.relation_accuracy([trio], [TRIO]) == 0.5  # The square is mostly above it.
    assert scene_captions.relation_accuracy([], []) == 0.0


def test_scores_on_references_and_corrupted_references(sample):
    objects, captions, metas = sample
    multi = [i for i, o in enumerate(objects) if len(o) > 1]
    flip = {"left": "right", "right": "left", "above": "below", "below": "above", "over": "under"}
    flip |= {"under": "over", "beneath": "above", "underneath": "above", "top": "bottom"}
    flip |= {"bottom": "top"}
    for k in range(scene_captions.NUM_CAPTIONS):
        refs = [c[k] for c in captions]
        assert scene_captions.attribute_accuracy(refs, metas) == 1.0
        assert scene_captions.relation_accuracy(refs, metas) == 1.0
        flipped = [" ".join(flip.get(w, w) for w in clean_caption(refs[i])) for i in multi]
        assert scene_captions.relation_accuracy(flipped, [metas[i] for i in multi]) == 0.0
        # Rename the first object's colour to one absent from the image: never right.
        corrupted = []
        for scene, ref in zip(objects, refs, strict=True):
            absent = next(c for c in scenes.COLOURS if c not in {o.colour for o in scene})
            words = clean_caption(ref)
            first = next(i for i, w in enumerate(words) if w in scenes.COLOURS)
            words[first] = absent
            corrupted.append(" ".join(words))
        assert scene_captions.attribute_accuracy(corrupted, metas) == 0.0


def test_the_scenes_declare_their_scores_and_evaluation_reports_their_means(sample):
    """The dataset's own caption scores, through the metric registry: split means equal to
    `attribute_accuracy` and `relation_accuracy`, on the validation and evaluation reports."""
    declared = [s.name for s in registry.caption_scores("scenes")]
    assert declared == ["attribute_accuracy", "relation_accuracy"]
    assert registry.caption_scores("flickr8k") == ()
    _, captions, metas = sample
    records = [
        ImageRecord(f"s{i}", "", c, "val", m)
        for i, (c, m) in enumerate(zip(captions, metas, strict=True))
    ]
    said = [c[0] if i % 3 else "a red circle left of a blue square" for i, c in enumerate(captions)]
    split = metrics.SplitCaptions(records, said, meteor=False)
    for validation in (True, False):
        scores = metrics.score(split, "scenes", validation=validation)
        assert scores["attribute_accuracy"] == scene_captions.attribute_accuracy(said, metas)
        assert scores["relation_accuracy"] == scene_captions.relation_accuracy(said, metas)
        assert list(scores).index("attribute_accuracy") == list(scores).index("CIDEr") + 1
    assert 0.0 < scores["attribute_accuracy"] < 1.0  # Some of the replaced captions are wrong.
    assert "attribute_accuracy" in metrics.logged(scores, "scenes")


# ------------------------------------------------------------------------------------- on disk


def test_load_scenes_renders_once_and_reuses(tmp_path):
    config = _data_config(tmp_path)
    splits = scenes.load_scenes(config, seed=0)
    assert list(splits) == list(SPLITS)
    assert [len(splits[s]) for s in SPLITS] == [10, 4, 3]
    records = [r for s in SPLITS for r in splits[s]]
    assert [r.image_id for r in records] == [f"scene_{i:05d}.png" for i in range(17)]
    folder = os.path.join(config.cache_dir, "scenes_seed0_n10-4-3_px64")
    assert os.path.exists(os.path.join(folder, scenes.MANIFEST))
    for split in SPLITS:
        for r in splits[split]:
            assert r.split == split and os.path.isabs(r.image_path)
            assert os.path.dirname(r.image_path) == folder
            assert len(set(r.captions)) == 5
            objects = [scene_captions.SceneObject(**o) for o in r.meta["objects"]]
            with Image.open(r.image_path) as image:
                pixels = np.asarray(image)
            assert pixels.shape == (64, 64, 3) and pixels.dtype == np.uint8
            np.testing.assert_array_equal(pixels, scenes.render_scene(objects, 64))

    mtimes = {f: os.stat(os.path.join(folder, f)).st_mtime_ns for f in os.listdir(folder)}
    again = scenes.load_scenes(config, seed=0)
    assert again == splits
    assert mtimes == {f: os.stat(os.path.join(folder, f)).st_mtime_ns for f in os.listdir(folder)}


def test_load_scenes_redoes_an_interrupted_render(tmp_path):
    config = _data_config(tmp_path)
    splits = scenes.load_scenes(config, seed=0)
    path = splits["train"][0].image_path
    os.remove(os.path.join(os.path.dirname(path), scenes.MANIFEST))  # As if interrupted.
    os.utime(path, ns=(0, 0))
    scenes.load_scenes(config, seed=0)
    assert os.stat(path).st_mtime_ns > 0  # Rendered again.


def test_load_scenes_seeds_and_split_independence(tmp_path):
    base = scenes.load_scenes(_data_config(tmp_path), seed=0)
    other_seed = scenes.load_scenes(_data_config(tmp_path), seed=1)
    more_train = scenes.load_scenes(_data_config(tmp_path, num_train=12), seed=0)

    def content(records):
        return [(r.captions, r.meta) for r in records]

    assert content(base["train"]) != content(other_seed["train"])
    assert content(base["test"]) != content(other_seed["test"])
    assert content(more_train["train"])[:10] == content(base["train"])
    for split in ("val", "test"):  # Same images and captions, only the ids move on.
        assert content(more_train[split]) == content(base[split])
    all_ids = [r.image_id for s in SPLITS for r in base[s]]
    assert len(set(all_ids)) == len(all_ids)


def test_load_scenes_uses_an_explicit_dir(tmp_path):
    config = _data_config(tmp_path, dir=str(tmp_path / "mine"))
    splits = scenes.load_scenes(config, seed=0)
    assert os.path.dirname(splits["val"][0].image_path) == str(tmp_path / "mine")
    assert os.path.exists(tmp_path / "mine" / scenes.MANIFEST)


@pytest.mark.parametrize(
    ("overrides", "seed", "message"),
    [
        ({"image_size": 16}, 0, "image_size"),
        ({"num_train": 0}, 0, "num_train"),
        ({"num_val": -1}, 0, "num_val"),
        ({"num_test": 2.5}, 0, "num_test"),
        ({}, -1, "seed"),
    ],
)
def test_load_scenes_rejects_bad_settings(tmp_path, overrides, seed, message):
    with pytest.raises(DataError, match=message):
        scenes.load_scenes(_data_config(tmp_path, **overrides), seed=seed)


# -------------------------------------------------------------------------------- perturbations


def test_perturbed_render_stays_within_its_ranges_and_is_deterministic(sample):
    objects = next(o for o in sample[0] if len(o) == 3)
    rng = np.random.default_rng(5)
    perturbation = scenes.Perturbation.draw(len(objects), rng)
    low, high = scenes.PERTURBED_BACKGROUND
    assert low <= perturbation.background <= high
    assert all(abs(v) <= 20 for shift in perturbation.colour_shifts for v in shift)
    assert all(abs(t) <= 10 for t in perturbation.turns)
    image = scenes.render_scene(objects, 128, perturbation)
    np.testing.assert_array_equal(image, scenes.render_scene(objects, 128, perturbation))
    assert (image[0, 0] == perturbation.background).all()  # A corner is background.
    for obj, shift in zip(objects, perturbation.colour_shifts, strict=True):
        centre = image[int(obj.y * 128), int(obj.x * 128)].astype(int)
        expected = np.clip(np.add(scenes.COLOURS[obj.colour], shift), 0, 255)
        assert np.abs(centre - expected).max() <= 1, (obj, centre, expected)
    # Anti-aliased edges: colours between the background and the objects' appear.
    fills = {tuple(np.clip(np.add(scenes.COLOURS[o.colour], d), 0, 255)) for o, d in
             zip(objects, perturbation.colour_shifts, strict=True)}  # fmt: skip
    colours = {tuple(p) for p in image.reshape(-1, 3)}
    assert len(colours - fills - {(perturbation.background,) * 3}) > 10
    assert not np.array_equal(image, scenes.render_scene(objects, 128))


def test_generate_scenes_follows_the_object_shares():
    counts = Counter(
        len(s) for s in scenes.generate_scenes(3000, seed=1, object_shares=(0.1, 0.3, 0.6))
    )
    assert [round(counts[n] / 3000, 2) for n in (1, 2, 3)] == pytest.approx(
        [0.1, 0.3, 0.6], abs=0.03
    )
    assert {len(s) for s in scenes.generate_scenes(50, seed=1, object_shares=(0, 0, 1))} == {3}
    uniform = Counter(len(s) for s in scenes.generate_scenes(3000, seed=1))
    assert min(uniform.values()) > 900


def test_train_objects_changes_only_the_training_scenes(tmp_path):
    uniform_config = _data_config(tmp_path, num_train=40, train_objects=scenes.UNIFORM_OBJECTS)
    triples_config = _data_config(tmp_path, num_train=40, train_objects=[0, 0, 1])
    uniform = scenes.load_scenes(uniform_config, seed=0)
    triples = scenes.load_scenes(triples_config, seed=0)
    assert {len(r.meta["objects"]) for r in triples["train"]} == {3}
    assert {len(r.meta["objects"]) for r in uniform["train"]} == {1, 2, 3}
    for split in ("val", "test"):
        assert [r.meta for r in triples[split]] == [r.meta for r in uniform[split]]
        assert [r.captions for r in triples[split]] == [r.captions for r in uniform[split]]
    # Each setting renders into its own folder, so neither overwrites the other's cache.
    assert scenes.scenes_dir(triples_config, 0).endswith("_objects0-0-1")
    assert scenes.scenes_dir(triples_config, 0) != scenes.scenes_dir(uniform_config, 0)
    for bad in ([0.5, 0.5], [0.5, 0.6, -0.1], [1, 1, 1], "0.2,0.3,0.5", [True, 0, 0]):
        with pytest.raises(scenes.DataError, match="train_objects"):
            scenes.load_scenes(_data_config(tmp_path, train_objects=bad), seed=0)


def test_perturbed_test_split_and_train_jitter(tmp_path):
    config = _data_config(tmp_path, perturbed_test=True, train_jitter=0.5)
    splits = scenes.load_scenes(config, seed=0)
    assert list(splits) == [*SPLITS, "test_perturbed"]
    test, perturbed = splits["test"], splits["test_perturbed"]
    assert [r.image_id for r in perturbed] == [f"perturbed_{i:05d}.png" for i in range(3)]
    for clean, other in zip(test, perturbed, strict=True):
        # The same scenes and captions (so the captions stay true), drawn perturbed.
        assert other.captions == clean.captions
        assert other.meta["objects"] == clean.meta["objects"] and "perturbation" in other.meta
        with Image.open(clean.image_path) as a, Image.open(other.image_path) as b:
            assert not np.array_equal(np.asarray(a), np.asarray(b))
    jittered = [r for r in splits["train"] if "perturbation" in r.meta]
    assert len(jittered) == 5 and "perturbation" not in splits["val"][0].meta
    # Deterministic: a new folder renders the same records and pixels.
    again = scenes.load_scenes(_data_config(tmp_path / "other", perturbed_test=True,
                                            train_jitter=0.5), seed=0)  # fmt: skip
    assert [r.meta for r in again["test_perturbed"]] == [r.meta for r in perturbed]
    for a, b in zip(again["test_perturbed"] + again["train"], perturbed + splits["train"],
                    strict=True):  # fmt: skip
        with Image.open(a.image_path) as x, Image.open(b.image_path) as y:
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # The clean splits do not depend on the perturbation settings.
    clean = scenes.load_scenes(_data_config(tmp_path / "clean"), seed=0)
    assert [r.captions for r in clean["train"]] == [r.captions for r in splits["train"]]
    with pytest.raises(scenes.DataError, match="train_jitter"):
        scenes.load_scenes(_data_config(tmp_path, train_jitter=2), seed=0)
