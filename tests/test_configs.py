"""Every experiment config loads and pairs its decoder with features that decoder reads."""

import importlib
import os

import pytest

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
NAMES = sorted(
    name[:-3]
    for name in os.listdir(CONFIGS)
    if name.endswith(".py") and name not in ("__init__.py", "run.py")  # run.py reads a workdir.
)
SPATIAL_DECODERS = ("attention", "merge_attention")


@pytest.mark.parametrize("name", NAMES)
def test_config_loads_with_matching_features(name):
    config = importlib.import_module(f"configs.{name}").get_config()
    spatial = config.encoder.pooling == "none"
    assert spatial == (config.model.decoder in SPATIAL_DECODERS), (
        name,
        config.model.decoder,
        config.encoder.pooling,
    )


def test_scenes_configs_differ_only_in_the_decoder_and_its_features():
    """The scenes comparison in the README is fair: same data, backbone layer and schedule."""
    from configs import scenes, scenes_attention, scenes_merge

    default = scenes.get_config()
    for variant in (scenes_attention.get_config(), scenes_merge.get_config()):
        for section in ("data", "train", "decode", "eval"):
            assert variant[section].to_dict() == default[section].to_dict(), section
        assert variant.encoder.layer == default.encoder.layer
        assert variant.model.hidden_size == default.model.hidden_size
    assert scenes_merge.get_config().model.decoder == "merge"
    assert scenes_attention.get_config().model.decoder == "attention"
    assert default.model.decoder == "merge_attention"
