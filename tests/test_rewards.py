"""CIDEr-D rewards: equal to pycocoevalcap, deduplicated batch frequencies, cached scorer."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.cider.cider_scorer import CiderScorer

from captioning.data.datasets import flickr8k
from captioning.data.text import clean_caption
from captioning.training.rewards import CiderD, DocumentFrequency, cider_d, document_frequency

FLICKR8K_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k_text"


def coco_cider(candidates, references):
    """pycocoevalcap's corpus and per-image CIDEr-D, one image per candidate."""
    gts = {i: list(refs) for i, refs in enumerate(references)}
    res = {i: [c] for i, c in enumerate(candidates)}
    mean, per_image = Cider().compute_score(gts, res)
    return mean, np.asarray(per_image)


class _FixedFrequencyScorer(CiderScorer):
    def __init__(self, frequency: DocumentFrequency):
        super().__init__(n=4, sigma=6.0)
        self._frequency = frequency

    def compute_doc_freq(self):
        self.document_frequency = defaultdict(float, self._frequency.counts)


def coco_cider_with_frequency(candidates, references, frequency: DocumentFrequency):
    """pycocoevalcap's per-image CIDEr-D with the document frequencies replaced by `frequency`.

    pycocoevalcap takes log(number of reference sets) from the sets it scores, so sets without
    n-grams pad them up to `frequency.num_documents`.
    """
    assert frequency.num_documents >= len(candidates)
    scorer = _FixedFrequencyScorer(frequency)
    for cand, refs in zip(candidates, references, strict=True):
        scorer += (cand, list(refs))
    for _ in range(frequency.num_documents - len(candidates)):
        scorer += ("", [""])
    return np.asarray(scorer.compute_score()[1])[: len(candidates)]


def random_corpus(seed: int, num_images: int, vocabulary: int = 6):
    """Sentences over a tiny vocabulary: repeated words and n-grams, lengths 0..12, 1..6 refs.

    Empty candidates and references included (zero vectors; images with fewer references).
    """
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(vocabulary)]

    def sentence():
        return " ".join(rng.choice(words, size=rng.integers(0, 13)))

    candidates = [sentence() for _ in range(num_images)]
    references = [[sentence() for _ in range(rng.integers(1, 7))] for _ in range(num_images)]
    return candidates, references


@pytest.fixture(scope="module")
def flickr8k_test():
    if not FLICKR8K_TEXT.is_dir():
        pytest.skip(f"the shared Flickr8k text is absent ({FLICKR8K_TEXT})")
    splits = flickr8k.read_flickr8k(FLICKR8K_TEXT, check_images=False)
    tokenised = [[" ".join(clean_caption(c)) for c in r.captions] for r in splits["test"]]
    return [caps[0] for caps in tokenised], [caps[1:] for caps in tokenised]


def test_equals_pycocoevalcap_on_flickr8k_test(flickr8k_test):
    candidates, references = flickr8k_test
    assert len(candidates) == 1000 and all(len(r) == 4 for r in references)
    ours = cider_d(candidates, references)
    mean, theirs = coco_cider(candidates, references)
    assert ours.dtype == np.float64 and ours.shape == (1000,)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)
    assert ours.mean() == pytest.approx(mean, abs=1e-6)
    assert ours.std() > 0.1  # not a degenerate comparison


def test_equals_pycocoevalcap_on_random_sentences():
    # Repeated words (clipping), lengths 0..12 (penalty), 1..6 references, empty candidates.
    candidates, references = random_corpus(seed=0, num_images=60)
    np.testing.assert_allclose(
        cider_d(candidates, references), coco_cider(candidates, references)[1], rtol=0, atol=1e-9
    )


def test_repeated_samples_count_each_reference_set_once():
    candidates, references = random_corpus(seed=1, num_images=12)
    once = cider_d(candidates, references)
    samples = 5
    rng = np.random.default_rng(2)
    other = random_corpus(seed=3, num_images=12 * samples)[0]
    repeated_cands, repeated_refs = [], []
    for i, (cand, refs) in enumerate(zip(candidates, references, strict=True)):
        repeated_cands += [cand] + other[i * samples : (i + 1) * samples - 1]
        repeated_refs += [list(refs) for _ in range(samples)]
    order = rng.permutation(len(repeated_cands))  # samples of one image need not be adjacent
    shuffled = cider_d([repeated_cands[j] for j in order], [repeated_refs[j] for j in order])
    repeated = np.empty_like(shuffled)
    repeated[order] = shuffled
    np.testing.assert_allclose(repeated[::samples], once, rtol=0, atol=1e-12)
    # Counting every copy (what pycocoevalcap does with the repeated lists) changes the scores.
    _, copies_counted = coco_cider(repeated_cands, repeated_refs)
    assert np.abs(copies_counted[::samples] - once).max() > 1e-3


def test_precomputed_frequency_from_the_same_references_changes_nothing():
    candidates, references = random_corpus(seed=4, num_images=30)
    frequency = document_frequency(references)
    assert frequency.num_documents == 30
    assert frequency.log_num_documents == math.log(30.0)
    np.testing.assert_allclose(
        cider_d(candidates, references, frequency), cider_d(candidates, references), atol=1e-12
    )
    # Repeating an image's references leaves the frequencies as they were.
    assert document_frequency(references + references[:5]) == frequency


def test_document_frequency_counts_reference_sets():
    frequency = document_frequency([["a dog runs", "a dog"], ["a cat"], ["a dog runs", "a dog"]])
    assert frequency.num_documents == 2
    assert frequency.counts[("a",)] == 2
    assert frequency.counts[("dog",)] == 1  # twice in the set, once per set
    assert frequency.counts[("a", "dog", "runs")] == 1
    assert ("runs", "a") not in frequency.counts
    assert len(frequency.counts) == 8  # a dog runs cat | a-dog dog-runs a-cat | a-dog-runs


def test_frequency_from_another_corpus_hand_computed():
    # One image: its own frequencies give every n-gram idf log(1) - log(1) = 0, hence 0.
    candidates, references = ["a c"], [["a b"]]
    assert cider_d(candidates, references)[0] == 0.0
    # A 4-image corpus where "a" is in 1 set and "b" in 3; "c" is in none (df 0 -> idf log 4).
    corpus = DocumentFrequency({("a",): 1, ("b",): 3, ("a", "b"): 1}, num_documents=4)
    idf_a, idf_b, idf_c = math.log(4), math.log(4) - math.log(3), math.log(4)
    # Only the unigram "a" matches; no bigram matches; equal lengths, so no penalty.
    unigram = idf_a**2 / (math.hypot(idf_a, idf_c) * math.hypot(idf_a, idf_b))
    expected = 10 * (unigram + 0 + 0 + 0) / 4
    assert cider_d(candidates, references, corpus)[0] == pytest.approx(expected, abs=1e-12)
    np.testing.assert_allclose(
        cider_d(candidates, references, corpus),
        coco_cider_with_frequency(candidates, references, corpus),
        atol=1e-12,
    )


def test_frequency_from_another_corpus_matches_pycocoevalcap():
    # Many candidate and reference n-grams are absent from the other corpus's frequencies.
    candidates, references = random_corpus(seed=5, num_images=25, vocabulary=8)
    frequency = document_frequency(random_corpus(seed=6, num_images=40, vocabulary=6)[1])
    ours = cider_d(candidates, references, frequency)
    theirs = coco_cider_with_frequency(candidates, references, frequency)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-9)
    assert np.abs(ours - cider_d(candidates, references)).max() > 1e-3


def test_edge_cases():
    references = [["a dog runs on the grass", "a dog runs"], ["two cats sleep on a sofa"]]
    scores = cider_d(["", "birds fly over water"], references)
    assert scores.tolist() == [0.0, 0.0]  # empty; no word in common
    # Identical to every reference: cosine 1 for each n (all idf log 2 > 0), no penalty: 10.
    same = cider_d(
        ["a dog runs on the grass", "two cats"], [["a dog runs on the grass"] * 3, ["x"]]
    )
    assert same[0] == pytest.approx(10.0, abs=1e-12)
    assert cider_d(["a dog runs"], [["a dog runs"]]).tolist() == [0.0]  # one set: idf 0
    assert cider_d([], []).shape == (0,)


def test_hand_computed_clipping_and_length_penalty():
    candidates = ["dog dog dog", "cat"]
    references = [["dog runs"], ["cat sits"]]
    # Two sets, every n-gram (also "dog dog", in none) has idf L = log 2. Image 0, unigrams:
    # candidate (3L), reference (L, L), clipped overlap min(3L, L) * L = L^2. Candidate bigram
    # "dog dog" matches nothing; it has no 4-gram, the reference no trigram. Bigram lengths 2 vs 1.
    penalty = math.exp(-(1**2) / (2 * 6**2))
    first = 10 * (1 / (3 * math.sqrt(2))) * penalty / 4
    # Image 1: unigram "cat" against (cat, sits); bigram lengths 0 vs 1.
    second = 10 * (1 / math.sqrt(2)) * penalty / 4
    ours = cider_d(candidates, references)
    np.testing.assert_allclose(ours, [first, second], rtol=0, atol=1e-12)
    np.testing.assert_allclose(ours, coco_cider(candidates, references)[1], rtol=0, atol=1e-12)


def test_cached_scorer_equals_cider_d():
    candidates, references = random_corpus(seed=7, num_images=40)
    rng = np.random.default_rng(8)
    image = rng.integers(0, 40, size=120)
    samples = random_corpus(seed=9, num_images=120)[0]
    sample_refs = [references[i] for i in image]
    # The last frequencies know words and n-grams that the references lack.
    foreign = document_frequency(random_corpus(seed=10, num_images=50, vocabulary=8)[1])
    for frequency in (None, document_frequency(references), foreign):
        scorer = CiderD(references, frequency)
        expected = cider_d(samples, sample_refs, frequency or document_frequency(references))
        np.testing.assert_allclose(scorer.scores(samples, image), expected, rtol=0, atol=1e-12)
    assert CiderD(references).scores([], np.zeros(0, np.int64)).shape == (0,)
    # Listing images twice does not change the frequencies CiderD takes from its references.
    twice = CiderD(references + references)
    np.testing.assert_allclose(
        twice.scores(samples, image + 40), CiderD(references).scores(samples, image), atol=1e-12
    )


def test_cached_scorer_on_flickr8k(flickr8k_test):
    candidates, references = flickr8k_test
    frequency = document_frequency(references)
    scorer = CiderD(references, frequency)
    image = np.repeat(np.arange(0, 1000, 8), 5)
    samples = [candidates[(i * 7) % 1000] for i in range(len(image))]
    np.testing.assert_allclose(
        scorer.scores(samples, image),
        cider_d(samples, [references[i] for i in image], frequency),
        rtol=0,
        atol=1e-12,
    )
    np.testing.assert_allclose(
        scorer.scores(candidates, np.arange(1000)), cider_d(candidates, references), atol=1e-12
    )


def test_bad_input():
    with pytest.raises(ValueError, match="differ in length"):
        cider_d(["a dog"], [["a dog"], ["a cat"]])
    with pytest.raises(ValueError, match=r"references\[1\] is empty"):
        cider_d(["a dog", "a cat"], [["a dog"], []])
    with pytest.raises(ValueError, match=r"references\[0\] is empty"):
        document_frequency([[]])
    with pytest.raises(TypeError, match="single string"):
        cider_d(["a dog"], ["a dog"])
    with pytest.raises(ValueError, match="num_documents"):
        DocumentFrequency({}, 0)
    scorer = CiderD([["a dog"], ["a cat"]])
    with pytest.raises(ValueError, match="one index per candidate"):
        scorer.scores(["a dog"], np.array([0, 1]))
    with pytest.raises(ValueError, match=r"lie in \[0, 2\)"):
        scorer.scores(["a dog"], np.array([2]))
    with pytest.raises(ValueError, match="integers"):
        scorer.scores(["a dog"], np.array([0.0]))
