"""Self-critical sequence training (SCST) on the scenes, after the cross-entropy default.

    python main.py --config=configs/scenes.py --workdir=runs/scenes
    python main.py --config=configs/scenes_scst.py --workdir=runs/scenes_scst \
        --config.scst.init_from=runs/scenes

`:merge` fine-tunes a configs/scenes_merge.py run instead (the Keras notebook's merge decoder):
`--config=configs/scenes_scst.py:merge --config.scst.init_from=runs/scenes_merge`; `:transformer`
a configs/scenes_transformer.py run.
Data, features and decoder must be the starting run's (captioning/training/scst.py refuses others).

Result (the README's Results table; 2 CPU cores, AMD EPYC with AVX-512; test split, greedy,
repeats not blocked; mean +- std over seeds 0-2, each from that seed's cross-entropy run; epoch
chosen by the base's validation metric, the start counting as epoch 0):
* default, reward CIDEr-D + 3 x each caption's attribute and relation scores, learning rate
  1e-4: attribute accuracy 0.934 +- 0.007, relation accuracy 0.772 +- 0.012, CIDEr 3.78 +- 0.14
  (from 0.937 / 0.756 / 3.14; CIDEr +21, +20, +20 %; attributes +0.010, -0.023, +0.007; epochs
  2, 2, 1).
* `:merge` (reward CIDEr-D, 5e-5; 1.3 minutes a run): greedy 0.789 +- 0.028 / 0.236 +- 0.038 /
  CIDEr 3.00 +- 0.09 (from 0.772 / 0.227 / 2.41); beam 3 0.800 +- 0.023 / 0.242 +- 0.021 / 3.00.

configs/notes/scst.md: per-seed figures, runs from earlier defaults, what SCST does to the
captions, and rewards that weigh in the accuracies.
"""

from configs import scenes, scenes_merge, scenes_transformer


def get_config(start: str | None = None):
    bases = {"default": scenes, "merge": scenes_merge, "transformer": scenes_transformer}
    start = start or "default"
    if start not in bases:
        raise ValueError(f"configs/scenes_scst.py:{start}: use one of {sorted(bases)}.")
    config = bases[start].get_config()
    config.scst.init_from = ""  # Give the finished run: --config.scst.init_from=runs/scenes.
    config.scst.learning_rate = 5e-5  # Small, as the anchors (2e-5 to 5e-5).
    if start == "default":
        # CIDEr-D alone trades relation words for n-grams: the scenes' own scores weigh in.
        config.scst.reward = "CIDEr+3*attribute_accuracy+3*relation_accuracy"
        config.scst.learning_rate = 1e-4  # With the accuracies rewarded, a larger step pays.
        # Straying from the cross-entropy model costs 0.5 x log(p / p_start) a caption: what the
        # reward leaves out (which shape a small object is) drifts less.
        config.scst.kl_weight = 0.5
    config.scst.num_epochs = 2  # Passes over the 6,000 training scenes (120 steps each).
    return config
