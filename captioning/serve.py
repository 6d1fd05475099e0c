"""The web demo of a trained run: `python main.py --mode=serve --workdir=runs/scenes`.

    app = build_app(workdir, max_upload_mb=10, max_batch_size=16)   # gr.Blocks, loaded and warm
    serve(workdir, host="127.0.0.1", port=7860, max_upload_mb=10)  # blocks until Ctrl-C

Everything comes from the run directory and is loaded once, at start-up (`Captioner`): the run's
backbone and input size (`config.encoder`), its feature statistics, vocabulary and best checkpoint,
as in `--mode=caption`. The page takes an image (drop, paste or pick; or one of the run's test
images) and shows the greedy caption, all `decode.beam_size` beam hypotheses with their
log-probabilities, the time the request took and, for attention decoders, the attention over the
image for each word. The same handler is the API endpoint `/caption`, which returns (greedy
caption, beam table {headers, data: [[rank, caption, log-prob]]}, request time):

    from gradio_client import Client, handle_file
    Client("http://127.0.0.1:7860/").predict(handle_file("photo.jpg"), api_name="/caption")

Requests are batched by the `Captioner` itself, not by Gradio's `batch=True`: a Gradio batch fails
every request in it when one raises, so one bad upload would fail the good ones sent beside it.
Each request checks and decodes its own image (a bad one gets a `gr.Error` naming the problem),
then waits while a worker thread runs the waiting images as one batch, padded to one fixed size
(one backbone call, one greedy and one beam-search call; compiled once, at start-up). The
attention figure (matplotlib, slow) is drawn by a second, page-only event, so API callers do not
wait for it.

Pixels come from `captioning.uploads`, exactly as `--mode=caption` reads the file. An image whose
features lie farther from the training images' than the validation split's 99th percentile
(`evaluation.novelty`, as `--mode=caption` flags it) gets a plain warning above its caption (a
page-only event too).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import queue
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any

import gradio as gr
import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from PIL import Image

from captioning.data import backbone
from captioning.decoding import decode, search
from captioning.evaluation import visualize
from captioning.evaluation.novelty import Novelty
from captioning.run_dir import RunDir
from captioning.uploads import MAX_PIXELS, ImageError, model_pixels, read_image

__all__ = ["MAX_PIXELS", "Captioner", "ImageError", "build_app", "model_pixels", "read_image"]

NUM_EXAMPLES = 4  # Clickable test images of the run's dataset.
_PLOT_LOCK = threading.Lock()  # pyplot is not thread-safe.
_FIGURE_TOP_PX = 40  # White space above the attention figure, under Gradio's label and buttons.


# ---------------------------------------------------------------------------------------------
# The run's models, batched
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Caption:
    """One image's result.

    greedy: the greedy caption; beams: (caption, log-probability) of every hypothesis of the beam,
    best first; tokens: [T] int32 greedy word ids; attention: [T, L] float32 attention of each
    greedy step (L = 0 without an attention decoder); batch: images decoded in the same call;
    novelty: {"distance", "percentile", "unlike_training"} (`Novelty.describe`).
    """

    greedy: str
    beams: list[tuple[str, float]]
    tokens: np.ndarray
    attention: np.ndarray
    batch: int
    novelty: dict


def _greedy_config(decode_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(decode_config.to_dict())
    config.method = "greedy"
    return config


def _beams_fn(graphdef: nnx.GraphDef, decode_config: ml_collections.ConfigDict):
    """-> jitted `fn(params, features [B, ...]) -> search.Beams` (all K hypotheses, best first)."""
    settings = {
        "beam_size": int(decode_config.beam_size),
        "max_len": int(decode_config.max_len),
        "length_penalty": float(decode_config.length_penalty),
        "block_repeats": bool(decode_config.block_repeats),
    }

    @jax.jit
    def fn(params, features):
        return search.beam_search_beams(nnx.merge(graphdef, params), features, **settings)

    return fn


class Captioner:
    """A run's backbone, feature statistics, vocabulary and decoders, loaded and compiled once.

    `caption(pixels)` may be called from many threads at once: a worker thread takes every
    request waiting (up to `batch_size`) and runs them as one batch padded to `batch_size`, so
    the backbone and both decoders only ever see one shape. `batches` counts those batch calls
    (warm-up excluded) and `images` the images they captioned.
    """

    def __init__(self, workdir: str, *, batch_size: int = 16, checkpoint: str | None = None):
        run = RunDir(workdir)
        self.workdir = run.path
        self.config = run.config()
        self.batch_size = int(batch_size)
        self.vocab, self.stats = run.vocab(), run.feature_stats()
        encoder = self.config.encoder
        self.runner = backbone.get_runner(encoder, self.batch_size, seed=self.config.seed)
        run.check_channels(
            self.stats,
            self.runner.feature_shape[-1],
            f"the run's config.encoder ({encoder.backbone})",
            "the run directory is inconsistent.",
        )
        feature_shape = tuple(self.runner.feature_shape)
        self.grid_shape = feature_shape[:-1]
        which = checkpoint or self.config.eval.get("checkpoint", "best")
        inference = run.restore(self.config.model, len(self.vocab), feature_shape, which)
        self.step = int(inference.step)
        self._params = inference.params
        self._greedy = decode.decode_fn(inference.graphdef, _greedy_config(self.config.decode))
        self._beams = _beams_fn(inference.graphdef, self.config.decode)
        self._key = jax.random.key(int(self.config.decode.seed))
        self.novelty = Novelty.for_run(run, self.config)
        self.batches, self.images = 0, 0
        warm = self.caption_batch([np.zeros([self.image_size, self.image_size, 3], np.float32)])
        self.has_attention = warm[0].attention.shape[-1] > 0 and len(self.grid_shape) == 2
        self.batches, self.images = 0, 0
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._worker = threading.Thread(target=self._serve_requests, name="captioner", daemon=True)
        self._worker.start()

    @property
    def image_size(self) -> int:
        return self.runner.image_size

    def caption_batch(self, pixels: Sequence[np.ndarray]) -> list[Caption]:
        """pixels: n <= batch_size arrays [size, size, 3] float32 RGB in 0..255 -> n Captions.

        One backbone call, one greedy and one beam-search call on [batch_size, ...] (zero-padded).
        """
        n = len(pixels)
        if not 0 < n <= self.batch_size:
            raise ValueError(f"caption_batch takes 1 to {self.batch_size} images, got {n}.")
        images = np.zeros([self.batch_size, self.image_size, self.image_size, 3], np.float32)
        images[:n] = np.stack(pixels)
        raw = self.runner(images)
        features = self.stats.apply(raw)
        novelty = self.novelty.describe(self.novelty.score(np.asarray(raw[:n])))
        greedy = jax.device_get(self._greedy(self._params, features, self._key))
        beams = jax.device_get(self._beams(self._params, features))
        self.batches += 1
        self.images += n
        captions = self.vocab.decode_batch(greedy.tokens[:n])
        return [
            Caption(
                captions[i],
                self._beam_list(beams, i),
                greedy.tokens[i],
                greedy.attention[i],
                n,
                novelty[i],
            )
            for i in range(n)
        ]

    def _beam_list(self, beams: search.Beams, i: int) -> list[tuple[str, float]]:
        """Image i's hypotheses (empty slots skipped) -> [(caption, sum of log-probabilities)]."""
        return [
            (self.vocab.decode(beams.tokens[i, k]), float(beams.logprobs[i, k].sum()))
            for k in range(beams.tokens.shape[1])
            if np.isfinite(beams.scores[i, k])
        ]

    def caption(self, pixels: np.ndarray) -> Caption:
        """Thread-safe: queues one image [size, size, 3] float32 and waits for its batch."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._requests.put((pixels, future))
        return future.result()

    def close(self) -> None:
        """Stops the worker thread once the requests already queued are done."""
        self._requests.put(None)
        self._worker.join()

    def _serve_requests(self) -> None:
        """Worker: takes the waiting requests, up to batch_size, and captions them as one batch."""
        stop = False
        while not stop:
            pending = [self._requests.get()]
            while pending[-1] is not None and len(pending) < self.batch_size:
                try:
                    pending.append(self._requests.get_nowait())
                except queue.Empty:
                    break
            if pending[-1] is None:
                stop = True
                pending.pop()
            if pending:
                self._run(pending)

    def _run(self, pending: list[tuple[np.ndarray, concurrent.futures.Future]]) -> None:
        try:
            results = self.caption_batch([pixels for pixels, _ in pending])
        except Exception as e:  # Every request of the batch gets the error; the worker lives on.
            logging.exception("Captioning a batch of %d images failed.", len(pending))
            for _, future in pending:
                future.set_exception(e)
            return
        for (_, future), result in zip(pending, results, strict=True):
            future.set_result(result)


# ---------------------------------------------------------------------------------------------
# The page and the API
# ---------------------------------------------------------------------------------------------


def example_images(config: ml_collections.ConfigDict, count: int = NUM_EXAMPLES) -> list[str]:
    """The first `count` test images of the run's dataset, or [] when it has none here."""
    from captioning.data.datasets import registry

    try:
        records = registry.load_records(config.data, config.seed).get("test", [])
    except Exception as e:  # Any dataset error only costs the examples.
        logging.warning("No example images (%s: %s).", type(e).__name__, e)
        return []
    return [r.image_path for r in records if os.path.isfile(r.image_path)][:count]


def _header(captioner: Captioner) -> str:
    config = captioner.config
    encoder = config.encoder
    layer = f", {encoder.layer}" if encoder.layer else ""
    return (
        "## Image captioning\n"
        f"Run `{os.path.basename(captioner.workdir)}`: {config.model.decoder} decoder on "
        f"{encoder.backbone}{layer} features ({captioner.image_size} px), checkpoint step "
        f"{captioner.step}. Drop, paste or pick an image."
    )


def unlike_warning(novelty: dict) -> str:
    """The page's warning for a flagged image (Markdown), or "" for one like the training data."""
    if not novelty.get("unlike_training"):
        return ""
    return (
        "**Warning: this image is unlike the training images.** Its features lie farther from "
        f"theirs than {novelty['percentile']:.1f} % of the validation images' do (beyond the "
        "99th percentile), so the caption below may not describe it."
    )


def caption_request(captioner: Captioner, image: dict | None, max_bytes: int) -> tuple:
    """The /caption endpoint: an uploaded image (Gradio FileData dict) -> (greedy caption, beam
    table [[rank, caption, log-prob]], request time, page state: the warning, attention)."""
    start = time.perf_counter()
    path = (image or {}).get("path")
    if not path:
        raise gr.Error("No image: drop, paste or pick an image first.", print_exception=False)
    try:
        rgb = read_image(path, max_bytes=max_bytes)
    except ImageError as e:
        raise gr.Error(str(e), print_exception=False) from e
    pixels = model_pixels(rgb, captioner.image_size)
    result = captioner.caption(pixels)
    table = [[k + 1, caption, round(logp, 3)] for k, (caption, logp) in enumerate(result.beams)]
    elapsed = f"{(time.perf_counter() - start) * 1000:.0f} ms (batch of {result.batch})"
    state = {"warning": unlike_warning(result.novelty)}
    if captioner.has_attention:
        state.update(
            pixels=np.clip(np.rint(pixels), 0, 255).astype(np.uint8),
            tokens=result.tokens,
            attention=result.attention,
        )
    return result.greedy, table, elapsed, state


def draw_attention(captioner: Captioner, state: dict | None) -> np.ndarray | None:
    """The Show-Attend-Tell figure of a result -> [H, W, 3] uint8 PNG pixels (None: no result)."""
    if not state or "tokens" not in state:
        return None
    with tempfile.TemporaryDirectory(prefix="captioning_serve_") as folder:
        image_path = os.path.join(folder, "image.png")
        Image.fromarray(state["pixels"]).save(image_path)
        with _PLOT_LOCK:
            [png] = visualize.save_attention_maps(
                folder,
                [image_path],
                state["tokens"][None],
                state["attention"][None],
                captioner.vocab.itos,
                captioner.grid_shape,
                names=["attention.png"],
                columns=3,
            )
        with Image.open(png) as figure:
            pixels = np.asarray(figure.convert("RGB"))
    # A white band on top: Gradio draws the component's label and buttons over the image.
    return np.pad(pixels, [(_FIGURE_TOP_PX, 0), (0, 0), (0, 0)], constant_values=255)


def build_app(
    workdir: str,
    *,
    max_upload_mb: float = 10,
    max_batch_size: int = 16,
    captioner: Captioner | None = None,
) -> gr.Blocks:
    """The Gradio app of the run in `workdir` (models loaded and warm; call `.launch()`).

    `captioner` reuses an already loaded run (its batch size then wins over max_batch_size).
    """
    captioner = captioner or Captioner(workdir, batch_size=max_batch_size)
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS  # PIL's own bomb check, behind ours.
    max_bytes = int(max_upload_mb * 2**20)
    examples = example_images(captioner.config)

    def caption(image):
        """One image -> (greedy caption, beam captions with log-probabilities, request time)."""
        return caption_request(captioner, image, max_bytes)

    def show_warning(state):
        text = (state or {}).get("warning", "")
        return gr.update(value=text, visible=bool(text))

    def attention_figure(state):
        return draw_attention(captioner, state)

    # One queue slot per batch row: that many requests decode their images side by side and wait
    # for the batch together.
    settings = {
        "preprocess": False,  # The handler gets the upload's path and decodes it itself.
        "concurrency_limit": captioner.batch_size,
        "concurrency_id": "caption",  # Shared by the upload/button and the example clicks.
    }
    with gr.Blocks(
        title="Image captioning", analytics_enabled=False, delete_cache=(3600, 3600)
    ) as app:
        gr.Markdown(_header(captioner))
        with gr.Row():
            with gr.Column(min_width=280):
                image = gr.Image(
                    label="Image",
                    type="filepath",
                    sources=["upload", "clipboard"],
                    height=320,
                    elem_id="image-input",
                )
                button = gr.Button("Caption", variant="primary")
                example_list = None
                if examples:
                    example_list = gr.Examples(
                        [[p] for p in examples],
                        inputs=image,
                        label="Examples: test images of the run's dataset",
                        api_visibility="private",
                    )
            with gr.Column(min_width=280):
                warning = gr.Markdown(visible=False, elem_id="unlike-warning")
                greedy = gr.Textbox(label="Greedy caption", interactive=False)
                beams = gr.Dataframe(
                    headers=["#", "beam caption", "log-prob"],
                    datatype=["number", "str", "number"],
                    label=f"Beam search (beam size {int(captioner.config.decode.beam_size)})",
                    interactive=False,
                    wrap=True,
                    column_widths=["12%", "63%", "25%"],
                    max_height=800,
                )
                elapsed = gr.Textbox(label="Request time", interactive=False)
                figure = gr.Image(
                    label="Attention over the image for each word",
                    type="numpy",
                    format="png",
                    interactive=False,
                    visible=captioner.has_attention,
                    elem_id="attention-figure",
                )
        state = gr.State()
        outputs = [greedy, beams, elapsed, state]
        gr.on([image.upload, button.click], caption, image, outputs, api_name="caption", **settings)
        if example_list is not None:
            example_list.load_input_event.then(
                caption, image, outputs, api_visibility="private", **settings
            )
        state.change(show_warning, state, warning, api_visibility="private")
        if captioner.has_attention:
            state.change(
                attention_figure, state, figure, api_visibility="private", concurrency_limit=1
            )
    app.queue(max_size=16 * captioner.batch_size, default_concurrency_limit=1)
    return app


def launch_settings(host: str, port: int, max_upload_mb: float) -> dict[str, Any]:
    """Keyword arguments of `app.launch` that serve the app and nothing else.

    No `allowed_paths`: Gradio copies the example images into its own cache when the page is
    built and serves them from there, so no folder of the machine needs to be opened. Gradio's
    own upload limit is twice --max_upload_mb: files between the two reach the handler, which
    refuses them with a clear message; larger ones are cut off during the upload.
    """
    return {
        "server_name": host,
        "server_port": port,
        "share": False,
        "allowed_paths": [],
        "max_file_size": int(2 * max_upload_mb * 2**20) + 2**20,
        "ssr_mode": False,
        "mcp_server": False,
        "quiet": True,
    }


def serve(
    workdir: str,
    host: str = "127.0.0.1",
    port: int = 7860,
    max_upload_mb: float = 10,
    checkpoint: str | None = None,
):
    """Loads the run (its `checkpoint`: best, latest or a step; default the run's
    config.eval.checkpoint), warms up and serves the app until interrupted (Ctrl-C)."""
    captioner = Captioner(workdir, checkpoint=checkpoint)
    app = build_app(workdir, max_upload_mb=max_upload_mb, captioner=captioner)
    logging.info("Serving %s on http://%s:%d/ (Ctrl-C stops).", captioner.workdir, host, port)
    try:
        app.launch(**launch_settings(host, port, max_upload_mb))
    finally:
        app.close()
        captioner.close()


# ---------------------------------------------------------------------------------------------
# Load benchmark
# ---------------------------------------------------------------------------------------------


def load_benchmark(
    url: str, images: Sequence[str], requests: int = 64, threads: int = 16
) -> dict[str, Any]:
    """Sends `requests` /caption calls from `threads` threads (one gradio_client each, images in
    turn) -> {serve_p50_ms, serve_p95_ms, serve_captions_per_s, serve_requests, serve_answered,
    serve_errors, serve_threads}. Latency is per request, upload included; captions/s counts the
    answered requests over the wall time of the whole load."""
    from gradio_client import Client, handle_file

    clients = [Client(url, verbose=False) for _ in range(threads)]
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def worker(k: int) -> None:
        for i in range(k, requests, threads):
            start = time.perf_counter()
            try:
                clients[k].predict(handle_file(images[i % len(images)]), api_name="/caption")
            except Exception as e:  # Counted and reported, not raised: the load goes on.
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
                continue
            with lock:
                latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(worker, range(threads)))
    wall = time.perf_counter() - start
    for client in clients:
        client.close()
    if errors:
        logging.warning("%d of %d requests failed, e.g. %s", len(errors), requests, errors[0])
    ms = np.asarray(latencies) * 1000 if latencies else np.asarray([np.nan])
    return {
        "serve_p50_ms": round(float(np.percentile(ms, 50)), 1),
        "serve_p95_ms": round(float(np.percentile(ms, 95)), 1),
        "serve_captions_per_s": round(len(latencies) / wall, 2),
        "serve_requests": requests,
        "serve_answered": len(latencies),
        "serve_errors": len(errors),
        "serve_threads": threads,
    }
