"""Self-critical sequence training (SCST, Rennie et al. 2017): fine-tune a decoder on CIDEr-D.

    python main.py --config=configs/scenes_scst.py --workdir=runs/scenes_scst \
        --config.scst.init_from=runs/scenes

A second training phase that starts from a finished cross-entropy run (`scst.init_from`): its best
parameters, vocabulary, feature statistics and feature store. Each step takes `scst.batch_size`
training images and, per image:

1. samples `scst.num_samples` captions with the jitted sampler (`search.sample_decode`,
   temperature 1, no dropout);
2. scores each with CIDEr-D against the image's references, with document frequencies computed
   once from all training references (`rewards.CiderD`). As in ruotianluo/self-critical.pytorch,
   `<end>` is part of every candidate and reference, so ending a caption well is rewarded and
   ending it early ("a red circle and a") is not; with `scst.kl_weight` beta > 0, each sample's
   reward loses beta x log(p / p_start) of its words (teacher-forced under the policy and the
   starting model), a sampled estimate of KL(policy || start): a penalty for straying from the
   cross-entropy model (as in RLHF), which keeps what SCST does not reward from drifting;
3. subtracts a baseline: `mean`, the mean reward of the image's *other* samples (the "new
   self-critical" variant; the advantages of an image then sum to zero), or `greedy`, the reward of
   the image's greedy caption (Rennie et al.);
4. minimises -(reward - baseline) x the sum of the sample's token log-probabilities up to and
   including its first `<end>` (nothing after it), divided by the number of those tokens in the
   batch. The log-probabilities are recomputed by teacher forcing the sampled words (the same
   values as the sampler's, `tests/test_search.py`, but one parallel pass whose backward pass is
   the LSTM's hand-written one, instead of differentiating through the sampling loop); rewards
   and baselines are constants, so the gradient flows only through those log-probabilities.

Everything else is the cross-entropy loop's: per-epoch greedy validation and checkpoint selection
by `train.val_metric`, Orbax checkpoints and exact resume (keys folded per step, image order by
(seed, epoch)), TensorBoard, `history.json`, `curves.png` (here with the mean reward and
baseline), and the final evaluation (`results.md` rows say `scst`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx, traverse_util

from captioning import parallel
from captioning.data import text
from captioning.data.prepare import PreparedData, prepare_data
from captioning.decoding import search
from captioning.evaluation import evaluate, metrics
from captioning.run_dir import RunDir
from captioning.training import loop, rewards

BASELINES = ("mean", "greedy")
END_WORD = "<end>"
# Sections that must agree with the run SCST starts from (what it learned and what it reads).
MATCHING = ("data", "encoder", "model")
# ... except these fields, which change neither the vocabulary, the features nor the model.
MATCHING_EXCEPT = {"data.cache_dir", "data.skip_bad_images", "encoder.batch_size", "model.dropout"}


def sequence_mask(tokens: np.ndarray | jax.Array) -> jax.Array:
    """tokens [N, T] -> [N, T] float32: 1 on every word up to and including the first `<end>`
    (padding after it is 0; a caption that never ends keeps all T words)."""
    tokens = jnp.asarray(tokens)
    ended_before = jnp.cumsum(tokens == text.END_ID, axis=1) - (tokens == text.END_ID)
    return ((ended_before == 0) & (tokens != text.PAD_ID)).astype(jnp.float32)


def caption_texts(tokens: np.ndarray, vocab: text.Vocabulary) -> list[str]:
    """Sampled token rows -> the strings CIDEr-D scores: words, then `<end>` if the caption
    ended (padding and anything after `<end>` dropped)."""
    texts = []
    for row in np.asarray(tokens):
        ends = np.flatnonzero(row == text.END_ID)
        words = [vocab.itos[i] for i in row[: ends[0] if len(ends) else len(row)] if i > 0]
        texts.append(" ".join(words + ([END_WORD] if len(ends) else [])))
    return texts


def reference_texts(data: PreparedData, split: str, min_word_len: int) -> list[list[str]]:
    """Each image's references as CIDEr-D strings: cleaned words (as training sees them, words
    outside the vocabulary as `<unk>`), then `<end>`."""
    vocab = data.vocab
    return [
        [
            " ".join(vocab.decode(vocab.encode(text.clean_caption(c, min_word_len))).split())
            + f" {END_WORD}"
            for c in record.captions
        ]
        for record in data.splits[split]
    ]


def reward_function(spec: str, scorer: rewards.CiderD, records, dataset: str) -> Callable:
    """`scst.reward` -> rewards(texts [N], image_rows [N]) -> [N] float64 (a weighted sum).

    Its terms: "CIDEr" (CIDEr-D of each caption, `scorer`) and every metric of `dataset` with a
    per-caption score (`metrics.caption_scores`: on the scenes each caption's attribute score,
    1 when it names exactly the true objects, and relation score, the share of its relations
    true; a caption a metric cannot judge earns 0). `texts` are `caption_texts` strings,
    `image_rows` index `records` (the training images).
    """
    terms = evaluate.parse_selection(spec, "scst.reward")
    caption_scores = metrics.caption_scores(dataset)
    known = ["CIDEr", *caption_scores]
    unknown = [name for _, name in terms if name not in known]
    if unknown:
        raise ValueError(
            f"config.scst.reward={spec!r}: {unknown} unknown; on dataset {dataset!r} use "
            f"{known} (CIDEr-D and the metrics with a per-caption score)."
        )
    caption_terms = [(w, name) for w, name in terms if name != "CIDEr"]
    cider_weight = sum(w for w, name in terms if name == "CIDEr")

    def reward(texts: list[str], image_rows: np.ndarray) -> np.ndarray:
        total = cider_weight * scorer.scores(texts, image_rows) if cider_weight else 0.0
        if caption_terms:
            pairs = [
                (caption.removesuffix(END_WORD), records[row])
                for caption, row in zip(texts, image_rows, strict=True)
            ]
            scores = {
                name: np.array([caption_scores[name](*pair) or 0.0 for pair in pairs])
                for name in dict.fromkeys(name for _, name in caption_terms)
            }
            for weight, name in caption_terms:
                total = total + weight * scores[name]
        return np.broadcast_to(total, (len(texts),)).astype(np.float64)

    return reward


def advantages(
    sample_rewards: np.ndarray, baseline: str, greedy_rewards=None
) -> tuple[np.ndarray, np.ndarray]:
    """rewards [B, N] (N samples per image) -> (advantages [B, N], baselines [B, N]).

    mean: each sample's baseline is the mean reward of the image's other N - 1 samples, so an
    image's advantages sum to zero. greedy: the image's greedy caption's reward [B].
    """
    if baseline == "mean":
        num = sample_rewards.shape[1]
        if num < 2:
            raise ValueError("config.scst.baseline='mean' needs config.scst.num_samples >= 2.")
        base = (sample_rewards.sum(axis=1, keepdims=True) - sample_rewards) / (num - 1)
    elif baseline == "greedy":
        base = np.broadcast_to(np.asarray(greedy_rewards)[:, None], sample_rewards.shape)
    else:
        raise ValueError(f"config.scst.baseline={baseline!r}: use one of {BASELINES}.")
    return sample_rewards - base, base


def picked_logp(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """logits [N, T, V], tokens [N, T] -> each token's log-probability [N, T] (float32)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    return jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]


def teacher_forced(graphdef, params, features, tokens, num_samples: int, stats=None):
    """Logits [N, T, V] of the samples `tokens` [N = B * num_samples, T] fed back word by word,
    from the images' rows `features` [B, ...] (repeated per sample, standardised by `stats`)."""
    model = nnx.merge(graphdef, params)
    features = jnp.repeat(features, num_samples, axis=0)
    features = features if stats is None else stats.apply(features)
    start = jnp.full((tokens.shape[0], 1), text.START_ID, tokens.dtype)
    logits, _ = model(features, jnp.concatenate([start, tokens[:, :-1]], axis=1))
    return logits


def policy_loss(logits: jax.Array, tokens: jax.Array, advantage: jax.Array) -> jax.Array:
    """-(advantage x summed log-probabilities of the sampled words) / number of words.

    logits [N, T, V] of the teacher-forced samples, tokens [N, T], advantage [N] (constants).
    """
    picked = picked_logp(logits, tokens)  # [N, T]
    mask = sequence_mask(tokens)
    summed = jnp.sum(picked * mask, axis=1)  # [N]
    return -jnp.sum(jax.lax.stop_gradient(advantage) * summed) / jnp.maximum(jnp.sum(mask), 1.0)


def make_steps(
    graphdef: nnx.GraphDef, tx: optax.GradientTransformation, scst_config, max_len, stats=None
):
    """-> (sample, update), pure functions to be jitted. `features` are the batch images' rows
    as the store holds them [B, ...], standardised on the device with `stats`.

    sample(params, features [B, ...], key) -> tokens [B * num_samples, max_len], each image's
      samples adjacent.
    update(params, opt_state, features [B, ...], tokens [B * num_samples, T], advantage [same])
      -> (params, opt_state, {loss, grad_norm}).
    """
    num_samples = int(scst_config.num_samples)

    def standardized(features):
        features = jnp.repeat(features, num_samples, axis=0)
        return features if stats is None else stats.apply(features)

    def sample(params, features, key):
        model = nnx.merge(graphdef, params)
        return search.sample_decode(model, standardized(features), key, max_len=max_len).tokens

    def loss_fn(params, features, tokens, advantage):
        logits = teacher_forced(graphdef, params, features, tokens, num_samples, stats)
        return policy_loss(logits, tokens, advantage)

    def update(params, opt_state, features, tokens, advantage):
        loss, grads = jax.value_and_grad(loss_fn)(params, features, tokens, advantage)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {"loss": loss, "grad_norm": optax.global_norm(grads)}

    return sample, update


def make_log_ratio(graphdef: nnx.GraphDef, num_samples: int, stats=None):
    """-> log_ratio(params, reference, features [B, ...], tokens [B * num_samples, T]) -> [B *
    num_samples]: each sample's summed log-probability under `params` minus under `reference`
    (up to and including its end). Its mean over samples estimates KL(policy || reference)."""

    def summed_logp(params, features, tokens):
        logits = teacher_forced(graphdef, params, features, tokens, num_samples, stats)
        return jnp.sum(picked_logp(logits, tokens) * sequence_mask(tokens), axis=1)

    def log_ratio(params, reference, features, tokens):
        return summed_logp(params, features, tokens) - summed_logp(reference, features, tokens)

    return log_ratio


def check_init_run(config: ml_collections.ConfigDict, init_dir: str) -> ml_collections.ConfigDict:
    """The config of the run SCST starts from; refuses one whose data, features or decoder
    differ from `config` (naming the fields)."""
    if not config.scst.init_from:
        raise ValueError(
            "config.scst.init_from is empty: give the workdir of a finished cross-entropy run, "
            "e.g. --config.scst.init_from=runs/scenes."
        )
    init_run = RunDir(init_dir)
    saved = init_run.config("config.scst.init_from must be")
    if saved.scst.init_from:
        raise ValueError(f"{init_dir} is itself an SCST run; start from a cross-entropy run.")
    mine = traverse_util.flatten_dict(json.loads(config.to_json()), sep=".")
    theirs = traverse_util.flatten_dict(json.loads(saved.to_json()), sep=".")
    differ = [
        key
        for key in sorted(mine)
        if key.split(".")[0] in MATCHING and key not in MATCHING_EXCEPT
        if mine[key] != theirs.get(key)
    ]
    if differ:
        raise ValueError(
            f"config.scst.init_from={init_dir}: that run's {', '.join(differ)} differ from this "
            f"config ({', '.join(f'{k}={theirs.get(k)!r}' for k in differ[:4])}); SCST needs the "
            "same vocabulary, features and decoder. Use the run's own config "
            f"(--config=configs/run.py:{init_dir} plus the scst fields) or another run."
        )
    missing = init_run.missing_inputs()
    if missing:
        raise FileNotFoundError(f"{init_dir}/{missing[0]} is missing: train the run to its end.")
    return saved


def _image_batches(num_images: int, batch_size: int, seed: int, epoch: int):
    """The epoch's training images in batches of one size: [(rows [batch], valid count)]."""
    order = np.random.default_rng([seed, epoch, 7]).permutation(num_images)
    batches = []
    for start in range(0, num_images, batch_size):
        rows = order[start : start + batch_size]
        valid = len(rows)
        batches.append((np.pad(rows, (0, batch_size - valid)), valid))
    return batches


@dataclasses.dataclass
class ScstStats(loop.StepStats):
    """Sums over steps of the images' mean sampled reward and baseline, the samples' mean
    log-probability ratio to the starting model (`kl`), the policy loss, and the seconds spent
    computing rewards on the host."""

    reward: float = 0.0
    baseline: float = 0.0
    kl: float = 0.0
    loss: float = 0.0
    reward_seconds: float = 0.0
    steps: int = 0

    def add(self, stats: dict[str, Any]) -> None:
        self.reward += stats["reward"]
        self.baseline += stats["baseline"]
        self.kl += stats["kl"]
        self.loss += float(stats["loss"])
        self.reward_seconds += stats["reward_seconds"]
        self.steps += 1

    def window(self, seconds: float) -> dict[str, float]:
        steps = max(self.steps, 1)
        return {"train_reward": self.reward / steps, "train_loss": self.loss / steps}

    def epoch(self, seconds: float) -> dict[str, float]:
        steps = max(self.steps, 1)
        return {
            "train_reward": self.reward / steps,
            "train_baseline": self.baseline / steps,
            "train_kl": self.kl / steps,
            "train_loss": self.loss / steps,
            "train_reward_share": self.reward_seconds / max(seconds, 1e-9),
        }


class ScstPhase(loop.Phase):
    """Self-critical steps over the training images, data parallel over the device mesh: sample
    on the devices, score on the host, update on the devices. The starting checkpoint is
    validated as epoch 0, which SCST must beat to be chosen."""

    name = "scst"
    curves = ("eval_selection", "eval_CIDEr", "train_reward", "train_baseline")
    validate_start = True
    finite = ("loss", "grad_norm")
    remedies = ("scst.learning_rate", "train.grad_clip")

    def __init__(
        self, config, data: PreparedData, graphdef, tx, reward_fn, greedy_fn, mesh=None,
        reference=None,
    ):  # fmt: skip
        """reference: the starting model's parameters, for `scst.kl_weight` > 0."""
        scst = config.scst
        self.config, self.data, self.reward_fn, self.greedy_fn = config, data, reward_fn, greedy_fn
        self.num_samples, self.baseline = int(scst.num_samples), scst.baseline
        self.num_epochs = scst.num_epochs
        self.train_rows = data.rows("train")
        self.steps_per_epoch = len(self.batches(0))
        self.mesh = parallel.make_mesh() if mesh is None else mesh
        parallel.check_batch_size(scst.batch_size, self.mesh, "config.scst.batch_size")
        sample_fn, update_fn = make_steps(
            graphdef, tx, scst, int(config.decode.max_len), data.stats
        )
        self.sample_fn = jax.jit(sample_fn)
        self.update_fn = jax.jit(update_fn, donate_argnums=(0, 1))
        self.base_key = jax.random.key(config.seed)
        self.kl_weight = float(scst.get("kl_weight", 0.0))
        if self.kl_weight < 0:
            raise ValueError(f"config.scst.kl_weight={self.kl_weight}: use 0 (off) or more.")
        if self.kl_weight > 0:
            if reference is None:
                raise ValueError("config.scst.kl_weight > 0 needs the starting model (reference).")
            # A copy: the update donates the parameters' buffers, which placing may share.
            self.reference = jax.tree.map(jnp.copy, self.place(reference))
            self.log_ratio_fn = jax.jit(make_log_ratio(graphdef, self.num_samples, data.stats))

    def place(self, tree):
        return parallel.replicate(tree, self.mesh)

    def batches(self, epoch: int):
        return _image_batches(
            len(self.train_rows), self.config.scst.batch_size, self.config.seed, epoch
        )

    def new_stats(self) -> ScstStats:
        return ScstStats()

    def learning_rate(self, step: int) -> float:
        return float(self.config.scst.learning_rate)

    def step(self, params, opt_state, batch, step: int):
        batch_rows, valid = batch
        vocab = self.data.vocab
        # The images' rows, gathered wherever they live (device, host or disk residency).
        shard = lambda x: parallel.shard_batch({"x": x}, self.mesh)["x"]
        features = shard(np.asarray(self.data.features[self.train_rows[batch_rows]]))
        key = jax.random.fold_in(self.base_key, step)
        tokens = parallel.to_host(self.sample_fn(params, features, key))
        reward_start = time.perf_counter()
        sample_images = np.repeat(batch_rows, self.num_samples)
        sample_rewards = self.reward_fn(caption_texts(tokens, vocab), sample_images)
        scores = sample_rewards.reshape(-1, self.num_samples)
        kl = 0.0
        if self.kl_weight > 0:  # Straying from the starting model costs: r - beta log(p / p0).
            log_ratio = parallel.to_host(
                self.log_ratio_fn(params, self.reference, features, shard(tokens))
            )
            sample_rewards = sample_rewards - self.kl_weight * log_ratio
            kl = float(log_ratio.reshape(-1, self.num_samples)[:valid].mean())
        sample_rewards = sample_rewards.reshape(-1, self.num_samples)
        greedy_rewards = None
        if self.baseline == "greedy":
            greedy = parallel.to_host(self.greedy_fn(params, features, key).tokens)
            greedy_rewards = self.reward_fn(caption_texts(greedy, vocab), batch_rows)
        advantage, baseline = advantages(sample_rewards, self.baseline, greedy_rewards)
        advantage[valid:] = 0.0  # Batch filler images teach nothing.
        reward_seconds = time.perf_counter() - reward_start
        params, opt_state, stats = self.update_fn(
            params,
            opt_state,
            features,
            shard(tokens),
            shard(advantage.reshape(-1).astype(np.float32)),
        )
        return (
            params,
            opt_state,
            {
                "reward": float(scores[:valid].mean()),
                "baseline": float(baseline[:valid].mean()),
                "kl": kl,
                "loss": stats["loss"],
                "grad_norm": stats["grad_norm"],
                "reward_seconds": reward_seconds,
            },
        )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Fine-tunes the run `config.scst.init_from` with SCST (resuming if the workdir has
    checkpoints), then scores the best checkpoint like a cross-entropy run."""
    workdir = os.path.abspath(workdir)
    init_dir = os.path.abspath(os.path.expanduser(config.scst.init_from))
    scst = config.scst
    if scst.baseline not in BASELINES:
        raise ValueError(f"config.scst.baseline={scst.baseline!r}: use one of {BASELINES}.")
    check_init_run(config, init_dir)
    os.makedirs(workdir, exist_ok=True)
    loop.check_resumable_config(config, workdir)
    run, init_run = RunDir(workdir), RunDir(init_dir)
    run.write_config(config)
    # The run directory stands alone: evaluation, caption mode and the demo read these here.
    run.copy_inputs_from(init_run)
    data = prepare_data(config, workdir, vocab=run.vocab())
    references = reference_texts(data, "train", config.data.min_word_len)
    scorer = rewards.CiderD(references)  # Frequencies from every training image, once.
    reward_fn = reward_function(scst.reward, scorer, data.splits["train"], config.data.dataset)

    feature_shape = data.features.shape[1:]
    graphdef, params, init_step, _ = init_run.restore(
        config.model,
        len(data.vocab),
        feature_shape,
        str(scst.get("init_checkpoint", "best")),
        "config.scst.init_checkpoint",
    )
    if not run.has_checkpoint("latest"):
        logging.info("SCST from %s (its checkpoint of step %d).", init_dir, init_step)
    tx = optax.chain(
        optax.clip_by_global_norm(config.train.grad_clip), optax.adam(scst.learning_rate)
    )
    state = {
        "params": params,
        "opt_state": tx.init(params),
        "progress": loop.progress_state(0, -np.inf, 0, 0),
    }
    decoders = {}  # Validation's greedy decoder serves the final evaluation too.
    greedy_fn = evaluate.method_decoder(decoders, graphdef, config.decode, "greedy", data.stats)
    phase = ScstPhase(config, data, graphdef, tx, reward_fn, greedy_fn, reference=params)
    run_ = loop.Run(config, workdir, data, greedy_fn, decoders, phase.place, parallel.local)
    return loop.run(phase, run_, state)
