"""The embedded synthetic "scenes" dataset: coloured shapes with grammar-made captions, offline.

Each image holds 1-3 objects (shape, colour, size, position) on a plain dark background, with five
captions from the grammar of `captioning.data.datasets.scene_captions`. Everything is
deterministic given the random seed. The true objects stay in `ImageRecord.meta['objects']`, so
generated captions are scored with `attribute_accuracy` and `relation_accuracy` on top of the
usual text metrics.

Besides the clean renders, a scene can be drawn with a `Perturbation`: a background grey between
35 and 55, each colour channel of each object moved by up to +-20, anti-aliased edges and shapes
turned by up to 10 degrees, as another renderer or a user's drawing would. The split
`test_perturbed` (`data.perturbed_test`) is the test scenes drawn that way, scored beside the clean
test split; `data.train_jitter` draws that share of the training images perturbed. Captions stay
true under every perturbation.

`data.train_objects` sets the shares of training scenes with 1, 2 and 3 objects (validation and
test scenes keep one third each): relations and the errors between look-alike objects live in the
scenes of two and three objects, so the default trains on more of them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from captioning.data.datasets.base import SPLITS, DataError, DatasetSplits, ImageRecord
from captioning.data.datasets.scene_captions import (
    COLOUR_NAMES,
    SHAPES,
    SIZES,
    SceneObject,
    make_captions,
)

# Bump when scenes, captions or pixels change, so that cached renders are redone.
GENERATOR_VERSION = 1
MIN_IMAGE_SIZE = 32
MANIFEST = "manifest.json"

# Visually distinct colours on a dark grey background (RGB), one per scene_captions.COLOUR_NAMES.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 100, 245),
    "yellow": (245, 220, 40),
    "purple": (185, 60, 215),
    "white": (245, 245, 245),
}
BACKGROUND = (45, 45, 45)

# Radius (fraction of the image side) of the circle each shape is drawn in, before a +-10 % jitter:
# small and large differ ~3.5x in area so the size words are never in doubt.
_BASE_RADIUS = {"small": 0.075, "large": 0.14}
_EXTENT = 1.1  # Shapes reach up to 1.1 radius (square corners, star tips): used for spacing.
_MARGIN = 0.03  # Free border around the image (~4 px at 128 px).
_GAP = 0.04  # Free space between two objects.
# In multi-object scenes the displacement of every pair along its main axis is at least this many
# times the one along the other axis, so "left of" vs "above" is never a judgement call.
_DOMINANCE = 1.5
_MAX_TRIES = 200
# Shares of scenes with 1, 2 and 3 objects in the validation and test splits (and in training
# unless `data.train_objects` says otherwise).
UNIFORM_OBJECTS = (1 / 3, 1 / 3, 1 / 3)
# Perturbed renders: background grey range, colour shift per channel, turn in degrees, and the
# supersampling factor that anti-aliases the edges.
PERTURBED_BACKGROUND = (35, 55)
PERTURBED_COLOUR_SHIFT = 20
PERTURBED_MAX_TURN = 10.0
_SUPERSAMPLE = 4
PERTURBED_SPLIT = "test_perturbed"


# ----------------------------------------------------------------------------------------------
# Scene generation


def generate_scenes(
    num_images: int, seed: int, object_shares: Sequence[float] = UNIFORM_OBJECTS
) -> list[list[SceneObject]]:
    """Draws `num_images` scenes of 1-3 non-overlapping objects; the same seed gives the same list.

    object_shares: the chance of 1, 2 and 3 objects (summing to 1). Images are drawn one after
    another from one stream, so the first k scenes do not depend on `num_images`.
    """
    rng = np.random.default_rng(seed)
    # Uniform shares keep the draw of the splits that are always uniform (and of earlier versions).
    shares = None if np.allclose(object_shares, UNIFORM_OBJECTS) else np.asarray(object_shares)
    return [_generate_scene(rng, shares) for _ in range(num_images)]


def _generate_scene(rng: np.random.Generator, shares: np.ndarray | None) -> list[SceneObject]:
    while True:  # Restart with new attributes in the rare case that the objects do not fit.
        if shares is None:
            num_objects = int(rng.integers(1, 4))
        else:
            num_objects = 1 + int(rng.choice(3, p=shares))
        pair_ids = rng.choice(len(COLOUR_NAMES) * len(SHAPES), size=num_objects, replace=False)
        colours = list(COLOUR_NAMES)
        objects: list[SceneObject] = []
        for pair_id in pair_ids:
            colour, shape = colours[pair_id // len(SHAPES)], SHAPES[pair_id % len(SHAPES)]
            size = SIZES[int(rng.integers(len(SIZES)))]
            radius = _BASE_RADIUS[size] * float(rng.uniform(0.9, 1.1))
            if num_objects == 1:
                xy = _place_alone(rng, radius)
            else:
                xy = _place_among(rng, radius, objects)
            if xy is None:
                break
            objects.append(SceneObject(shape, colour, size, xy[0], xy[1], radius))
        if len(objects) == num_objects:
            return objects


def _place_alone(rng: np.random.Generator, radius: float) -> tuple[float, float]:
    # Centre of one cell of a 3x3 grid plus a little jitter: the object stays well inside its cell,
    # so the position words ("top left", "middle") are unambiguous.
    col, row = (int(v) for v in rng.integers(0, 3, size=2))
    lo, hi = radius * _EXTENT + _MARGIN, 1.0 - radius * _EXTENT - _MARGIN
    x = float(np.clip((col + 0.5) / 3 + rng.uniform(-0.08, 0.08), lo, hi))
    y = float(np.clip((row + 0.5) / 3 + rng.uniform(-0.08, 0.08), lo, hi))
    return x, y


def _place_among(
    rng: np.random.Generator, radius: float, placed: Sequence[SceneObject]
) -> tuple[float, float] | None:
    lo, hi = radius * _EXTENT + _MARGIN, 1.0 - radius * _EXTENT - _MARGIN
    for _ in range(_MAX_TRIES):
        x, y = (float(v) for v in rng.uniform(lo, hi, size=2))
        if all(_fits(x, y, radius, other) for other in placed):
            return x, y
    return None


def _fits(x: float, y: float, radius: float, other: SceneObject) -> bool:
    dx, dy = abs(x - other.x), abs(y - other.y)
    apart = np.hypot(dx, dy) >= (radius + other.radius) * _EXTENT + _GAP
    return bool(apart and max(dx, dy) >= _DOMINANCE * min(dx, dy))


# ----------------------------------------------------------------------------------------------
# Rendering


@dataclasses.dataclass(frozen=True)
class Perturbation:
    """How one image departs from the clean renderer.

    Attributes:
      background: grey level of the background (clean: 45).
      colour_shifts: per object, (r, g, b) added to its palette colour (clipped to 0..255).
      turns: per object, degrees its shape is turned about its centre (circles look the same).
    """

    background: int
    colour_shifts: tuple[tuple[int, int, int], ...]
    turns: tuple[float, ...]

    @classmethod
    def draw(cls, num_objects: int, rng: np.random.Generator) -> Perturbation:
        """A random perturbation within the documented ranges."""
        low, high = PERTURBED_BACKGROUND
        shift = PERTURBED_COLOUR_SHIFT
        return cls(
            background=int(rng.integers(low, high + 1)),
            colour_shifts=tuple(
                tuple(int(v) for v in rng.integers(-shift, shift + 1, size=3))
                for _ in range(num_objects)
            ),
            turns=tuple(
                float(v) for v in rng.uniform(-PERTURBED_MAX_TURN, PERTURBED_MAX_TURN, num_objects)
            ),
        )


def render_scene(
    objects: Sequence[SceneObject], image_size: int, perturbation: Perturbation | None = None
) -> np.ndarray:
    """Draws the objects on a plain background; returns [image_size, image_size, 3] uint8.

    Without a perturbation: the palette colours on grey 45, hard edges, upright shapes. With one:
    its background, shifted colours and turns, drawn at 4x the size and box-downsampled, which
    anti-aliases the edges.
    """
    if perturbation is None:
        image = Image.new("RGB", (image_size, image_size), BACKGROUND)
        draw = ImageDraw.Draw(image)
        for obj in objects:
            _draw_object(draw, obj, image_size)
        return np.asarray(image, dtype=np.uint8)
    size = image_size * _SUPERSAMPLE
    image = Image.new("RGB", (size, size), (perturbation.background,) * 3)
    draw = ImageDraw.Draw(image)
    for obj, shift, turn in zip(
        objects, perturbation.colour_shifts, perturbation.turns, strict=True
    ):
        fill = tuple(
            int(np.clip(c + d, 0, 255)) for c, d in zip(COLOURS[obj.colour], shift, strict=True)
        )
        _draw_object(draw, obj, size, fill=fill, turn=turn)
    image = image.resize((image_size, image_size), Image.Resampling.BOX)
    return np.asarray(image, dtype=np.uint8)


def _draw_object(
    draw: ImageDraw.ImageDraw,
    obj: SceneObject,
    image_size: int,
    fill: tuple[int, int, int] | None = None,
    turn: float = 0.0,
) -> None:
    """Draws one object in its palette colour (or `fill`), turned by `turn` degrees."""
    cx, cy, r = obj.x * image_size, obj.y * image_size, obj.radius * image_size
    fill = COLOURS[obj.colour] if fill is None else fill
    if obj.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        return
    if obj.shape == "square":
        h = 0.78 * r  # Corners at 1.1 r, the shared extent.
        points = [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    elif obj.shape == "triangle":  # Pointing up.
        angles = np.deg2rad([-90.0, 30.0, 150.0])
        points = [(cx + _EXTENT * r * np.cos(a), cy + _EXTENT * r * np.sin(a)) for a in angles]
    elif obj.shape == "star":  # Five points, alternating outer and inner radius.
        angles = np.deg2rad(-90.0 + 36.0 * np.arange(10))
        radii = np.where(np.arange(10) % 2 == 0, _EXTENT * r, 0.45 * _EXTENT * r)
        points = [
            (cx + d * np.cos(a), cy + d * np.sin(a)) for a, d in zip(angles, radii, strict=True)
        ]
    elif obj.shape == "diamond":  # Taller than wide, so it never looks like a turned square.
        w, h = 0.75 * r, _EXTENT * r
        points = [(cx, cy - h), (cx + w, cy), (cx, cy + h), (cx - w, cy)]
    else:
        raise DataError(f"Unknown shape {obj.shape!r}; expected one of {SHAPES}.")
    if turn:
        angle = np.deg2rad(turn)
        cos, sin = np.cos(angle), np.sin(angle)
        points = [
            (cx + (px - cx) * cos - (py - cy) * sin, cy + (px - cx) * sin + (py - cy) * cos)
            for px, py in points
        ]
    draw.polygon([(float(px), float(py)) for px, py in points], fill=fill)


# ----------------------------------------------------------------------------------------------
# The dataset on disk.


def _settings(data_config: Any, seed: int) -> dict[str, Any]:
    """Validated settings that decide the rendered files."""
    settings: dict[str, Any] = {"generator_version": GENERATOR_VERSION, "seed": seed}
    for field in ("num_train", "num_val", "num_test", "image_size"):
        value = getattr(data_config, field)
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise DataError(f"config.data.{field} must be an integer, got {value!r}.")
        settings[field] = int(value)
    if settings["image_size"] < MIN_IMAGE_SIZE:
        raise DataError(
            f"config.data.image_size={settings['image_size']} is too small for the scenes "
            f"dataset: use at least {MIN_IMAGE_SIZE} pixels (default 128)."
        )
    if settings["num_train"] < 1:
        raise DataError(f"config.data.num_train={settings['num_train']}: need at least 1 image.")
    for field in ("num_val", "num_test"):
        if settings[field] < 0:
            raise DataError(f"config.data.{field}={settings[field]} must be >= 0.")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise DataError(f"config.seed={seed!r}: the scenes dataset needs a non-negative integer.")
    jitter = data_config.train_jitter
    if isinstance(jitter, bool) or not isinstance(jitter, int | float) or not 0 <= jitter <= 1:
        raise DataError(f"config.data.train_jitter={jitter!r}: use a share between 0 and 1.")
    settings["train_jitter"] = float(jitter)
    settings["train_objects"] = _object_shares(data_config)
    settings["perturbed_test"] = bool(data_config.perturbed_test)
    return settings


def _object_shares(data_config: Any) -> list[float]:
    """`data.train_objects` checked: three shares >= 0 summing to 1 (uniform in runs written
    before the field existed)."""
    shares = getattr(data_config, "train_objects", UNIFORM_OBJECTS)
    valid = isinstance(shares, list | tuple) and len(shares) == 3
    valid = valid and all(isinstance(v, int | float) and not isinstance(v, bool) for v in shares)
    if not valid or min(shares) < 0 or abs(sum(shares) - 1) > 1e-6:
        raise DataError(
            f"config.data.train_objects={shares!r}: give the shares of training scenes with 1, 2 "
            f"and 3 objects, three numbers >= 0 that sum to 1, e.g. (0.15, 0.35, 0.5)."
        )
    return [float(v) for v in shares]


def scenes_dir(data_config: Any, seed: int) -> str:
    """Folder of the rendered images: `data_config.dir`, or a folder named by the settings."""
    if data_config.dir:
        return os.path.abspath(os.path.expanduser(data_config.dir))
    name = (
        f"scenes_seed{seed}_n{data_config.num_train}-{data_config.num_val}-"
        f"{data_config.num_test}_px{data_config.image_size}"
    )
    if data_config.train_jitter:
        name += f"_jitter{float(data_config.train_jitter):g}"
    if data_config.perturbed_test:
        name += "_perturbed"
    shares = _object_shares(data_config)
    if not np.allclose(shares, UNIFORM_OBJECTS):
        name += "_objects" + "-".join(f"{v:g}" for v in shares)
    return os.path.abspath(os.path.join(os.path.expanduser(data_config.cache_dir), name))


def _split_seed(seed: int, split: str, stream: int) -> int:
    # Each split (and its captions) has its own stream, so changing num_train keeps val and test.
    return int(np.random.SeedSequence([seed, SPLITS.index(split), stream]).generate_state(1)[0])


def _record(folder: str, image_id: str, split: str, captions, objects, perturbation=None):
    meta: dict[str, Any] = {"objects": [dataclasses.asdict(o) for o in objects]}
    if perturbation is not None:
        meta["perturbation"] = dataclasses.asdict(perturbation)
    return ImageRecord(image_id, os.path.join(folder, image_id), captions, split, meta)


def load_scenes(data_config: Any, seed: int) -> DatasetSplits:
    """Builds (or reuses) the rendered scenes and returns their records by split.

    Images are PNGs named `scene_00000.png`, ... (train first, then val, then test) in
    `scenes_dir(data_config, seed)`, and `perturbed_00000.png`, ... for `test_perturbed` (the test
    scenes and captions, drawn perturbed). A share `data.train_jitter` of the training images,
    picked at random, is drawn perturbed too. Images are rendered once: a later call with the same
    settings finds `manifest.json` (written last, so an interrupted render is redone) and all
    files, and only rebuilds the records, which is deterministic and fast.
    """
    settings = _settings(data_config, seed)
    folder = scenes_dir(data_config, seed)
    counts = {
        "train": settings["num_train"],
        "val": settings["num_val"],
        "test": settings["num_test"],
    }
    splits: DatasetSplits = {}
    index = 0
    for split in SPLITS:
        shares = settings["train_objects"] if split == "train" else UNIFORM_OBJECTS
        scenes = generate_scenes(counts[split], _split_seed(seed, split, 0), shares)
        caption_rng = np.random.default_rng(_split_seed(seed, split, 1))
        jittered: set[int] = set()
        if split == "train" and settings["train_jitter"]:
            jitter_rng = np.random.default_rng(_split_seed(seed, split, 2))
            count = round(settings["train_jitter"] * len(scenes))
            jittered = {int(i) for i in jitter_rng.permutation(len(scenes))[:count]}
        splits[split] = []
        for k, objects in enumerate(scenes):
            perturbation = None
            if k in jittered:
                perturbation = Perturbation.draw(len(objects), jitter_rng)
            captions = make_captions(objects, caption_rng)
            splits[split].append(
                _record(folder, f"scene_{index:05d}.png", split, captions, objects, perturbation)
            )
            index += 1
    if settings["perturbed_test"]:
        rng = np.random.default_rng(_split_seed(seed, "test", 3))
        splits[PERTURBED_SPLIT] = [
            _record(
                folder,
                f"perturbed_{k:05d}.png",
                PERTURBED_SPLIT,
                r.captions,
                [SceneObject(**o) for o in r.meta["objects"]],
                Perturbation.draw(len(r.meta["objects"]), rng),
            )
            for k, r in enumerate(splits["test"])
        ]
    manifest = {
        "settings": settings,
        "images": [
            {"image_id": r.image_id, "split": r.split, "captions": list(r.captions), **r.meta}
            for records in splits.values()
            for r in records
        ],
    }
    if not _is_rendered(folder, manifest):
        _render_all(folder, splits, settings["image_size"], manifest)
    return splits


def _is_rendered(folder: str, manifest: dict[str, Any]) -> bool:
    path = os.path.join(folder, MANIFEST)
    if not os.path.exists(path):
        return False
    try:
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
    except (OSError, json.JSONDecodeError):
        return False
    drawn = lambda images: [(i["image_id"], i["objects"], i.get("perturbation")) for i in images]
    manifest = json.loads(json.dumps(manifest))  # Tuples become lists, as in the file.
    same = old.get("settings") == manifest["settings"] and drawn(old.get("images", [])) == drawn(
        manifest["images"]
    )
    return same and all(
        os.path.exists(os.path.join(folder, i["image_id"])) for i in manifest["images"]
    )


def _render_all(
    folder: str, splits: DatasetSplits, image_size: int, manifest: dict[str, Any]
) -> None:
    from tqdm import tqdm

    os.makedirs(folder, exist_ok=True)
    manifest_path = os.path.join(folder, MANIFEST)
    if os.path.exists(manifest_path):
        os.remove(manifest_path)  # A stale manifest must not vouch for a half-done render.
    records = [r for split_records in splits.values() for r in split_records]
    # tqdm only shows up if rendering takes longer than 2 s.
    for record in tqdm(records, desc=f"Rendering scenes into {folder}", delay=2.0, unit="img"):
        objects = [SceneObject(**o) for o in record.meta["objects"]]
        perturbation = record.meta.get("perturbation")
        if perturbation is not None:
            perturbation = Perturbation(
                perturbation["background"],
                tuple(tuple(c) for c in perturbation["colour_shifts"]),
                tuple(perturbation["turns"]),
            )
        pixels = render_scene(objects, image_size, perturbation)
        # Low compression: these flat images stay small anyway and saving is the slow part.
        Image.fromarray(pixels).save(record.image_path, compress_level=1)
    tmp_path = manifest_path + ".tmp"
    with open(tmp_path, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp_path, manifest_path)
