"""Configs: each loads, pairs its decoder with features it reads, only changes fields of the base
config (configs/scenes.py, where every field is defined with a comment), and what the README
names exists."""

import importlib
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")
NAMES = sorted(
    name[:-3]
    for name in os.listdir(CONFIGS)
    if name.endswith(".py") and name not in ("__init__.py", "run.py")  # run.py reads a workdir.
)
SPATIAL_DECODERS = ("attention", "merge_attention")
EITHER_DECODERS = ("transformer",)  # Reads a grid or the pooled vector (one location).


def _flat(config, prefix=""):
    out = {}
    for key, value in config.items():
        if hasattr(value, "items"):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


@pytest.mark.parametrize("name", NAMES)
def test_config_loads_with_matching_features_and_only_base_fields(name):
    from configs import scenes

    config = importlib.import_module(f"configs.{name}").get_config()
    spatial = config.encoder.pooling == "none"
    if config.model.decoder not in EITHER_DECODERS:
        assert spatial == (config.model.decoder in SPATIAL_DECODERS), name
    assert set(_flat(config)) == set(_flat(scenes.get_config())), name


def test_every_base_field_has_a_comment():
    """One source of defaults, documented where it is defined: each `config.x.y = ...` line of
    the base config carries a comment on the same line or the lines just above it."""
    with open(os.path.join(CONFIGS, "scenes.py"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    fields = 0
    for i, line in enumerate(lines):
        if re.match(r"\s+config\.\w+(\.\w+)? = (?!ml_collections)", line):
            fields += 1
            assert "#" in line or lines[i - 1].strip().startswith("#"), line
    assert fields > 50


@pytest.mark.parametrize(
    "backbone,size", [("inception_v3", 299), ("resnet50", 224), ("vgg16", 224)]
)
def test_backbone_variants_by_argument(backbone, size):
    from configs import flickr8k, flickr8k_attention

    config = flickr8k.get_config(backbone)
    assert (config.encoder.backbone, config.encoder.image_size) == (backbone, size)
    spatial = flickr8k_attention.get_config(backbone)
    assert spatial.encoder.layer == ("block5_conv3" if backbone == "vgg16" else "")
    with pytest.raises(ValueError, match="resnet50"):
        flickr8k.get_config("resnet")


def test_scst_accepts_every_scenes_decoder():
    from configs import scenes_scst

    for start, decoder in (("merge", "merge"), ("lstm", "merge_attention")):
        assert scenes_scst.get_config(start).model.decoder == decoder
    default = scenes_scst.get_config()  # From the README's first command's run.
    assert default.model.decoder == "transformer" and default.model.encoder_layers == 1
    with pytest.raises(ValueError, match="use one of"):
        scenes_scst.get_config("default")


def test_scenes_configs_differ_only_in_the_decoder_and_its_features():
    """The scenes comparison is fair: same data, backbone layer and schedule."""
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


def test_readme_names_only_configs_that_exist():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    named = set(re.findall(r"configs/([a-z0-9_]+)\.py(?::([a-z0-9_]+))?", readme))
    assert named
    for name, arg in named:
        if name in ("run",) or name.startswith("grids"):
            continue
        module = importlib.import_module(f"configs.{name}")
        module.get_config(arg) if arg else module.get_config()
    for path in re.findall(r"configs/grids/([a-z0-9_]+)\.py", readme):
        assert os.path.exists(os.path.join(CONFIGS, "grids", f"{path}.py")), path
    assert "../shared" not in readme


def test_readme_is_a_short_manual():
    with open(os.path.join(REPO, "README.md"), "rb") as f:
        readme = f.read()
    assert len(readme) <= 24_000, len(readme)
    assert b"previous version" not in readme
