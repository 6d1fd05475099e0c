"""Show, Attend and Tell on the scenes: soft attention over the 4x4 feature grid, inside the
recurrence (h_{t-1} -> z_t -> h_t).

    python main.py --config=configs/scenes_attention.py --workdir=runs/scenes_attention

Everything else is configs/scenes.py (data, grid with positions, attention size, schedule), so
the two runs differ only in where the attention sits. Add `--config.eval.attention_maps=true` to
`--mode=caption` to draw what it looks at for every word. `model.attention_reg` stays 0: the
paper's doubly stochastic term pulls the attention towards uniform, while a scene's objects sit
in a few of the 16 cells.

Result: not measured with the current data. Once, with an earlier default's data (3,000 uniform
scenes without jitter, 16 epochs; 2 CPU cores, AMD EPYC, seed 0, test split, greedy; about 1.5x
the merge decoder's step time): attribute accuracy 0.76, relation accuracy 0.30, CIDEr 3.29,
mostly wrong shapes (the look that chooses the shape after "a blue" is taken with h_{t-1}, before
"blue" has entered the LSTM). configs/notes/scenes.md, "Show, Attend and Tell", has the rest.
"""

from configs import scenes


def get_config():
    config = scenes.get_config()
    config.model.decoder = (
        "attention"  # captioning/models/show_attend_tell.py: Show, Attend and Tell.
    )
    config.model.feed_dim = 0  # A merge_attention option (Show-Attend-Tell feeds its context).
    return config
