"""captioning.tools.offdist: the loop check and the generated images (no model needed)."""

import numpy as np

from captioning.tools import offdist


def test_has_loop():
    assert offdist.has_loop("star star star")
    assert offdist.has_loop("in the in the in")  # "in the in" twice.
    assert not offdist.has_loop("a red circle left of a red square")
    assert not offdist.has_loop("star star on star star there")
    assert not offdist.has_loop("")


def test_images_cover_the_issue_and_odd_sizes(tmp_path):
    listed = offdist.listed_images()
    assert set(listed) == {
        "dark_no_shapes",
        "white_red_circle",
        "noise",
        "one_pixel",
        "gradient_photo_like",
    }
    assert listed["one_pixel"].shape == (1, 1, 3)
    images = offdist.random_images(40, seed=0)
    assert len(images) == 40 and all(v.dtype == np.uint8 for v in images.values())
    shapes = {v.shape[:2] for v in images.values()}
    assert (1, 1) in shapes and (300, 4000) in shapes  # 1x1 and 4000 wide by 300 high.
    assert {name.split("_")[2] for name in images} == {"noise", "flat", "gradient", "photo"}
    assert offdist.random_images(40, seed=0).keys() == images.keys()  # Deterministic.
    paths = offdist.write_images(str(tmp_path), {"one_pixel": listed["one_pixel"]})
    assert len(paths) == 1 and paths[0].endswith("one_pixel.png")
