"""Scenes ablation grid: decoder x features (pooled / spatial) x decoding (greedy / beam 3).

    python -m captioning.tools.grid --config=configs/scenes.py --grid=configs/grids/scenes.py \
        --workdir=runs/grid --config.train.num_epochs=8

Writes runs/grid/grid.md, one table of every cell and decoding; 8 epochs instead of the config's
11 keep the grid short (configs/notes/scenes.md). Every cell starts from configs/scenes.py
(random-weight ResNet50 cut at conv2_block3_out, 32x32x256 at 128 px): the merge and inject
decoders read the pooled vector (mean and max over locations), the attention decoders the map
area-resized to 4x4 (the scenes default; L = 16 locations of 8x8 map cells: enough to tell left
from right and top from bottom, at a sixty-fourth of the attention cost of 32x32). Each store is
exported once into `data.cache_dir` and shared by every run that uses it.
"""

# Evaluated per cell from the same checkpoint (no retraining).
METHODS = [
    {"decode.method": "greedy"},
    {"decode.method": "beam", "decode.beam_size": 3},
]

CELLS = {
    # The scenes default (configs/scenes.py): merge, plus attention over the 4x4 grid with the
    # LSTM's current state, at the output.
    "merge_attention_grid4": {"model.decoder": "merge_attention"},
    # The same without the LSTM reading what the previous lookup saw (feed_dim 0).
    "merge_attention_nofeed": {"model.decoder": "merge_attention", "model.feed_dim": 0},
    # The Keras notebook's merge model: the image joins the LSTM output.
    "merge_avgmax": {"model.decoder": "merge", "encoder.pooling": "avgmax", "model.feed_dim": 0},
    # Show and Tell: the image is the LSTM's first input.
    "inject_avgmax": {"model.decoder": "inject", "encoder.pooling": "avgmax", "model.feed_dim": 0},
    # Show, Attend and Tell as in configs/scenes_attention.py: soft attention over the 4x4 grid
    # (locations' positions appended), attention size 32, no doubly stochastic term.
    "attention_grid4": {"model.decoder": "attention", "model.feed_dim": 0},
}


def get_grid():
    return [{"name": name, "overrides": o, "methods": METHODS} for name, o in CELLS.items()]
