"""The Keras notebook's merge decoder on the scenes: one pooled image vector joins the LSTM's
output.

    python main.py --config=configs/scenes_merge.py --workdir=runs/scenes_merge

Same data, backbone layer and schedule as configs/scenes.py; the decoder reads the map's mean and
max over locations instead of looking things up in it: the baseline the default improves on.

Result (the README's Results table; 2 CPU cores, AMD EPYC with AVX-512; test split; mean +- std
over seeds 0-2; run time not recorded): attribute accuracy 0.772 +- 0.040 greedy / 0.781 +- 0.033
beam 3, relation accuracy 0.227 +- 0.021 / 0.219 +- 0.024, CIDEr 2.41 +- 0.07 / 2.71 +- 0.18,
chosen epoch 8.7 +- 2.3 of 11; test_perturbed attribute accuracy 0.720 +- 0.020. Self-critical
fine-tuning: configs/scenes_scst.py:merge.

configs/notes/scenes.md, "The merge decoder": earlier figures, where it fails (binding colours to
the wrong shapes), a linear probe of its features, and what was tried.
"""

from configs import scenes


def get_config():
    config = scenes.get_config()
    config.encoder.pooling = "avgmax"  # [2C]: the mean, and the max that says a pattern occurs.
    config.model.decoder = "merge"  # captioning/models/__init__.py: the Keras notebook's.
    config.model.feed_dim = 0  # A merge_attention option.
    config.model.dropout = 0.1  # Not the default's 0: configs/notes/scenes.md.
    return config
