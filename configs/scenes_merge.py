"""The Keras notebook's merge decoder on the scenes: one pooled image vector joins the LSTM's
output.

    python main.py --config=configs/scenes_merge.py --workdir=runs/scenes_merge

Same data, backbone layer and schedule as configs/scenes.py; the decoder reads the map's mean and
max over locations instead of looking things up in it: the baseline the default improves on.

Result (the README's Results table; 2 CPU cores, AMD EPYC with AVX-512; test split, repeats
blocked; mean +- std over seeds 0-2; 4.1-4.8 minutes a run with the features cached): attribute
accuracy 0.782 +- 0.038 greedy / 0.792 +- 0.032 beam 3, relation accuracy 0.217 +- 0.005 / 0.233
+- 0.018, CIDEr 2.44 +- 0.05 / 2.69 +- 0.10, chosen epoch 8.3 +- 2.5 of 11. Self-critical
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
