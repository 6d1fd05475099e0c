"""The README's config table states the defaults of configs/scenes.py (docs must not drift)."""

import os
import re

import pytest

from configs import scenes

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
ROW = re.compile(r"^\| `([a-z_.]+)` \| ([^|]+) \|")


def _rows():
    with open(README, encoding="utf-8") as f:
        return [m.groups() for line in f if (m := ROW.match(line))]


def _parse(text):
    text = text.strip().strip("`")
    if text in ("True", "False"):
        return text == "True"
    if text == "''":
        return ""
    try:
        return float(text)
    except ValueError:
        return text


def test_every_config_field_is_documented_with_its_default():
    config = scenes.get_config()
    documented = dict(_rows())
    assert len(documented) > 40
    for section in ("data", "encoder", "model", "train", "decode", "eval"):
        for name, value in config[section].items():
            field = f"{section}.{name}"
            if field.startswith("data.num_"):  # Documented together as num_train/num_val/...
                continue
            assert field in documented, f"README config table lacks {field}"
            documented_value = _parse(documented[field])
            if isinstance(value, int | float) and not isinstance(value, bool):
                assert documented_value == pytest.approx(float(value)), field
            else:
                assert documented_value == value, field
