"""Self-critical training: advantages, the loss mask, where the gradient flows, the starting run
check, and an SCST run that resumes exactly after a crash."""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import saved_params, sigkill_then_resume
from flax import nnx

from captioning import models
from captioning.data import text
from captioning.data.datasets.base import ImageRecord
from captioning.training import rewards, scst, train
from configs import test as test_config

END, PAD = text.END_ID, text.PAD_ID


def test_mean_baseline_advantages_sum_to_zero_per_image():
    rewards = np.array([[1.0, 2.0, 3.0, 6.0], [0.5, 0.5, 0.5, 0.5]])
    advantage, baseline = scst.advantages(rewards, "mean")
    np.testing.assert_allclose(advantage.sum(axis=1), 0.0, atol=1e-12)
    assert baseline[0, 3] == pytest.approx((1 + 2 + 3) / 3)  # The other samples' mean.
    np.testing.assert_allclose(advantage[1], 0.0)
    advantage, baseline = scst.advantages(rewards, "greedy", np.array([2.0, 1.0]))
    np.testing.assert_allclose(advantage, rewards - np.array([[2.0], [1.0]]))
    with pytest.raises(ValueError, match="config.scst.baseline"):
        scst.advantages(rewards, "average")
    with pytest.raises(ValueError, match="num_samples"):
        scst.advantages(rewards[:, :1], "mean")


def _scene(*objects):
    return ImageRecord(
        "x",
        "x.png",
        ("a red circle left of a blue square",),
        "train",
        meta={
            "objects": [
                {"colour": c, "shape": s, "size": "small", "x": x, "y": y, "radius": 0.07}
                for c, s, x, y in objects
            ]
        },
    )


def test_scene_rewards_weigh_each_caption_s_own_attribute_and_relation_scores():
    records = [_scene(("red", "circle", 0.2, 0.5), ("blue", "square", 0.8, 0.5))]
    records.append(_scene(("green", "star", 0.5, 0.5)))
    scorer = rewards.CiderD([list(r.captions) for r in records])
    spec = "attribute_accuracy + 0.5*relation_accuracy"
    reward = scst.reward_function(spec, scorer, records, "scenes")
    texts = [
        "a red circle left of a blue square <end>",  # both right: 1 + 0.5
        "a red circle right of a blue square <end>",  # objects right, relation false: 1
        "a red circle left of a green square <end>",  # a wrong object, no pair of true ones: 0
        "a green star <end>",  # one object: no relation score
        "a red star <end>",
    ]
    got = reward(texts, np.array([0, 0, 0, 1, 1]))
    np.testing.assert_allclose(got, [1.5, 1.0, 0.0, 1.0, 0.0])
    cider = scst.reward_function("CIDEr", scorer, records, "scenes")(texts[:2], np.array([0, 0]))
    np.testing.assert_allclose(cider, scorer.scores(texts[:2], np.array([0, 0])))
    both = scst.reward_function("2*CIDEr + relation_accuracy", scorer, records, "scenes")
    np.testing.assert_allclose(both(texts[:2], np.array([0, 0])), 2 * cider + [1.0, 0.0])
    with pytest.raises(ValueError, match="scst.reward.*BLEU"):
        scst.reward_function("CIDEr + BLEU", scorer, records, "scenes")
    # Only the scenes supply attribute scores: elsewhere the term is refused.
    with pytest.raises(ValueError, match="attribute_accuracy.*unknown.*dataset 'flickr8k'"):
        plain = [ImageRecord("y", "y.png", ("a dog",), "train")]
        scst.reward_function("attribute_accuracy", rewards.CiderD([["a dog"]]), plain, "flickr8k")


def test_mask_keeps_words_up_to_and_including_the_first_end():
    tokens = np.array([[5, 6, END, 7, END], [5, END, PAD, PAD, PAD], [5, 6, 7, 8, 9]])
    mask = np.asarray(scst.sequence_mask(tokens))
    np.testing.assert_array_equal(mask, [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])


def test_caption_texts_end_with_the_end_token_only_when_ended():
    vocab = text.Vocabulary(["red", "circle"])
    red, circle = vocab.stoi["red"], vocab.stoi["circle"]
    texts = scst.caption_texts(np.array([[red, circle, END, red], [red, red, red, red]]), vocab)
    assert texts == ["red circle <end>", "red red red red"]


def test_gradient_flows_only_through_the_sampled_log_probabilities():
    """d loss / d logits = -advantage x (one_hot - softmax) on the kept words / word count;
    nothing reaches the advantages (rewards and baselines are constants)."""
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 4, 6)), jnp.float32)
    tokens = jnp.asarray([[4, 5, END, 4], [5, 5, 4, 4]])
    advantage = jnp.asarray([0.5, -2.0])
    d_logits, d_advantage = jax.grad(scst.policy_loss, argnums=(0, 2))(logits, tokens, advantage)
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], np.float32)
    expected = -(np.asarray(jax.nn.one_hot(tokens, 6)) - np.asarray(jax.nn.softmax(logits)))
    expected *= (np.asarray(advantage)[:, None] * mask / mask.sum())[..., None]
    np.testing.assert_allclose(d_logits, expected, atol=1e-6)
    np.testing.assert_array_equal(d_advantage, 0.0)
    assert np.all(np.asarray(d_logits)[0, 3] == 0)  # After <end>: no gradient.


@pytest.fixture(scope="module")
def xe_run(tmp_path_factory):
    """A finished (one-epoch) cross-entropy run of the tiny config."""
    root = tmp_path_factory.mktemp("scst")
    config = test_config.get_config()
    config.data.cache_dir = str(root / "cache")
    config.train.num_epochs = 1
    config.eval.extra_splits = ""
    train.train_and_evaluate(config, str(root / "xe"))
    return config, str(root / "xe"), root


def _scst_config(xe_config, xe_dir, epochs=2):
    config = test_config.get_config()
    config.data.cache_dir = xe_config.data.cache_dir
    config.eval.extra_splits = ""
    config.scst.init_from = xe_dir
    config.scst.num_epochs = epochs
    config.scst.batch_size = 16  # 48 training images: 3 steps an epoch.
    config.scst.learning_rate = 1e-3
    return config


def test_a_run_with_other_features_or_decoder_is_refused(xe_run):
    xe_config, xe_dir, root = xe_run
    config = _scst_config(xe_config, xe_dir)
    config.model.hidden_size = 64
    with pytest.raises(ValueError, match="model.hidden_size"):
        scst.train_and_evaluate(config, str(root / "refused"))
    config = _scst_config(xe_config, "")
    config.scst.init_from = ""
    with pytest.raises(ValueError, match="config.scst.init_from"):
        scst.train_and_evaluate(config, str(root / "refused"))


def test_scst_resumes_exactly_after_a_crash(xe_run, monkeypatch):
    xe_config, xe_dir, root = xe_run
    config = _scst_config(xe_config, xe_dir)
    whole = scst.train_and_evaluate(config, str(root / "whole"))
    history = json.loads((root / "whole" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1, 2]  # Epoch 0: the starting run, validated.
    assert all("train_reward" in h and "train_baseline" in h for h in history[1:])
    assert (root / "whole" / "curves.png").exists()
    assert "| scst |" in (root / "whole" / "results.md").read_text()

    calls = {"n": 0}
    original = scst.rewards.CiderD.scores

    def crash_in_epoch_two(self, *args):
        calls["n"] += 1
        if calls["n"] == 5:  # The second step of epoch 2 (3 steps an epoch).
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(scst.rewards.CiderD, "scores", crash_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        scst.train_and_evaluate(config, str(root / "resumed"))
    monkeypatch.setattr(scst.rewards.CiderD, "scores", original)
    resumed = scst.train_and_evaluate(config, str(root / "resumed"))
    whole_step, whole_params = saved_params(root / "whole")
    resumed_step, resumed_params = saved_params(root / "resumed")
    assert whole_step == resumed_step == 6
    for a, b in zip(jax.tree.leaves(whole_params), jax.tree.leaves(resumed_params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert resumed["metrics"] == whole["metrics"] and resumed["captions"] == whole["captions"]


def test_sigkill_mid_scst_then_same_command_resumes_and_finishes(xe_run, tmp_path):
    """kill -9 during the SCST phase, rerun the same command: it resumes and ends at the end."""
    xe_config, xe_dir, _ = xe_run
    workdir = tmp_path / "scst"
    command = [
        sys.executable,
        "main.py",
        "--config=configs/test.py",
        f"--workdir={workdir}",
        f"--config.data.cache_dir={xe_config.data.cache_dir}",
        "--config.eval.extra_splits=",
        f"--config.scst.init_from={xe_dir}",
        "--config.scst.num_epochs=30",
        "--config.scst.batch_size=16",
    ]
    history = sigkill_then_resume(command, workdir, tmp_path / "killed.log")
    assert [h["epoch"] for h in history] == list(range(31))  # Epoch 0: the starting run.
    step, _ = saved_params(str(workdir))
    assert step == history[-1]["step"] == 30 * 3  # 48 training images, 16 a step.
    assert "| scst |" in (workdir / "results.md").read_text()


def test_greedy_baseline_trains_against_the_greedy_captions_reward(xe_run):
    xe_config, xe_dir, root = xe_run
    config = _scst_config(xe_config, xe_dir, epochs=1)
    config.scst.baseline = "greedy"
    scst.train_and_evaluate(config, str(root / "greedy_baseline"))
    history = json.loads((root / "greedy_baseline" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1]
    baseline, reward = history[1]["train_baseline"], history[1]["train_reward"]
    assert np.isfinite(baseline) and baseline >= 0 and np.isfinite(reward)
    assert baseline != reward  # The greedy captions' reward, not the samples' own mean.


def test_a_tiny_scst_run_raises_its_mean_reward(xe_run):
    xe_config, xe_dir, root = xe_run
    config = _scst_config(xe_config, xe_dir, epochs=8)
    config.scst.learning_rate = 3e-3
    scst.train_and_evaluate(config, str(root / "rising"))
    history = json.loads((root / "rising" / "history.json").read_text())
    rewards_by_epoch = [h["train_reward"] for h in history[1:]]
    assert np.mean(rewards_by_epoch[-2:]) > rewards_by_epoch[0], rewards_by_epoch


def test_log_ratio_to_the_reference_is_zero_at_the_start_and_the_logp_difference_after():
    model_config = test_config.get_config().model
    model_config.decoder, model_config.feed_dim = "merge", 0
    model = models.create_model(model_config, 8, (16,), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    log_ratio = jax.jit(scst.make_log_ratio(graphdef, num_samples=2))
    features = jnp.asarray(np.random.default_rng(0).normal(size=(3, 16)), jnp.float32)
    tokens = jnp.asarray([[4, 5, END, 0], [5, 5, 4, 4]] * 3)
    np.testing.assert_array_equal(log_ratio(params, params, features, tokens), np.zeros(6))
    shifted = jax.tree.map(lambda x: x, params)
    bias = shifted["out_proj"]["bias"]
    shifted["out_proj"]["bias"] = bias.replace(bias[...].at[4].add(1.0))
    ratio = np.asarray(log_ratio(shifted, params, features, tokens))
    assert ratio.shape == (6,) and np.all(ratio != 0)
    assert np.all(ratio[1::2] > ratio[0::2])  # The second sample says word 4 twice, the first once.


def test_kl_penalty_keeps_the_policy_nearer_the_starting_model(xe_run):
    xe_config, xe_dir, root = xe_run
    distances, kls = {}, {}
    for beta in (0.0, 3.0):
        config = _scst_config(xe_config, xe_dir, epochs=3)
        config.scst.learning_rate = 3e-3
        config.scst.kl_weight = beta
        scst.train_and_evaluate(config, str(root / f"kl{beta}"))
        _, start = saved_params(xe_dir)
        _, end = saved_params(root / f"kl{beta}", "latest")
        distances[beta] = float(
            sum(np.sum((np.asarray(a) - np.asarray(b)) ** 2) for a, b in
                zip(jax.tree.leaves(start), jax.tree.leaves(end), strict=True))
        )  # fmt: skip
        history = json.loads((root / f"kl{beta}" / "history.json").read_text())
        kls[beta] = [h["train_kl"] for h in history[1:]]
    assert kls[0.0] == [0.0] * 3  # Not computed when off.
    assert all(np.isfinite(kls[3.0]))
    assert distances[3.0] < distances[0.0], distances
