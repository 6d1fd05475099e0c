"""captioning.evaluation.metrics: the registry, and hand-checked scores (one METEOR JVM at most)."""

import shutil

import pytest

from captioning.data.datasets.base import ImageRecord
from captioning.evaluation import metrics


def _require_java():
    """METEOR and the PTB tokenizer run on Java: their tests fail, never skip, without it."""
    assert shutil.which("java"), (
        "java is not installed: METEOR and the PTB tokenizer need it (Debian: apt-get install "
        "default-jre-headless, as .ci/run does)"
    )


REFS = {
    "dog": ["A black dog runs on the grass.", "a dog plays outside"],
    "cats": ["two cats sleep on a red sofa", "Two cats are sleeping."],
    "bike": ["a man rides a bike down the street", "a cyclist on a road"],
}


def _score(refs, hyps, **kwargs):
    kwargs.setdefault("meteor", False)
    return metrics.score_captions(refs, hyps, **kwargs)


def test_identical_hypothesis_scores_one():
    # Case and punctuation vanish in the "simple" tokenisation.
    result = _score({"dog": REFS["dog"]}, {"dog": "a black dog runs on the GRASS!"})
    for n in range(1, 5):
        assert result["scores"][f"Bleu_{n}"] == pytest.approx(1.0, abs=1e-6)
    assert result["scores"]["ROUGE_L"] == pytest.approx(1.0)
    assert result["tokenizer"] == "simple"


def test_bleu_and_rouge_by_hand():
    # hyp: a dog dog runs on sand (6 words); refs: 7 and 4 words.
    # BLEU-1: clipped unigram matches a, dog (2 in hyp, max 1 in a ref), runs, on = 4 of 6 -> 2/3.
    #   Brevity penalty with the closest reference length 7: exp(1 - 7/6) = 0.846482.
    #   BLEU-1 = 2/3 * 0.846482 = 0.564321.
    # BLEU-2: bigrams "a dog" (ref 2), "dog runs", "runs on" (ref 1) match; "dog dog", "on sand"
    #   do not -> 3/5. BLEU-2 = sqrt(2/3 * 3/5) * 0.846482 = 0.535362.
    # ROUGE-L: LCS with ref 1 = "a dog runs on" = 4 (P 4/6, R 4/7); with ref 2 "a dog" = 2
    #   (P 2/6, R 2/4). P = max = 2/3, R = max = 4/7, beta = 1.2:
    #   F = (1 + 1.44) P R / (R + 1.44 P) = 0.929524 / 1.531429 = 0.606965.
    result = _score({"dog": REFS["dog"]}, {"dog": "a dog dog runs on sand"})
    assert result["scores"]["Bleu_1"] == pytest.approx(0.564321, abs=1e-6)
    assert result["scores"]["Bleu_2"] == pytest.approx(0.535362, abs=1e-6)
    assert result["scores"]["ROUGE_L"] == pytest.approx(0.606965, abs=1e-6)
    assert result["per_image"]["dog"]["Bleu_1"] == pytest.approx(0.564321, abs=1e-6)


def test_cider_prefers_the_right_caption_and_per_image_is_complete():
    hyps = {
        "dog": "a dog plays outside",
        "cats": "a man rides a bike",
        "bike": "a cyclist on a road",
    }
    result = _score(REFS, hyps)
    per_image = result["per_image"]
    assert set(per_image) == set(REFS)
    for scores in per_image.values():
        assert set(scores) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"}
    assert per_image["dog"]["CIDEr"] > per_image["cats"]["CIDEr"]
    assert per_image["bike"]["CIDEr"] > per_image["cats"]["CIDEr"]
    assert result["scores"]["CIDEr"] == pytest.approx(
        sum(s["CIDEr"] for s in per_image.values()) / 3
    )
    wrong = _score(REFS, {"dog": "two cats sleep", "cats": "a cyclist", "bike": "a black dog"})
    assert result["scores"]["CIDEr"] > wrong["scores"]["CIDEr"]


def test_empty_hypotheses_score_zero_without_crashing():
    result = _score(REFS, {"dog": "", "cats": "!!!", "bike": "a man rides a bike"})
    assert result["num_empty"] == 2
    for image_id in ("dog", "cats"):
        assert result["per_image"][image_id]["ROUGE_L"] == 0.0
        assert result["per_image"][image_id]["CIDEr"] == 0.0
        assert result["per_image"][image_id]["Bleu_1"] == pytest.approx(0.0, abs=1e-6)
    assert result["per_image"]["bike"]["Bleu_1"] > 0.5


def test_mismatched_ids_raise():
    with pytest.raises(ValueError, match=r"1 without a hypothesis \['bike'\]"):
        _score(REFS, {"dog": "a dog", "cats": "two cats"})
    with pytest.raises(ValueError, match=r"1 without references \['fish'\]"):
        _score(REFS, {"dog": "a", "cats": "b", "bike": "c", "fish": "d"})
    with pytest.raises(TypeError, match="list of strings"):
        _score({"dog": "a dog"}, {"dog": "a dog"})


def test_meteor_and_spice_skipped_without_java(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda *args, **kwargs: None)
    result = metrics.score_captions(REFS, {k: v[0] for k, v in REFS.items()}, spice=True)
    assert "METEOR" not in result["scores"] and "SPICE" not in result["scores"]
    assert "Java" in result["skipped"]["METEOR"]
    assert "Java" in result["skipped"]["SPICE"]
    assert "METEOR" not in result["per_image"]["dog"]
    with pytest.raises(metrics.MetricsError, match="eval.tokenizer=simple"):
        metrics.score_captions(REFS, {k: v[0] for k, v in REFS.items()}, tokenizer="ptb")


def test_spice_skipped_when_jars_are_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(shutil, "which", lambda *args, **kwargs: "/usr/bin/java")
    monkeypatch.setattr(metrics, "_SPICE_LIB_DIR", str(tmp_path))
    result = _score(REFS, {k: v[0] for k, v in REFS.items()}, spice=True)
    reason = result["skipped"]["SPICE"]
    assert "stanford-corenlp-3.6.0-models.jar" in reason and str(tmp_path) in reason
    assert "SPICE" not in result["scores"]
    assert _score(REFS, {k: v[0] for k, v in REFS.items()})["skipped"]["SPICE"].startswith(
        "disabled"
    )


def test_ptb_tokenizer():
    _require_java()
    assert metrics.tokenize(["A dog, runs!", "", "x ||| y"], "ptb") == ["a dog runs", "", "x y"]


def test_meteor_with_java():
    _require_java()
    # The only test that starts the METEOR JVM (~10 s). Covers an empty and a hostile hypothesis.
    hyps = {"dog": "a black dog runs on the grass", "cats": "", "bike": "x ||| y\nz"}
    result = metrics.score_captions(REFS, hyps, meteor=True)
    assert "METEOR" not in result["skipped"], result["skipped"].get("METEOR")
    per_image = result["per_image"]
    assert per_image["dog"]["METEOR"] > 0.9
    assert per_image["cats"]["METEOR"] == 0.0
    assert 0.0 < result["scores"]["METEOR"] < 1.0
    # The next split reuses the running JVM and scores alike; a dead JVM is replaced.
    jvm = metrics._meteor_scorer()
    assert metrics.score_captions(REFS, hyps, meteor=True)["per_image"] == per_image
    assert metrics._meteor_scorer() is jvm
    jvm.close()
    assert metrics.score_captions(REFS, hyps, meteor=True)["per_image"] == per_image
    assert metrics._meteor_scorer() is not jvm


def test_caption_stats_count_repetition_bad_endings_length_and_vocabulary():
    stats = metrics.caption_stats(
        ["a red circle left of a red circle", "square square square", "a blue star with a", ""]
    )
    assert stats["repeated_pair_share"] == 0.5  # "red circle" twice; "square square" twice.
    assert stats["longest_word_run"] == 3.0
    assert stats["bad_ending_share"] == 0.25  # "... with a".
    assert stats["mean_length"] == (8 + 3 + 5 + 0) / 4
    assert stats["vocabulary_used"] == 9.0


def _records(*captions):
    return [ImageRecord(f"i{k}", "", (c,), "test") for k, c in enumerate(captions)]


def test_registry_lists_reference_metrics_then_the_dataset_s_own_then_the_rest():
    names = [m.name for m in metrics.metrics_for("scenes")]
    assert names[:10] == [
        *("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE"),
        *("attribute_accuracy", "relation_accuracy"),
    ]
    assert "repeated_pair_share" in names[10:]
    assert "attribute_accuracy" not in [m.name for m in metrics.metrics_for("flickr8k")]
    # results.md's columns: every reference metric (a skipped one shows a dash), the dataset's.
    assert metrics.columns("flickr8k") == [*names[:8], "repeated_pair_share"]
    assert metrics.columns("scenes") == [*names[:10], "repeated_pair_share"]
    assert metrics.columns() == metrics.columns("scenes")  # The grid's: of any dataset.
    assert list(metrics.caption_scores("scenes")) == ["attribute_accuracy", "relation_accuracy"]
    assert metrics.caption_scores("flickr8k") == {}
    with pytest.raises(ValueError, match="already registered"):
        metrics.register(metrics.Metric("CIDEr", caption_score=lambda c, r: 0.0))
    with pytest.raises(ValueError, match="split_score or a caption_score"):
        metrics.Metric("nothing")


def test_score_computes_each_metric_once_in_report_order():
    records = _records("a dog runs on the grass", "two cats sleep")
    split = metrics.SplitCaptions(records, ["a dog runs", "two cats sleep"], meteor=False)
    scores = metrics.score(split, "flickr8k")
    reference = split.pycocoevalcap["scores"]
    assert list(scores) == [*reference, *metrics.caption_stats(split.captions)]
    assert scores["CIDEr"] == reference["CIDEr"]
    assert "METEOR" not in scores and "METEOR" in split.pycocoevalcap["skipped"]
    # Validation: no caption statistics; logged: the metrics marked so.
    validation = metrics.score(split, "flickr8k", validation=True)
    assert list(validation) == list(reference)
    assert list(metrics.logged(validation, "flickr8k")) == ["Bleu_4", "CIDEr"]
