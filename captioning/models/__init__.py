"""Decoders: the contract and registry (`base`), one file per decoder, and their pieces.

`models.create_model(config.model, vocab_size, feature_shape, rngs=...)` builds the decoder that
`config.model.decoder` names. Each decoder module registers itself when imported here:

* `merge`: the Keras notebook's model, the image joins the LSTM's output (`merge.py`);
* `inject`: Show and Tell, the image is the LSTM's first input (`inject.py`);
* `attention`: Show, Attend and Tell (`show_attend_tell.py`);
* `merge_attention`: merge with attention at the output over the grid (`merge_attention.py`);
* `transformer`: pre-LayerNorm Transformer blocks with cached decoding (`transformer.py`).

Shared pieces: `layers` (matmul helpers, dropout, Dense), `lstm`, `attention`.
"""

from captioning.models import (  # noqa: F401
    inject,
    merge,
    merge_attention,
    show_attend_tell,
    transformer,
)
from captioning.models.base import (
    DECODERS,
    Decoder,
    abstract_model,
    concept_outputs,
    create_model,
    get,
    register,
)

__all__ = [
    "DECODERS",
    "Decoder",
    "abstract_model",
    "concept_outputs",
    "create_model",
    "get",
    "register",
]
