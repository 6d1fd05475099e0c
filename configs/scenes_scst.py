"""Self-critical sequence training (SCST) on the scenes, after the default's cross-entropy run.

    python main.py --config=configs/scenes_transformer.py --workdir=runs/scenes
    python main.py --config=configs/scenes_scst.py --workdir=runs/scenes_scst \
        --config.scst.init_from=runs/scenes

`:lstm` fine-tunes a configs/scenes.py run instead (`--config=configs/scenes_scst.py:lstm
--config.scst.init_from=runs/scenes_lstm`), `:merge` a configs/scenes_merge.py run (the Keras
notebook's merge decoder). Data, features and decoder must be the starting run's
(captioning/training/scst.py refuses others).

Result (the README's Results table; 2 CPU cores, AMD EPYC with AVX-512; test split, greedy,
repeats blocked; from each seed's cross-entropy run; epoch chosen by the base's validation metric,
the start counting as epoch 0):
* default (Transformer), reward CIDEr-D + 3 x each caption's attribute and relation scores,
  learning rate 1e-4, KL weight 0.5, seeds 0-4: CIDEr 3.19 -> 3.71 +- 0.09 (+12 to +22 % on every
  seed), attribute accuracy 0.963 -> 0.965 +- 0.010, relation accuracy 0.964 -> 0.968 +- 0.007
  (no seed lower by more than 0.010); epoch 2, never the start. 2.0-2.4 minutes a run.
* `:lstm`, the same settings, seeds 0-4: CIDEr 3.16 -> 3.63 +- 0.08 (+13 to +18 % on every
  seed), attribute accuracy 0.956 -> 0.963 +- 0.016, relation accuracy 0.763 -> 0.775 +- 0.024
  (no seed lower by more than 0.009); epochs 1-2, never the start. 1.8-2.0 minutes a run.
* `:merge` (reward CIDEr-D, 5e-5): the README's table.

configs/notes/scst.md: per-seed figures, runs from earlier defaults, what SCST does to the
captions, and rewards that weigh in the accuracies.
"""

from configs import scenes, scenes_merge, scenes_transformer


def get_config(start: str | None = None):
    bases = {"transformer": scenes_transformer, "lstm": scenes, "merge": scenes_merge}
    start = start or "transformer"  # The default run's decoder.
    if start not in bases:
        raise ValueError(f"configs/scenes_scst.py:{start}: use one of {sorted(bases)}.")
    config = bases[start].get_config()
    config.scst.init_from = ""  # Give the finished run: --config.scst.init_from=runs/scenes.
    config.scst.learning_rate = 5e-5  # Small, as the anchors (2e-5 to 5e-5).
    if start != "merge":
        # CIDEr-D alone trades relation words for n-grams: the scenes' own scores weigh in.
        config.scst.reward = "CIDEr+3*attribute_accuracy+3*relation_accuracy"
        config.scst.learning_rate = 1e-4  # With the accuracies rewarded, a larger step pays.
        # Straying from the cross-entropy model costs 0.5 x log(p / p_start) a caption: what the
        # reward leaves out (which shape a small object is) drifts less.
        config.scst.kl_weight = 0.5
    config.scst.num_epochs = 2  # Passes over the 6,000 training scenes (120 steps each).
    return config
