"""Show, Attend and Tell on the scenes: soft attention over the 4x4 feature grid, inside the
recurrence (h_{t-1} -> z_t -> h_t).

    python main.py --config=configs/scenes_attention.py --workdir=runs/scenes_attention

Everything else is configs/scenes.py (data, grid with positions, attention size, schedule), so
the two runs differ only in where the attention sits. Add `--config.eval.attention_maps=true` to
`--mode=caption` to draw what it looks at for every word.

Result (2 CPU cores, AMD EPYC, seed 0, test split; an earlier default's data, 3,000 uniform scenes
without jitter, and 16 epochs; ~1.5x the merge decoder's step time): attribute accuracy 0.76,
relation accuracy 0.30, CIDEr 3.29 (greedy). Its errors are mostly wrong shapes: the look that
chooses the shape after "a blue" is taken with h_{t-1}, before "blue" has entered the LSTM. The
paper's doubly stochastic term (`model.attention_reg=1`) pulls every cell towards one unit of
attention per caption, i.e. towards uniform attention, while a scene's 1-3 objects sit in a few of
the 16 cells: with it, runs stayed near uniform (peak weight 0.10 against 0.19) with relation
accuracy 0.18-0.27; 8x8 with lambda 1 reached 0.73 attribute.
"""

from configs import scenes


def get_config():
    config = scenes.get_config()
    config.model.decoder = (
        "attention"  # captioning/models/show_attend_tell.py: Show, Attend and Tell.
    )
    config.model.feed_dim = 0  # A merge_attention option (Show-Attend-Tell feeds its context).
    return config
