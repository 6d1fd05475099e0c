"""Two-cell grid on the tiny test config (tests/test_grid.py): merge on pooled features and
attention on the spatial map, each decoded greedily and with a beam of 2.

    python -m captioning.tools.grid --config=configs/test.py --grid=configs/grids/test.py \
        --workdir=/tmp/test_grid
"""

METHODS = [
    {"decode.method": "greedy"},
    {"decode.method": "beam", "decode.beam_size": 2},
]


def get_grid():
    return [
        {
            "name": "merge_avg",
            "overrides": {"model.decoder": "merge", "model.feed_dim": 0},
            "methods": METHODS,
        },
        {
            "name": "attention_spatial",
            "overrides": {
                "model.decoder": "attention",
                "encoder.pooling": "none",
                "model.feed_dim": 0,
            },
            "methods": METHODS,
        },
    ]
