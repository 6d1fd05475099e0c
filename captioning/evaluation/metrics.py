"""Caption metrics: one registry of every metric a run reports, and pycocoevalcap's BLEU-1..4,
METEOR, ROUGE-L, CIDEr-D and (optionally) SPICE.

    split = SplitCaptions(records, captions, tokenizer="simple", meteor=True)
    score(split, config.data.dataset)      # {name: value}: every metric of the run, report order
    register(Metric("caption_length", caption_score=caption_length, logged=True))   # a new one

A `Metric` says how a split is scored (`split_score`, or the mean of a per-caption
`caption_score`), whether each caption has its own score (then `scst.reward` may weigh it),
whether validation computes and logs it, and whether results.md and the grid table show it. A
dataset adds its own scores (`captioning.data.datasets.registry.CAPTION_SCORES`: the scenes'
attribute and relation accuracy). Evaluation, validation, the SCST reward and the tables show
whatever `metrics_for(dataset)` lists; nothing else names metrics.

    result = score_captions(references, hypotheses, tokenizer="simple", meteor=True)
    result["scores"]["CIDEr"], result["per_image"][image_id], result["skipped"]

Conventions (say them when you compare with papers):
- Tokenisation. "simple" (the default, no Java) is `text.clean_caption(c, min_word_len=1)`:
  lowercase, ASCII punctuation stripped, non-alphabetic words (numbers) dropped, one-letter words
  kept. "ptb" is pycocoevalcap's Stanford PTBTokenizer (Java), the COCO-server convention:
  lowercase, punctuation tokens removed, numbers kept. References and hypotheses always get the
  same one. After tokenisation '|' is removed (METEOR's field separator; it makes its JVM hang).
- BLEU is on the 0-1 scale (papers often print x100), corpus-level with the "closest" reference
  length for the brevity penalty, as the COCO evaluation does.
- "CIDEr" is pycocoevalcap's CIDEr-D: n = 1..4, clipped n-gram counts, Gaussian length penalty
  with sigma = 6, x10. Its IDF comes from the references of the scored set itself, so the value
  depends on the set (a set of one image always scores 0): compare runs on the same set only.
- METEOR is METEOR 1.5 (`-l en -norm`); its corpus score is computed from pooled statistics, not
  the mean of the per-image scores. It needs Java; without Java it is reported under "skipped".
- SPICE needs Java and the Stanford CoreNLP 3.6.0 jars (see `spice_missing_files`); when they are
  absent it is reported under "skipped" (no download is attempted). A skipped metric is never 0.
- Empty hypotheses (or ones that tokenise to nothing) are scored as the single word
  `EMPTY_PLACEHOLDER`, which matches no reference: they score ~0 and add one word to the corpus
  length. Empty references are dropped; an image left without any reference is an error.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import logging
import os
import shutil
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.spice import spice as _spice_module

from captioning.data.datasets import registry as datasets_registry
from captioning.data.datasets.base import CaptionScore, ImageRecord
from captioning.data.text import clean_caption

TOKENIZERS = ("simple", "ptb")
EMPTY_PLACEHOLDER = "emptyhypothesis"  # One word that matches no reference.

# SPICE looks for these in pycocoevalcap/spice/lib (pycocoevalcap's get_stanford_models.py names).
SPICE_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
_SPICE_LIB_DIR = os.path.join(os.path.dirname(os.path.abspath(_spice_module.__file__)), "lib")
_METEOR_TIMEOUT_BASE_S = 120.0  # METEOR is killed (and reported skipped) after this
_METEOR_TIMEOUT_PER_IMAGE_S = 0.05  # plus this per image: it hangs on malformed input.

_log = logging.getLogger(__name__)


class MetricsError(RuntimeError):
    """A metric cannot run as configured (e.g. Java missing for the PTB tokenizer)."""


def java_available() -> bool:
    """True when a `java` executable is on PATH."""
    return shutil.which("java") is not None


def spice_missing_files() -> list[str]:
    """Paths of the CoreNLP jars SPICE needs that are not there (empty list = all present)."""
    paths = [os.path.join(_SPICE_LIB_DIR, name) for name in SPICE_JARS]
    return [p for p in paths if not os.path.exists(p)]


def _check_inputs(
    references: Mapping[str, Sequence[str]], hypotheses: Mapping[str, str]
) -> list[str]:
    """Validates ids and types; returns the image ids in reference order."""
    ref_ids, hyp_ids = set(references), set(hypotheses)
    if ref_ids != hyp_ids:
        missing = sorted(map(str, ref_ids - hyp_ids))
        extra = sorted(map(str, hyp_ids - ref_ids))
        raise ValueError(
            "Hypotheses and references must cover the same image ids: "
            f"{len(missing)} without a hypothesis {missing[:10]}, "
            f"{len(extra)} without references {extra[:10]}. Caption exactly the scored split."
        )
    if not ref_ids:
        raise ValueError("Nothing to score: references and hypotheses are empty.")
    for image_id, refs in references.items():
        if isinstance(refs, str) or not all(isinstance(r, str) for r in refs):
            raise TypeError(f"references[{image_id!r}] must be a list of strings, got {refs!r}.")
        if not refs:
            raise ValueError(f"references[{image_id!r}] is empty: every image needs a caption.")
        if not isinstance(hypotheses[image_id], str):
            raise TypeError(
                f"hypotheses[{image_id!r}] must be one string, got {hypotheses[image_id]!r}."
            )
    return list(references)


def _ptb_tokenize(captions: Sequence[str]) -> list[str]:
    """Stanford PTB tokenisation of a flat list (one JVM call); empty strings stay empty."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    if not java_available():
        raise MetricsError(
            "eval.tokenizer=ptb runs the Stanford PTB tokenizer, which needs Java: install a JRE "
            "(e.g. apt-get install default-jre-headless) or use eval.tokenizer=simple."
        )
    # Empty lines are not sent: only non-empty captions reach the tokenizer.
    todo = {i: [{"caption": c}] for i, c in enumerate(captions) if c}
    if not todo:
        return ["" for _ in captions]
    try:
        done = PTBTokenizer().tokenize(todo)
    except OSError as e:
        raise MetricsError(
            f"The PTB tokenizer failed ({e}); it writes a temporary file next to its jar in "
            "pycocoevalcap/tokenizer, which must be writable. Or use eval.tokenizer=simple."
        ) from e
    if set(done) != set(todo) or any(len(v) != 1 for v in done.values()):
        raise MetricsError("The PTB tokenizer returned a different number of lines than it got.")
    return [done[i][0] if i in done else "" for i in range(len(captions))]


def tokenize(captions: Sequence[str], tokenizer: str = "simple") -> list[str]:
    """Tokenises captions to space-joined words with `tokenizer` ("simple" or "ptb")."""
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"eval.tokenizer must be one of {TOKENIZERS}, got {tokenizer!r}.")
    flat = [" ".join(c.split()) for c in captions]  # No newlines: both tokenizers are line-based.
    if tokenizer == "simple":
        out = [" ".join(clean_caption(c, min_word_len=1)) for c in flat]
    else:
        out = _ptb_tokenize(flat)
    return [" ".join(c.replace("|", " ").split()) for c in out]


class _Meteor(Meteor):
    """pycocoevalcap's METEOR with a `close()` that cannot deadlock.

    Upstream `__del__` takes a lock that `compute_score` leaves held when it raises, which would
    hang garbage collection; here closing is idempotent and lock-free.
    """

    def close(self) -> None:
        proc = getattr(self, "meteor_p", None)
        if proc is None:
            return
        self.meteor_p = None
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            with contextlib.suppress(OSError):
                stream.close()
        proc.kill()
        proc.wait()

    def __del__(self):
        self.close()


_meteor_lock = threading.Lock()
_meteor: _Meteor | None = None


def start_meteor() -> None:
    """Starts METEOR's JVM now (it loads its paraphrase tables for seconds, on another core,
    while the caller decodes), to be used by the next scoring calls of this process."""
    if java_available():
        _meteor_scorer()


def _meteor_scorer() -> _Meteor:
    """This process's METEOR JVM, started on first use and kept for later splits."""
    global _meteor
    with _meteor_lock:
        if _meteor is None or _meteor.meteor_p is None or _meteor.meteor_p.poll() is not None:
            if _meteor is None:
                atexit.register(lambda: _meteor is not None and _meteor.close())
            _meteor = _Meteor()
        return _meteor


def _run_meteor(gts: dict, res: dict) -> tuple[float, list[float]]:
    """Scores with this process's METEOR JVM, killed (and replaced next time) when it fails or
    does not answer within a timeout."""
    scorer = _meteor_scorer()
    proc = scorer.meteor_p
    timeout = _METEOR_TIMEOUT_BASE_S + _METEOR_TIMEOUT_PER_IMAGE_S * len(gts)
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        score, per_image = scorer.compute_score(gts, res)
    except (OSError, ValueError) as e:
        killed = not timer.is_alive()
        proc.kill()
        stderr = proc.stderr.read().decode(errors="replace").strip()[-500:]
        why = f"no answer within {timeout:.0f} s" if killed else f"{type(e).__name__}: {e}"
        scorer.close()
        raise MetricsError(f"METEOR failed ({why}). Java said: {stderr or 'nothing'}") from e
    finally:
        timer.cancel()
    return float(score), [float(s) for s in per_image]


def _run_spice(gts: dict, res: dict, image_ids: list) -> tuple[float, list[float]]:
    """Scores with SPICE; returns per-image F-scores in `image_ids` order."""
    import subprocess

    try:
        score, per_image = _spice_module.Spice().compute_score(gts, res)
    except (OSError, subprocess.CalledProcessError, ValueError) as e:
        raise MetricsError(f"SPICE failed ({type(e).__name__}: {e}).") from e
    by_id = {i: float(s["All"]["f"]) for i, s in zip(sorted(image_ids), per_image, strict=True)}
    return float(score), [by_id[i] for i in image_ids]


def _spice_skip_reason() -> str | None:
    """Why SPICE cannot run here, or None when it can."""
    if not java_available():
        return "SPICE needs Java: install a JRE (e.g. apt-get install default-jre-headless)."
    missing = spice_missing_files()
    if missing:
        return (
            f"SPICE needs the Stanford CoreNLP 3.6.0 jars {', '.join(SPICE_JARS)} in "
            f"{_SPICE_LIB_DIR} (missing: {', '.join(os.path.basename(m) for m in missing)}). "
            "Copy them there from stanford-corenlp-full-2015-12-09.zip "
            "(nlp.stanford.edu/software), or set eval.spice=False."
        )
    return None


def score_captions(
    references: Mapping[str, Sequence[str]],
    hypotheses: Mapping[str, str],
    *,
    tokenizer: str = "simple",
    meteor: bool = True,
    spice: bool = False,
) -> dict:
    """Scores one hypothesis per image against its references.

    Returns {"scores": {metric: float}, "per_image": {image_id: {metric: float}},
    "skipped": {metric: reason}, "tokenizer": name, "num_empty": empty hypotheses}. Metrics that
    were not requested or cannot run are in "skipped", never in "scores".
    """
    image_ids = _check_inputs(references, hypotheses)
    counts = [len(references[i]) for i in image_ids]
    flat = [c for i in image_ids for c in references[i]] + [hypotheses[i] for i in image_ids]
    tokens = tokenize(flat, tokenizer)
    gts, res, num_empty, start = {}, {}, 0, 0
    for image_id, count, hyp in zip(image_ids, counts, tokens[sum(counts) :], strict=True):
        refs = [r for r in tokens[start : start + count] if r]
        start += count
        if not refs:
            raise ValueError(
                f"All references of image {image_id!r} are empty after {tokenizer} tokenisation "
                f"({list(references[image_id])!r}); fix or drop that image's captions."
            )
        num_empty += not hyp
        gts[image_id], res[image_id] = refs, [hyp or EMPTY_PLACEHOLDER]

    scores: dict[str, float] = {}
    per_metric: dict[str, list[float]] = {}
    skipped: dict[str, str] = {}

    bleu, bleu_per_image = Bleu(4).compute_score(gts, res, verbose=0)
    for n in range(4):
        scores[f"Bleu_{n + 1}"] = float(bleu[n])
        per_metric[f"Bleu_{n + 1}"] = [float(s) for s in bleu_per_image[n]]

    if not meteor:
        skipped["METEOR"] = "disabled (eval.meteor=False)."
    elif not java_available():
        skipped["METEOR"] = (
            "METEOR needs Java: install a JRE (e.g. apt-get install default-jre-headless)."
        )
    else:
        try:
            scores["METEOR"], per_metric["METEOR"] = _run_meteor(gts, res)
        except MetricsError as e:
            skipped["METEOR"] = str(e)

    for name, scorer in (("ROUGE_L", Rouge()), ("CIDEr", Cider())):
        score, per_image = scorer.compute_score(gts, res)
        scores[name], per_metric[name] = float(score), [float(s) for s in per_image]

    if not spice:
        skipped["SPICE"] = "disabled (eval.spice=False)."
    elif reason := _spice_skip_reason():
        skipped["SPICE"] = reason
    else:
        try:
            scores["SPICE"], per_metric["SPICE"] = _run_spice(gts, res, image_ids)
        except MetricsError as e:
            skipped["SPICE"] = str(e)

    for name, reason in skipped.items():
        if not reason.startswith("disabled"):
            _log.warning("%s skipped: %s", name, reason)
    per_image = {
        image_id: {name: values[k] for name, values in per_metric.items()}
        for k, image_id in enumerate(image_ids)
    }
    return {
        "scores": scores,
        "per_image": per_image,
        "skipped": skipped,
        "tokenizer": tokenizer,
        "num_empty": num_empty,
    }


# Words a finished caption does not end with: a caption ending in one was cut off ("... with a").
FUNCTION_WORDS = frozenset(
    ["a", "an", "the", "and", "or", "with", "of", "on", "in", "to", "at", "by", "for", "from"]
    + ["is", "are", "which", "while", "that", "its", "their"]
)


def caption_stats(captions: Sequence[str]) -> dict[str, float]:
    """How the generated captions read, beyond the reference metrics (our cleaning's words):

    repeated_pair_share: share of captions in which some adjacent word pair occurs twice (a
      reference may do that: "a red circle left of a blue square and a star above the red circle").
    longest_word_run: the most times any caption says one word in a row ("square square square"
      is 3; references never say a word twice in a row).
    bad_ending_share: share of captions that end in a function word ("... with a", "... and the"),
      the failure self-critical training is known for.
    mean_length: words per caption; vocabulary_used: distinct words over all captions.
    """
    repeated = bad_endings = longest = total_words = 0
    vocabulary: set[str] = set()
    for caption in captions:
        words = clean_caption(caption)
        pairs = list(zip(words, words[1:], strict=False))
        repeated += len(set(pairs)) < len(pairs)
        bad_endings += bool(words) and words[-1] in FUNCTION_WORDS
        run = 0
        for i, word in enumerate(words):
            run = run + 1 if i and word == words[i - 1] else 1
            longest = max(longest, run)
        total_words += len(words)
        vocabulary.update(words)
    count = max(len(captions), 1)
    return {
        "repeated_pair_share": repeated / count,
        "longest_word_run": float(longest),
        "bad_ending_share": bad_endings / count,
        "mean_length": total_words / count,
        "vocabulary_used": float(len(vocabulary)),
    }


# ---------------------------------------------------------------------------------------------
# The metric registry: every metric a run reports, in one place
# ---------------------------------------------------------------------------------------------


class SplitCaptions:
    """A split's generated captions, one per record, as the metrics score them.

    Metrics that share one pass read it through `once(fn)`, which computes `fn(self)` on first
    use: `pycocoevalcap` (BLEU, METEOR, ROUGE-L, CIDEr-D and SPICE together, with the split's
    `tokenizer`; METEOR and SPICE only when `meteor` / `spice`) and `caption_stats`.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        captions: Sequence[str],
        *,
        tokenizer: str = "simple",
        meteor: bool = True,
        spice: bool = False,
    ):
        if len(records) != len(captions):
            raise ValueError(f"{len(captions)} captions for {len(records)} images; give one each.")
        self.records, self.captions = list(records), list(captions)
        self.tokenizer, self.meteor, self.spice = tokenizer, meteor, spice
        self._done: dict[Callable, Any] = {}

    def once(self, fn: Callable[[SplitCaptions], Any]) -> Any:
        """fn(self), computed once per split."""
        if fn not in self._done:
            self._done[fn] = fn(self)
        return self._done[fn]

    @property
    def pycocoevalcap(self) -> dict:
        """`score_captions` of the captions against the records' references: scores, per_image,
        skipped, tokenizer, num_empty."""
        return self.once(_score_references)


def _score_references(split: SplitCaptions) -> dict:
    references = {r.image_id: list(r.captions) for r in split.records}
    hypotheses = {r.image_id: c for r, c in zip(split.records, split.captions, strict=True)}
    return score_captions(
        references, hypotheses, tokenizer=split.tokenizer, meteor=split.meteor, spice=split.spice
    )


def _caption_stats(split: SplitCaptions) -> dict[str, float]:
    return caption_stats(split.captions)


@dataclasses.dataclass(frozen=True)
class Metric:
    """One metric: how a split is scored, and where the value shows.

    Attributes:
      name: its key in reports, validation scores, `train.val_metric` and `scst.reward`.
      split_score: SplitCaptions -> the split's value, or None when it cannot be computed here
        (METEOR without Java). Default: the mean of `caption_score` over the captions it judges
        (0.0 when it judges none).
      caption_score: (caption, its image's record) -> the caption's own score, or None when it
        cannot be judged. A metric that has one is an SCST reward term (`scst.reward`).
      references: scored against the reference captions. Reports list these first, then the
        dataset's own scores, then the others, each group in registration order.
      validation: computed by the per-epoch validation (so `train.val_metric` may name it).
      logged: written each epoch as `eval_<name>` (log line, TensorBoard, history.json).
      column: a column of results.md and of the grid table.
    """

    name: str
    split_score: Callable[[SplitCaptions], float | None] | None = None
    caption_score: Callable[[str, ImageRecord], float | None] | None = None
    references: bool = False
    validation: bool = True
    logged: bool = False
    column: bool = False

    def __post_init__(self):
        if self.split_score is None and self.caption_score is None:
            raise ValueError(f"Metric {self.name!r} needs a split_score or a caption_score.")

    def value(self, split: SplitCaptions) -> float | None:
        """The metric of one split (None: not computed here)."""
        if self.split_score is not None:
            return self.split_score(split)
        scores = [
            self.caption_score(c, r) for c, r in zip(split.captions, split.records, strict=True)
        ]
        scores = [s for s in scores if s is not None]
        return float(np.mean(scores)) if scores else 0.0


_REGISTRY: dict[str, Metric] = {}


def register(metric: Metric) -> Metric:
    """Adds `metric` to every evaluation, validation and table (and to the SCST reward terms when
    it has a `caption_score`). Raises ValueError when its name is taken."""
    if metric.name in _REGISTRY:
        raise ValueError(f"A metric named {metric.name!r} is already registered.")
    _REGISTRY[metric.name] = metric
    return metric


def unregister(name: str) -> None:
    """Removes the metric `name` (a test's, or a plugin's) from the registry."""
    del _REGISTRY[name]


def _reference_score(name: str, split: SplitCaptions) -> float | None:
    return split.pycocoevalcap["scores"].get(name)


def _stat(name: str, split: SplitCaptions) -> float:
    return split.once(_caption_stats)[name]


def _pycocoevalcap(name: str, **flags) -> Metric:
    return Metric(name, functools.partial(_reference_score, name), references=True, **flags)


def _caption_stat(name: str, **flags) -> Metric:
    return Metric(name, functools.partial(_stat, name), validation=False, **flags)


# Corpus-level metrics against the references (pycocoevalcap, `score_captions`); METEOR and SPICE
# need Java, so validation skips them.
register(_pycocoevalcap("Bleu_1", column=True))
register(_pycocoevalcap("Bleu_2", column=True))
register(_pycocoevalcap("Bleu_3", column=True))
register(_pycocoevalcap("Bleu_4", column=True, logged=True))
register(_pycocoevalcap("METEOR", column=True, validation=False))
register(_pycocoevalcap("ROUGE_L", column=True))
register(_pycocoevalcap("CIDEr", column=True, logged=True))
register(_pycocoevalcap("SPICE", column=True, validation=False))
# How the captions read (`caption_stats`), in final evaluations only.
register(_caption_stat("repeated_pair_share", column=True))
register(_caption_stat("longest_word_run"))
register(_caption_stat("bad_ending_share"))
register(_caption_stat("mean_length"))
register(_caption_stat("vocabulary_used"))


def _dataset_metric(score: CaptionScore) -> Metric:
    """A dataset's own caption score as a metric: validated, logged and tabulated."""
    return Metric(score.name, caption_score=score.score, logged=True, column=True)


def metrics_for(dataset: str | None) -> list[Metric]:
    """Every metric of a run on `dataset` (`config.data.dataset`; None: with the scores of every
    dataset), in report order: the reference metrics, the dataset's own scores, the others."""
    names = [dataset] if dataset is not None else list(datasets_registry.CAPTION_SCORES)
    own = [_dataset_metric(s) for name in names for s in datasets_registry.caption_scores(name)]
    clash = sorted({m.name for m in own} & set(_REGISTRY))
    if clash:
        raise ValueError(
            f"Dataset {dataset!r} supplies scores named as registered metrics {clash}."
        )
    registered = list(_REGISTRY.values())
    return (
        [m for m in registered if m.references] + own + [m for m in registered if not m.references]
    )


def score(split: SplitCaptions, dataset: str, *, validation: bool = False) -> dict[str, float]:
    """{name: value} of every metric of `dataset` computed on `split`, in report order (with
    `validation`, only those marked for it). Metrics without a value here are left out."""
    scores = {}
    for metric in metrics_for(dataset):
        if validation and not metric.validation:
            continue
        value = metric.value(split)
        if value is not None:
            scores[metric.name] = value
    return scores


def logged(scores: Mapping[str, float], dataset: str) -> dict[str, float]:
    """The validation `scores` written each epoch (the metrics marked `logged`)."""
    names = {m.name for m in metrics_for(dataset) if m.logged}
    return {name: value for name, value in scores.items() if name in names}


def columns(dataset: str | None = None) -> list[str]:
    """The metric columns of results.md (for `dataset`) and of the grid table (None: any)."""
    return [m.name for m in metrics_for(dataset) if m.column]


def caption_scores(dataset: str) -> dict[str, Callable[[str, ImageRecord], float | None]]:
    """{name: caption_score} of the metrics of `dataset` that score single captions."""
    return {m.name: m.caption_score for m in metrics_for(dataset) if m.caption_score is not None}
