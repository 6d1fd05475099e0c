"""Scenes ablation grid: decoder x features (pooled / spatial) x decoding (greedy / beam 3).

    python -m captioning.grid --config=configs/scenes.py --grid=configs/grids/scenes.py \
        --workdir=runs/grid --config.train.num_epochs=8

Writes runs/grid/grid.md (the table in the README). Every cell starts from configs/scenes.py
(random-weight ResNet50 cut at conv3_block4_out, 16x16x512 at 128 px); the merge and inject
decoders read the average-pooled vector, the attention decoder the map area-resized to 8x8
(L = 64 locations: 2x2 cells of the 16x16 map, enough to tell left from right and top from
bottom, at a quarter of the attention cost). Both stores are exported once into
`data.cache_dir` and shared by every run that uses them.
"""

# Evaluated per cell from the same checkpoint (no retraining).
METHODS = [
    {"decode.method": "greedy"},
    {"decode.method": "beam", "decode.beam_size": 3},
]

CELLS = {
    # The seed's merge model: the image joins the LSTM output.
    "merge_avg": {"model.decoder": "merge", "encoder.pooling": "avg"},
    # Show and Tell: the image is the LSTM's first input.
    "inject_avg": {"model.decoder": "inject", "encoder.pooling": "avg"},
    # Show, Attend and Tell: soft attention over the 8x8 grid.
    "attention_grid8": {
        "model.decoder": "attention",
        "encoder.pooling": "none",
        "encoder.grid": 8,
    },
}


def get_grid():
    return [{"name": name, "overrides": o, "methods": METHODS} for name, o in CELLS.items()]
