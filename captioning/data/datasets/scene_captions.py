"""What a scene is and how it is described: objects, the caption grammar, and scoring.

* `SceneObject`: one object (shape, colour, size, centre, radius); `spatial_relation` says where one
  lies relative to another, along their larger displacement.
* `make_captions`: five different captions per scene from a small grammar with synonyms and varied
  word order, as if written by five annotators. Captions of 2- and 3-object images always state
  spatial relations (left of / right of / above / below) that follow from the true positions;
  1-object captions state the position in the image ("in the top left").
* `parse_objects` / `parse_relations` read generated captions back, so that `attribute_accuracy`
  (are colour and shape of every object right?) and `relation_accuracy` (are the stated spatial
  relations true?) score them against the true objects. `CAPTION_SCORES` declares both per
  caption (`caption_scores`), so evaluation reports them and SCST may reward them.

Coordinates: object centres `x`, `y` are fractions of the image side in [0, 1], y points down.
`captioning.data.datasets.scenes` draws and renders the scenes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from captioning.data.datasets.base import CaptionScore, ImageRecord
from captioning.data.text import clean_caption

NUM_CAPTIONS = 5
MAX_CAPTION_WORDS = 22

COLOUR_NAMES = ("red", "green", "blue", "yellow", "purple", "white")
SHAPES = ("circle", "square", "triangle", "star", "diamond")
SIZES = ("small", "large")

# Lexicon: every surface word that names a colour or shape -> its canonical name. The grammar uses
# one word per colour and shape, so no surface word is ambiguous.
COLOUR_WORDS: dict[str, str] = {c: c for c in COLOUR_NAMES}
SHAPE_WORDS: dict[str, str] = {s: s for s in SHAPES}
SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little"), "large": ("large", "big")}

RELATIONS = ("left", "right", "above", "below")
INVERSE = {"left": "right", "right": "left", "above": "below", "below": "above"}

Pair = tuple[str, str]  # (colour, shape)
Relation = tuple[Pair, str, Pair]  # (subject, one of RELATIONS, reference object)


@dataclasses.dataclass(frozen=True)
class SceneObject:
    """One object of a scene.

    Attributes:
      shape: one of SHAPES.
      colour: one of COLOURS.
      size: 'small' or 'large'.
      x: centre, fraction of the image width from the left, in [0, 1].
      y: centre, fraction of the image height from the top, in [0, 1].
      radius: drawing radius as a fraction of the image side (shapes fit in 1.1 * radius).
    """

    shape: str
    colour: str
    size: str
    x: float
    y: float
    radius: float

    @property
    def pair(self) -> Pair:
        return (self.colour, self.shape)


def spatial_relation(a: SceneObject | Mapping[str, Any], b: SceneObject | Mapping[str, Any]) -> str:
    """Where `a` lies relative to `b`: left|right|above|below, along their larger displacement."""
    ax, ay = _xy(a)
    bx, by = _xy(b)
    dx, dy = ax - bx, ay - by
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "above" if dy < 0 else "below"  # y points down.


def _xy(obj: SceneObject | Mapping[str, Any]) -> tuple[float, float]:
    if isinstance(obj, SceneObject):
        return obj.x, obj.y
    return float(obj["x"]), float(obj["y"])


def position_words(obj: SceneObject) -> tuple[str, str]:
    """(column, row) of the object in a 3x3 grid: ('left'|'centre'|'right', 'top'|'middle'|...)."""
    col = ("left", "centre", "right")[min(int(obj.x * 3), 2)]
    row = ("top", "middle", "bottom")[min(int(obj.y * 3), 2)]
    return col, row


# ----------------------------------------------------------------------------------------------
# Captions: a small grammar. Each family below is one way an annotator might describe the scene;
# an image gets five captions from five different families, so they always differ.

_REL_PHRASES = {
    "left": ("to the left of", "on the left of", "left of"),
    "right": ("to the right of", "on the right of", "right of"),
    "above": ("above", "over", "on top of"),
    "below": ("below", "under", "beneath", "underneath"),
}
_REL_SHORT = {"left": "left of", "right": "right of", "above": "above", "below": "below"}
# Said of one object when the caption names exactly two: "with the red circle on the left".
_SIDE_PHRASES = {
    "left": ("on the left",),
    "right": ("on the right",),
    "above": ("at the top", "on top"),
    "below": ("at the bottom",),
}
_VERTICAL = {"top": ("top", "upper"), "bottom": ("bottom", "lower")}


class _Grammar:
    """Random choices for one caption; `compact` drops size words and long relation phrases."""

    def __init__(self, rng: np.random.Generator, compact: bool):
        self.rng = rng
        self.compact = compact

    def pick(self, options: Sequence[str]) -> str:
        return options[int(self.rng.integers(len(options)))]

    def noun(self, obj: SceneObject, article: str = "a", size: bool = True) -> str:
        """Noun phrase: 'a big red circle', 'the red circle'."""
        words = [article]
        if size and not self.compact and self.rng.random() < 0.6:
            words.append(self.pick(SIZE_WORDS[obj.size]))
        words += [obj.colour, obj.shape]
        return " ".join(words)

    def rel(self, a: SceneObject, b: SceneObject) -> str:
        relation = spatial_relation(a, b)
        return _REL_SHORT[relation] if self.compact else self.pick(_REL_PHRASES[relation])

    def side(self, a: SceneObject, b: SceneObject) -> str:
        return self.pick(_SIDE_PHRASES[spatial_relation(a, b)])

    def position(self, obj: SceneObject) -> str:
        col, row = position_words(obj)
        if (col, row) == ("centre", "middle"):
            return self.pick(("in the middle", "in the center", "in the middle of the image"))
        if row == "middle":
            return self.pick((f"on the {col}", f"on the {col} side", f"on the {col} of the image"))
        if col == "centre":
            return self.pick((f"at the {row}", f"near the {row}", f"at the {row} of the image"))
        vertical = self.pick(_VERTICAL[row])  # "upper left" but never "at the upper".
        return self.pick((f"in the {vertical} {col}", f"in the {vertical} {col} corner"))


def _one_object_families(objs: Sequence[SceneObject]) -> list[Callable[[_Grammar], str]]:
    (a,) = objs
    return [
        lambda g: f"{g.noun(a)} {g.position(a)}",
        lambda g: f"there is {g.noun(a)} {g.position(a)}",
        lambda g: f"{g.position(a)} there is {g.noun(a)}",
        lambda g: f"{g.noun(a)} alone {g.position(a)}",
        lambda g: f"{g.noun(a, 'a single')} {g.position(a)}",
        lambda g: f"{g.pick(('an image of', 'a picture of'))} {g.noun(a)} {g.position(a)}",
    ]


def _two_object_families(objs: Sequence[SceneObject]) -> list[Callable[[_Grammar], str]]:
    def ordered(g: _Grammar) -> tuple[SceneObject, SceneObject]:
        i = int(g.rng.integers(2))  # Either object may come first: varied word order.
        return objs[i], objs[1 - i]

    def plain(g: _Grammar) -> str:
        a, b = ordered(g)
        return f"{g.noun(a)} {g.rel(a, b)} {g.noun(b)}"

    def there_is(g: _Grammar) -> str:
        a, b = ordered(g)
        return f"there is {g.noun(a)} {g.rel(a, b)} {g.noun(b)}"

    def definite(g: _Grammar) -> str:
        a, b = ordered(g)
        return f"{g.noun(a, 'the')} is {g.rel(a, b)} {g.noun(b, 'the')}"

    def picture(g: _Grammar) -> str:
        a, b = ordered(g)
        prefix = g.pick(("an image of", "a picture of", "a picture showing"))
        return f"{prefix} {g.noun(a)} {g.rel(a, b)} {g.noun(b)}"

    def pair_with(g: _Grammar) -> str:
        a, b = ordered(g)
        c = objs[int(g.rng.integers(2))]
        together = ""
        if spatial_relation(a, b) in ("left", "right"):
            together = " " + g.pick(("side by side", "next to each other"))
        other = a if c is b else b
        return (
            f"{g.noun(a)} and {g.noun(b)}{together}, "
            f"with {g.noun(c, 'the', False)} {g.side(c, other)}"
        )

    def sides(g: _Grammar) -> str:
        a, b = ordered(g)
        return f"{g.noun(a)} {g.side(a, b)} and {g.noun(b)} {g.side(b, a)}"

    return [plain, there_is, definite, picture, pair_with, sides]


def _three_object_families(objs: Sequence[SceneObject]) -> list[Callable[[_Grammar], str]]:
    def ordered(g: _Grammar) -> list[SceneObject]:
        return [objs[int(i)] for i in g.rng.permutation(3)]

    def chain_and(g: _Grammar, prefix: str = "") -> str:
        a, b, c = ordered(g)
        x = (a, b)[int(g.rng.integers(2))]
        return (
            f"{prefix}{g.noun(a)} {g.rel(a, b)} {g.noun(b)} and "
            f"{g.noun(c)} {g.rel(c, x)} {g.noun(x, 'the', False)}"
        )

    def which_is(g: _Grammar) -> str:
        a, b, c = ordered(g)
        return f"{g.noun(a)} {g.rel(a, b)} {g.noun(b)}, which is {g.rel(b, c)} {g.noun(c)}"

    def listing(g: _Grammar) -> str:
        a, b, c = ordered(g)
        x, y = ordered(g)[:2]
        return (
            f"three shapes: {g.noun(a)}, {g.noun(b)} and {g.noun(c)}, with "
            f"{g.noun(x, 'the', False)} {g.rel(x, y)} {g.noun(y, 'the', False)}"
        )

    def definite(g: _Grammar) -> str:
        a, b, c = ordered(g)
        return (
            f"{g.noun(b, 'the', False)} is {g.rel(b, a)} {g.noun(a, 'the', False)} and "
            f"{g.noun(c, 'the', False)} is {g.rel(c, a)} {g.noun(a, 'the', False)}"
        )

    families = [chain_and, lambda g: chain_and(g, "there is "), which_is, listing, definite]
    # "A and B are both above C" only when it is true for both.
    for c in objs:
        a, b = (o for o in objs if o is not c)
        if spatial_relation(a, c) == spatial_relation(b, c):
            families.append(
                lambda g, a=a, b=b, c=c: (
                    f"{g.noun(a)} and {g.noun(b)} are both {g.rel(b, c)} {g.noun(c)}"
                )
            )
            break
    return families


_FAMILIES = {1: _one_object_families, 2: _two_object_families, 3: _three_object_families}


def make_captions(objects: Sequence[SceneObject], rng: np.random.Generator) -> tuple[str, ...]:
    """Five different captions (raw sentences, <= 22 words) for the scene, drawn with `rng`."""
    families = _FAMILIES[len(objects)](objects)
    chosen = rng.choice(len(families), size=NUM_CAPTIONS, replace=False)
    captions = []
    for index in chosen:
        text = families[int(index)](_Grammar(rng, compact=False))
        if len(clean_caption(text)) > MAX_CAPTION_WORDS:
            text = families[int(index)](_Grammar(rng, compact=True))
        captions.append(text[0].upper() + text[1:] + ".")
    assert len(set(captions)) == NUM_CAPTIONS, captions  # Different families never coincide.
    return tuple(captions)


# ----------------------------------------------------------------------------------------------
# Parsing captions back into objects and relations (for scoring generated captions).

# Words that state "subject <relation> object" when they sit between two object mentions; the
# side words count only when followed by "of" ("left of"), otherwise they are side phrases.
_BINARY_WORDS = {
    "above": "above",
    "over": "above",
    "below": "below",
    "under": "below",
    "beneath": "below",
    "underneath": "below",
}
_SIDE_WORDS = {"left": "left", "right": "right", "top": "above", "bottom": "below"}
_CLAUSE_BREAKS = {"and", "with", "while", "which"}


def _mentions(words: Sequence[str]) -> list[tuple[int, int, Pair]]:
    """(first word, last word, (colour, shape)) for each object named in the cleaned words.

    A colour word followed within two words by a shape word names an object ("red circle",
    "red big circle"); another colour or shape word in between breaks the link.
    """
    found = []
    for i, word in enumerate(words):
        if word not in COLOUR_WORDS:
            continue
        for j in range(i + 1, min(i + 3, len(words))):
            if words[j] in SHAPE_WORDS:
                found.append((i, j, (COLOUR_WORDS[word], SHAPE_WORDS[words[j]])))
                break
            if words[j] in COLOUR_WORDS:
                break
    return found


def parse_objects(caption: str) -> list[Pair]:
    """The (colour, shape) pairs a caption names, in order of first mention, without repeats."""
    pairs: list[Pair] = []
    for _, _, pair in _mentions(clean_caption(caption)):
        if pair not in pairs:
            pairs.append(pair)
    return pairs


def parse_relations(caption: str) -> list[Relation]:
    """The spatial relations a caption states, as (subject, relation, reference) triples.

    Two phrasings are understood:
    - Between two consecutive object mentions X ... Y, each of "left of", "right of", "top of",
      "bottom of", "above", "over", "below", "under", "beneath", "underneath" states
      (X, relation, Y): "a red circle to the left of a blue square" -> (red circle, left, blue
      square); "there is a blue square on the right of a red circle" -> (blue square, right, red
      circle).
    - When the caption names exactly two objects, a side word (left, right, top, bottom, not
      followed by "of") in the words after a mention, up to the next mention or and/with/while/
      which, places that object relative to the other: "... with the red circle on the left" ->
      (red circle, left, other). Two side words there (a corner, "top left") say nothing.
    A relation of an object to itself is dropped.
    """
    words = clean_caption(caption)
    mentions = _mentions(words)

    def of_follows(k: int) -> bool:
        return k + 1 < len(words) and words[k + 1] == "of"

    relations: list[Relation] = []
    for (_, end, x), (start, _, y) in zip(mentions, mentions[1:], strict=False):
        for k in range(end + 1, start):
            if words[k] in _BINARY_WORDS:
                relations.append((x, _BINARY_WORDS[words[k]], y))
            elif words[k] in _SIDE_WORDS and of_follows(k):
                relations.append((x, _SIDE_WORDS[words[k]], y))
    named = list(dict.fromkeys(pair for _, _, pair in mentions))
    if len(named) == 2:
        for index, (_, end, x) in enumerate(mentions):
            stop = mentions[index + 1][0] if index + 1 < len(mentions) else len(words)
            sides = []
            for k in range(end + 1, stop):
                if words[k] in _CLAUSE_BREAKS:
                    break
                if words[k] in _SIDE_WORDS and not of_follows(k):
                    sides.append(_SIDE_WORDS[words[k]])
            if len(sides) == 1:
                relations.append((x, sides[0], named[1] if x == named[0] else named[0]))
    return [(x, r, y) for x, r, y in relations if x != y]


def _true_objects(meta: Mapping[str, Any]) -> dict[Pair, Mapping[str, Any]]:
    objects = meta["objects"]
    return {
        (o.colour, o.shape) if isinstance(o, SceneObject) else (o["colour"], o["shape"]): o
        for o in objects
    }


def _check_lengths(captions: Sequence[str], metas: Sequence[Mapping[str, Any]]) -> None:
    if len(captions) != len(metas):
        raise ValueError(f"{len(captions)} captions but {len(metas)} metas; need one per image.")


def caption_scores(caption: str, meta: Mapping[str, Any]) -> tuple[float, float | None]:
    """One caption against its scene -> (attribute score 0|1, relation score or None).

    attribute: 1.0 when the caption names exactly the true (colour, shape) pairs (see
    `attribute_accuracy`). relation: the share of the stated relations between true objects that
    are true, 0.0 when none is stated; None when the scene has fewer than two objects or the
    caption names fewer than two of them (see `relation_accuracy`).
    """
    truth = _true_objects(meta)
    named = parse_objects(caption)
    attribute = float(set(named) == set(truth))
    if len(truth) < 2 or len([p for p in named if p in truth]) < 2:
        return attribute, None
    stated = [(x, r, y) for x, r, y in parse_relations(caption) if x in truth and y in truth]
    correct = [spatial_relation(truth[x], truth[y]) == r for x, r, y in stated]
    return attribute, float(np.mean(correct)) if correct else 0.0


def attribute_score(caption: str, record: ImageRecord) -> float:
    """1.0 when `caption` names exactly the true (colour, shape) pairs of `record`'s scene."""
    return caption_scores(caption, record.meta)[0]


def relation_score(caption: str, record: ImageRecord) -> float | None:
    """The share of `caption`'s stated relations that are true (None: not eligible)."""
    return caption_scores(caption, record.meta)[1]


# The scenes' own caption scores; their split means are `attribute_accuracy` and
# `relation_accuracy` below.
CAPTION_SCORES = (
    CaptionScore("attribute_accuracy", attribute_score),
    CaptionScore("relation_accuracy", relation_score),
)


def attribute_accuracy(captions: Sequence[str], metas: Sequence[Mapping[str, Any]]) -> float:
    """Share of images whose caption names exactly the true (colour, shape) pairs.

    An image counts when the set of pairs found by `parse_objects` equals the set of true pairs:
    every object named with the right colour and shape, and nothing invented. Sizes and positions
    are not checked. `metas` are `ImageRecord.meta` dicts (with 'objects'); 0.0 for no images.
    """
    _check_lengths(captions, metas)
    if not captions:
        return 0.0
    return float(np.mean([caption_scores(c, m)[0] for c, m in zip(captions, metas, strict=True)]))


def relation_accuracy(captions: Sequence[str], metas: Sequence[Mapping[str, Any]]) -> float:
    """Mean over eligible images of the share of stated relations that are true.

    Eligible: the image has >= 2 objects and its caption names >= 2 of them (`parse_objects`).
    Stated relations are those of `parse_relations` whose two objects are both in the image
    (relations involving an invented object are ignored; `attribute_accuracy` punishes those).
    A stated relation (X, r, Y) is true when `spatial_relation(X, Y) == r`, i.e. X lies on side r
    of Y along the axis of their larger displacement ("left of" for an object mostly above is
    false); the generator keeps every pair clearly along one axis. An eligible image stating no
    relation scores 0, since references always state one. Returns 0.0 when no image is eligible.
    """
    _check_lengths(captions, metas)
    scores = [caption_scores(c, m)[1] for c, m in zip(captions, metas, strict=True)]
    scores = [s for s in scores if s is not None]
    return float(np.mean(scores)) if scores else 0.0
