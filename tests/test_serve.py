"""--mode=serve: the Gradio demo of a fake run, through its API, under load and in a real browser.

The app is started once for the module on a free local port (127.0.0.1) and closed at the end.
The browser test drives Debian's chromium (`apt-get install chromium`; .ci/run installs it) and
fails, never skips, when it cannot run.
"""

import io
import os
import re
import socket
import struct
import zlib

import httpx
import numpy as np
import pytest
import tensorflow as tf
from conftest import count_compiles, make_run_dir
from gradio_client import Client, handle_file
from PIL import Image

from captioning import caption, serve
from captioning.data import backbone
from captioning.data.datasets import scenes
from captioning.evaluation.novelty import Novelty
from captioning.run_dir import RunDir
from configs import test as test_config

WORDS = ["red", "blue", "circle", "square", "left", "of", "a"]  # Untrained: captions "circle ...".
MAX_UPLOAD_MB = 1  # Small, so the oversized upload in the tests is small too.
BATCH = 16
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(workdir, test image paths): an untrained run of configs/test.py and its rendered scenes,
    calibrated (novelty.npz) on its val scenes, so that a noise image is unlike them."""
    config = test_config.get_config()
    config.data.cache_dir = str(tmp_path_factory.mktemp("cache"))
    config.decode.max_len = 8
    splits = scenes.load_scenes(config.data, config.seed)
    workdir = make_run_dir(tmp_path_factory.mktemp("run"), config, WORDS)
    paths = {s: [r.image_path for r in splits[s]] for s in ("train", "val", "test")}
    raw, _, _ = backbone.encode_images(paths["train"] + paths["val"], config.encoder, batch_size=16)
    train, val = np.arange(len(paths["train"])), len(paths["train"]) + np.arange(len(paths["val"]))
    Novelty.fit(RunDir(workdir).feature_stats(), raw, train, val).save(workdir)
    return workdir, paths["test"]


@pytest.fixture(scope="module")
def noise_image(tmp_path_factory):
    path = tmp_path_factory.mktemp("noise") / "noise.png"
    noise = np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path)
    return str(path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(run):
    """(url, captioner) of the running app."""
    workdir, _ = run
    captioner = serve.Captioner(workdir, batch_size=BATCH)
    app = serve.build_app(workdir, max_upload_mb=MAX_UPLOAD_MB, captioner=captioner)
    port = _free_port()
    app.launch(**serve.launch_settings("127.0.0.1", port, MAX_UPLOAD_MB), prevent_thread_lock=True)
    try:
        yield f"http://127.0.0.1:{port}/", captioner
    finally:
        app.close()
        captioner.close()


@pytest.fixture(scope="module")
def client(server):
    client = Client(server[0], verbose=False)
    yield client
    client.close()


def _caption(client, path):
    """-> (greedy caption, [[rank, beam caption, log-prob]], request time) from /caption."""
    greedy, beams, elapsed = client.predict(handle_file(str(path)), api_name="/caption")
    return greedy, beams["data"], elapsed


def test_api_caption_is_caption_modes(run, client, tmp_path):
    workdir, images = run
    folder = tmp_path / "images"
    folder.mkdir()
    for i, path in enumerate(images[:4]):
        os.symlink(path, folder / f"{i}.png")  # caption mode sorts by name: 0.png ... 3.png.
    config = RunDir(workdir).config()
    expected = caption.caption_images(config, workdir, str(folder), output=str(tmp_path / "g.json"))
    config.decode.method = "beam"
    beam = caption.caption_images(config, workdir, str(folder), output=str(tmp_path / "b.json"))
    # The guard: were every image captioned alike, the equalities below would hold vacuously.
    assert len({r["caption"] for r in expected}) > 1, expected
    with count_compiles() as compiles:
        answers = [_caption(client, folder / f"{i}.png") for i in range(4)]
    assert compiles == []  # Warmed up at start-up.
    assert [greedy for greedy, _, _ in answers] == [r["caption"] for r in expected]
    assert [beams[0][1] for _, beams, _ in answers] == [r["caption"] for r in beam]
    _, beams, elapsed = answers[0]
    assert len(beams) == config.decode.beam_size  # Every hypothesis, best first.
    assert [row[0] for row in beams] == [1, 2, 3]
    assert all(isinstance(row[1], str) and row[2] <= 0 for row in beams)
    assert beams[0][2] >= beams[-1][2]
    assert elapsed.endswith(")") and " ms (batch of " in elapsed


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_upload_pixels_are_the_backbones(run, tmp_path, fmt):
    """The demo feeds the backbone the pixels caption mode and the feature export feed it."""
    path = str(tmp_path / f"scene.{fmt.lower()}")
    with Image.open(run[1][1]) as image:
        image.convert("RGB").resize((97, 61)).save(path, fmt)
    size = 64
    ours = serve.model_pixels(serve.read_image(path, max_bytes=2**20), size)
    theirs = backbone._load_image(tf.constant(path), size).numpy()
    np.testing.assert_array_equal(ours, theirs)


def test_a_noise_image_is_unlike_the_training_images(server, run, noise_image):
    _, captioner = server
    pixels = [serve.model_pixels(serve.read_image(p, max_bytes=2**20), 64) for p in run[1]]
    scenes_, noise = (
        captioner.caption_batch(pixels[:4]),
        captioner.caption(serve.model_pixels(serve.read_image(noise_image, max_bytes=2**20), 64)),
    )
    assert noise.novelty["unlike_training"] and noise.novelty["percentile"] == 100.0
    assert "unlike the training images" in serve.unlike_warning(noise.novelty)
    assert sum(c.novelty["unlike_training"] for c in scenes_) <= 1  # Beyond val p99: rare.
    assert serve.unlike_warning({"unlike_training": False, "percentile": 50.0}) == ""


def test_browser_uploads_an_image_and_shows_the_caption(server, client, run, noise_image, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    url, captioner = server
    image = run[1][2]
    api_caption = _caption(client, image)[0]
    pixels = serve.model_pixels(serve.read_image(image, max_bytes=2**20), 64)
    assert not captioner.caption(pixels).novelty["unlike_training"]
    noise_caption = _caption(client, noise_image)[0]
    assert os.path.exists(CHROMIUM), f"{CHROMIUM} is missing: apt-get install chromium"
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
        )
        try:
            for name, width in (("desktop", 1280), ("phone", 390)):
                page = browser.new_page(viewport={"width": width, "height": 900})
                page.goto(url)
                expect(page.get_by_role("button", name="Caption", exact=True)).to_be_visible()
                page.locator("#image-input input[type=file]").set_input_files(image)
                expect(page.get_by_label("Greedy caption")).to_have_value(
                    api_caption, timeout=60_000
                )
                # The attention figure is drawn after the caption; wait until it is done.
                expect(page.locator("#attention-figure img")).to_be_visible(timeout=60_000)
                status = page.locator("#attention-figure .wrap.default")
                expect(status).to_have_class(re.compile(r"\bhide\b"), timeout=60_000)
                warning = page.locator("#unlike-warning")
                expect(warning).to_be_hidden()  # A scene like the training ones: no warning.
                page.screenshot(path=str(tmp_path / f"serve_{name}.png"), full_page=True)
                # Noise: a plain warning above the caption.
                page.locator("#image-input input[type=file]").set_input_files(noise_image)
                expect(page.get_by_label("Greedy caption")).to_have_value(
                    noise_caption, timeout=60_000
                )
                expect(warning).to_be_visible(timeout=60_000)
                expect(warning).to_contain_text("unlike the training images")
                greedy_box = page.get_by_label("Greedy caption").bounding_box()
                assert warning.bounding_box()["y"] < greedy_box["y"]  # Above the caption.
                page.screenshot(path=str(tmp_path / f"serve_{name}_unlike.png"), full_page=True)
                page.close()
        finally:
            browser.close()
    assert (tmp_path / "serve_desktop.png").stat().st_size > 0


def _png_header_only(path, width, height):
    """A PNG of a few KB that claims width x height pixels (a decompression bomb's header)."""

    def chunk(kind, data):
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale.
    idat = zlib.compress(b"\0" * 100_000, 9)  # The first rows only.
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat))


def _jpeg_bytes(pixels, **kwargs):
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "name, expected",
    [
        ("text.jpg", "not an image"),
        ("truncated.jpg", "truncated or corrupt"),
        ("empty.png", "empty"),
        ("huge_file.png", "upload limit of 1 MB"),
        ("bomb.png", "too large"),
    ],
)
def test_bad_upload_is_a_clear_error_and_the_server_lives_on(run, client, tmp_path, name, expected):
    path = tmp_path / name
    rng = np.random.default_rng(0)
    if name == "text.jpg":
        path.write_text("this is not a jpeg")
    elif name == "truncated.jpg":
        data = _jpeg_bytes(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8))
        path.write_bytes(data[: len(data) // 2])
    elif name == "empty.png":
        path.write_bytes(b"")
    elif name == "huge_file.png":  # A valid image, only too big a file (noise does not compress).
        Image.fromarray(rng.integers(0, 255, (700, 700, 3), dtype=np.uint8)).save(path)
        assert path.stat().st_size > MAX_UPLOAD_MB * 2**20
    else:
        _png_header_only(path, 30_000, 30_000)
        assert path.stat().st_size < 10_000
    with pytest.raises(Exception, match=expected):
        client.predict(handle_file(str(path)), api_name="/caption")
    assert _caption(client, run[1][0])[0]  # Still serving.


def _converted(kind, path, pixels):
    """Writes `pixels` ([H, W, 3] uint8) as a grayscale, RGBA, CMYK or 16-bit file."""
    image = Image.fromarray(pixels)
    if kind == "grayscale":
        image.convert("L").save(path)
    elif kind == "rgba":
        image.convert("RGBA").save(path)
    elif kind == "cmyk":
        image.convert("CMYK").save(path, "JPEG")
    else:  # 16-bit grayscale PNG (decoded by TF) or TIFF (by PIL).
        gray = np.asarray(image.convert("L")).astype(np.uint16) * 257
        Image.fromarray(gray).save(path)
        with Image.open(path) as saved:
            assert saved.mode.startswith("I;16")


@pytest.mark.parametrize(
    "kind, suffix",
    [("grayscale", "png"), ("rgba", "png"), ("cmyk", "jpg"), ("16bit", "png"), ("16bit", "tif")],
)
def test_unusual_modes_are_converted_not_refused(run, client, tmp_path, kind, suffix):
    with Image.open(run[1][3]) as image:
        pixels = np.asarray(image.convert("RGB"))
    path = tmp_path / f"image.{suffix}"
    _converted(kind, path, pixels)
    read = serve.read_image(str(path), max_bytes=2**20)
    assert read.shape == pixels.shape and read.dtype == np.uint8
    expected = pixels.astype(float)
    if kind in ("grayscale", "16bit"):
        expected = np.asarray(Image.fromarray(pixels).convert("L"), float)[..., None]
    assert np.abs(read - expected).mean() < 3  # The same picture: not darkened, clipped or lost.
    greedy, beams, _ = _caption(client, path)
    assert greedy and len(beams) == 3


def test_exif_rotated_photo_is_captioned_upright(run, client, tmp_path):
    with Image.open(run[1][4]) as image:
        upright = np.asarray(image.convert("RGB").resize((120, 80)))  # Landscape: H 80, W 120.
    (tmp_path / "upright.jpg").write_bytes(_jpeg_bytes(upright, quality=95))
    exif = Image.Exif()
    exif[0x0112] = 6  # "Rotate 90 degrees clockwise to display": stored turned the other way.
    stored = np.asarray(Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90))
    (tmp_path / "rotated.jpg").write_bytes(_jpeg_bytes(stored, quality=95, exif=exif))

    read = serve.read_image(str(tmp_path / "rotated.jpg"), max_bytes=2**20)
    assert read.shape == upright.shape
    assert np.abs(read.astype(float) - upright).mean() < 4  # JPEG noise only.
    rotated_result = _caption(client, tmp_path / "rotated.jpg")
    upright_result = _caption(client, tmp_path / "upright.jpg")
    # The first words and the best beam's log-probability: an untrained model's later words and
    # beams are near ties once repeats are blocked, and JPEG noise decides them.
    assert rotated_result[0].split()[:2] == upright_result[0].split()[:2]
    np.testing.assert_allclose(rotated_result[1][0][2], upright_result[1][0][2], atol=0.5)


def test_load_is_batched_without_recompiling(server, run):
    url, captioner = server
    batches, images = captioner.batches, captioner.images
    with count_compiles() as compiles:
        result = serve.load_benchmark(url, run[1], requests=64, threads=16)
    assert result["serve_answered"] == 64 and result["serve_errors"] == 0
    assert captioner.images - images == 64  # None lost, none captioned twice.
    assert captioner.batches - batches < 64  # Batched: fewer calls than requests.
    assert compiles == []  # One padded batch shape, compiled at start-up.
    assert 0 < result["serve_p50_ms"] <= result["serve_p95_ms"]
    assert result["serve_captions_per_s"] > 0


def test_serves_no_file_of_the_machine(server, run):
    url, _ = server
    for path in (os.path.join(run[0], "config.json"), "/etc/passwd"):
        response = httpx.get(f"{url}gradio_api/file={path}")
        assert response.status_code in (403, 404), path
