"""One cell, the config itself, decoded three ways from the same checkpoint: greedy (repeats
blocked, the default), greedy as the model says it (`block_repeats` off), and beam 3. With
--seeds, the README's results table:

    python -m captioning.tools.grid --config=configs/scenes_transformer.py \
        --grid=configs/grids/scenes_decoding.py --seeds=0,1,2,3,4 --workdir=runs/seeds
"""

METHODS = [
    {"decode.method": "greedy"},
    {"decode.method": "greedy", "decode.block_repeats": False},
    {"decode.method": "beam", "decode.beam_size": 3},
]


def get_grid():
    return [{"name": "default", "overrides": {}, "methods": METHODS}]
