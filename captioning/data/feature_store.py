"""The feature store: a dataset's backbone features on disk, sharded and resumable.

* `feature_store_dir` names a store by its dataset and encoder settings, so stores never mix.
* `export_features` writes `shard_00000.npz`, ... (arrays `features`, `ids`, `skipped_ids`,
  `skipped_reasons`) and `metadata.json`. Shards are written atomically (temporary file, then
  rename), so an interrupted export resumes where it stopped; a store made with other settings is
  refused; a full disk raises `faults.DiskFull` naming the file. The metadata records each
  shard's size, time and CRC-32 (`shards`): every export (so every run) checks the sizes, and the
  checksum of a shard whose size or time changed, and exports a damaged shard again.
* `load_feature_store` reads a store back: `features` is [N, D] (pooled) or [N, H, W, C] (pooling
  'none'), rows in the order of `ids`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import os
import re
import struct
import sys
import time
import zipfile
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

from captioning import faults
from captioning.data import backbone
from captioning.data.datasets.base import DataError, ImageRecord

logger = logging.getLogger(__name__)

METADATA_FILE = "metadata.json"
SHARD_PATTERN = re.compile(r"^shard_(\d{5})\.npz$")
# Store settings that must agree between a store on disk and a new export into it.
SETTING_KEYS = ("backbone", "weights", "image_size", "pooling", "dtype", "seed", "layer", "grid")


class FeatureStoreError(ValueError):
    """A feature store on disk is incomplete or unreadable; the message says what to do."""


class FeatureStoreMismatchError(FeatureStoreError):
    """A feature store folder already holds features made with other settings."""


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """What `export_features` did.

    Attributes:
      store_dir: the feature store folder.
      num_images: images in the store (all shards, skipped ones excluded).
      num_computed: images run through the backbone now (the rest came from finished shards).
      skipped: (image_id, reason) for every unreadable image left out (skip_bad_images=True).
      seconds: wall time of the backbone pass (0 when nothing was left to compute).
      images_per_second: num_computed / seconds, decoding included (0 when nothing computed).
    """

    store_dir: str
    num_images: int
    num_computed: int
    skipped: list[tuple[str, str]]
    seconds: float
    images_per_second: float


@dataclasses.dataclass
class FeatureStore:
    """Features of a whole dataset.

    Attributes:
      ids: image ids, row order of `features`.
      features: [N, D] (pooling 'avg') or [N, H, W, C] (pooling 'none'), float32 or float16 as
        stored: an array in memory, or `MappedFeatures` reading rows from the shards on disk.
      metadata: the store's metadata.json.
    """

    ids: list[str]
    features: np.ndarray | MappedFeatures
    metadata: dict[str, Any]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def nbytes(self) -> int:
        """Size of the features in memory (as stored: float16 stays float16)."""
        shape, dtype = self.metadata["feature_shape"], np.dtype(self.metadata["dtype"])
        return len(self.ids) * int(np.prod(shape)) * dtype.itemsize


def _mapped_member(path: str, member: str = "features.npy") -> np.memmap:
    """An array stored uncompressed inside an .npz (np.savez) memory-mapped where it lies."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(member)
        if info.compress_type != zipfile.ZIP_STORED:
            raise FeatureStoreError(f"{path}: {member} is compressed and cannot be memory-mapped.")
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)  # The zip local file header: name and extra field lengths at 26..30.
        name_length, extra_length = struct.unpack("<HH", local[26:30])
        f.seek(info.header_offset + 30 + name_length + extra_length)
        version = np.lib.format.read_magic(f)
        read_header = (
            np.lib.format.read_array_header_1_0
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0
        )
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
    if fortran:
        raise FeatureStoreError(f"{path}: {member} is in Fortran order; export the store again.")
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


def aligned_empty(shape: Sequence[int], dtype: Any, alignment: int = 64) -> np.ndarray:
    """np.empty whose data starts at a multiple of `alignment` bytes."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + alignment, np.uint8)
    offset = -raw.ctypes.data % alignment
    return raw[offset : offset + nbytes].view(dtype).reshape(shape)


class MappedFeatures:
    """The store's feature rows read from its shards on disk when indexed: `features[rows]` ->
    [len(rows), ...]. Each row is one `os.pread` from its shard (rows lie contiguous there),
    `READ_THREADS` at a time: a batch's rows are read in parallel, where faulting a mapping's
    pages in would read them one page-run after another, and no file page counts in this
    process's memory (the operating system's page cache still keeps what fits). The shards are
    memory-mapped for their layout only."""

    READ_THREADS = 8

    def __init__(self, shard_paths: Sequence[str]):
        self._shards = [_mapped_member(p) for p in shard_paths]
        self._fds = [os.open(p, os.O_RDONLY) for p in shard_paths]
        self._pool = concurrent.futures.ThreadPoolExecutor(self.READ_THREADS)  # Threads on use.
        sizes = [len(s) for s in self._shards]
        self._starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        first = self._shards[0]
        self.shape = (int(self._starts[-1]), *first.shape[1:])
        self.dtype = first.dtype

    def __len__(self) -> int:
        return self.shape[0]

    def read_all(self) -> np.ndarray:
        """Every row in one 64-byte-aligned array, read shard by shard with file reads rather
        than through the mapping (mapped pages would count in this process's memory a second
        time). XLA's CPU client uses such an array in place: `jax.device_put` makes no copy, so
        device residency on a CPU holds the store once."""
        out = aligned_empty(self.shape, self.dtype)
        for k, shard in enumerate(self._shards):
            target = memoryview(out[self._starts[k] : self._starts[k + 1]]).cast("B")
            with open(shard.filename, "rb") as f:
                f.seek(shard.offset)
                done = 0
                while done < len(target):
                    read = f.readinto(target[done:])
                    if not read:
                        raise FeatureStoreError(f"{shard.filename}: shorter than its header says.")
                    done += read
        return out

    def __getitem__(self, rows) -> np.ndarray:
        rows = np.asarray(rows, np.int64)
        flat = rows.reshape(-1)
        shard = np.searchsorted(self._starts, flat, side="right") - 1
        out = np.empty((len(flat), *self.shape[1:]), self.dtype)
        row_bytes = out[0].nbytes if len(flat) else 0

        def read(i: int) -> None:
            k = int(shard[i])
            offset = self._shards[k].offset + int(flat[i] - self._starts[k]) * row_bytes
            target, done = memoryview(out[i]).cast("B"), 0
            while done < row_bytes:
                got = os.preadv(self._fds[k], [target[done:]], offset + done)
                if not got:
                    raise FeatureStoreError(f"{self._shards[k].filename}: shorter than its header.")
                done += got

        order = np.lexsort((flat, shard))  # Each shard's rows in file order.
        list(self._pool.map(read, order.tolist()))
        return out.reshape(*rows.shape, *self.shape[1:])

    def __del__(self):
        for fd in getattr(self, "_fds", ()):
            os.close(fd)
        if getattr(self, "_pool", None) is not None:
            self._pool.shutdown(wait=False)


def feature_store_dir(
    cache_dir: str, dataset_key: str, encoder_config, *, seed: int | None = None
) -> str:
    """Store folder: <cache_dir>/features/<dataset>/<backbone>_<weights>_<size>px_<pool>_<dtype>.

    Random weights add their seed (`none-seed0`); a weights file adds its base name.
    """
    s = backbone.encoder_settings(encoder_config, seed)
    weights = s["weights"] if s["seed"] is None else f"none-seed{s['seed']}"
    layer = f"@{s['layer']}" if s["layer"] else ""
    grid = f"{s['grid']}x{s['grid']}" if s["grid"] and s["pooling"] == "none" else ""
    name = f"{s['backbone']}{layer}_{weights}_{s['image_size']}px_{s['pooling']}{grid}_{s['dtype']}"
    safe = lambda text: re.sub(r"[^A-Za-z0-9._=+-]+", "-", text)
    return os.path.join(os.path.expanduser(cache_dir), "features", safe(dataset_key), safe(name))


def _shard_path(store_dir: str, shard: int) -> str:
    return os.path.join(store_dir, f"shard_{shard:05d}.npz")


def _atomic_write(path: str, write: Callable[[Any], None], needed: int | None = None) -> None:
    """Writes via a temporary file and a rename, so `path` is either complete or absent; a full
    disk raises `faults.DiskFull` naming `path` and the `needed` bytes."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with faults.writing(path, needed), open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_json(path: str, data: dict[str, Any]) -> None:
    encoded = json.dumps(data, indent=2).encode()
    _atomic_write(path, lambda f: f.write(encoded), len(encoded))


def _checksum(path: str) -> str:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _shard_record(path: str, old: dict[str, Any] | None) -> dict[str, Any]:
    """{size, mtime_ns, crc32} of a shard file; `old` again when size and time are unchanged."""
    stat = os.stat(path)
    if old and old.get("size") == stat.st_size and old.get("mtime_ns") == stat.st_mtime_ns:
        return old
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "crc32": _checksum(path)}


def shard_damage(path: str, record: dict[str, Any] | None) -> str | None:
    """What is wrong with a shard against its export `record` (None: nothing found). Its size
    is always compared; its checksum when its size or time changed."""
    if not record or not os.path.isfile(path):
        return None
    stat = os.stat(path)
    if stat.st_size != record["size"]:
        return f"{stat.st_size} bytes, {record['size']} when exported"
    if stat.st_mtime_ns != record["mtime_ns"] and _checksum(path) != record["crc32"]:
        return "its CRC-32 differs from the one recorded at export"
    return None


def _recorded_shards(store_dir: str) -> dict[str, Any]:
    """The shard records of the store's metadata.json ({} when there are none)."""
    try:
        with open(os.path.join(store_dir, METADATA_FILE)) as f:
            return json.load(f).get("shards", {})
    except (OSError, ValueError):
        return {}


def _write_shard(
    path: str, ids: Sequence[str], features: np.ndarray, skipped: Sequence[tuple[str, str]]
) -> None:
    """One shard: features [n, *shape], ids [n], skipped ids and reasons [k]."""

    def write(f):
        np.savez(
            f,
            features=features,
            ids=np.array(ids, dtype=str),
            skipped_ids=np.array([s[0] for s in skipped], dtype=str),
            skipped_reasons=np.array([s[1] for s in skipped], dtype=str),
        )

    _atomic_write(path, write, features.nbytes + 256 * (len(ids) + len(skipped)) + 4096)


def _read_shard_index(path: str) -> tuple[list[str], list[tuple[str, str]]] | None:
    """(ids, skipped) of a finished shard, or None if it is absent or unreadable."""
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path) as shard:
            ids = shard["ids"].tolist()
            skipped = list(
                zip(shard["skipped_ids"].tolist(), shard["skipped_reasons"].tolist(), strict=True)
            )
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    return ids, skipped


def _library_versions() -> dict[str, str]:
    import keras
    import tensorflow as tf

    return {
        "python": sys.version.split()[0],
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "keras_backend": keras.backend.backend(),
        "numpy": np.__version__,
    }


def _check_store_settings(store_dir: str, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The existing metadata if it matches `settings`; raises on a mismatch."""
    path = os.path.join(store_dir, METADATA_FILE)
    if not os.path.exists(path):
        if any(SHARD_PATTERN.match(name) for name in os.listdir(store_dir)):
            raise FeatureStoreError(
                f"{store_dir} holds feature shards but no {METADATA_FILE}, so their settings are "
                f"unknown. Delete the folder or use another config.data.cache_dir."
            )
        return None
    try:
        with open(path) as f:
            metadata = json.load(f)
    except (OSError, ValueError) as e:
        raise FeatureStoreError(
            f"Cannot read {path}: {e}. Delete the folder {store_dir} and export again."
        ) from e
    old = {k: metadata.get(k) for k in SETTING_KEYS}
    if old != settings:
        raise FeatureStoreMismatchError(
            f"The feature store {store_dir} was made with {old}, not the requested {settings}. "
            f"Use another cache dir (config.data.cache_dir) or delete the folder {store_dir}."
        )
    return metadata


def _unique_images(records: Sequence[ImageRecord]) -> tuple[list[str], list[str]]:
    """(image_ids, paths) of distinct images, sorted by id (so record order does not matter)."""
    paths: dict[str, str] = {}
    for record in records:
        old = paths.setdefault(record.image_id, record.image_path)
        if old != record.image_path:
            raise DataError(
                f"image_id {record.image_id!r} points to two files: {old} and "
                f"{record.image_path}. Image ids must be unique within a dataset."
            )
    ids = sorted(paths)
    return ids, [paths[i] for i in ids]


def export_features(
    records: Sequence[ImageRecord],
    encoder_config,
    store_dir: str,
    *,
    skip_bad_images: bool = False,
    shard_size: int = 1024,
    seed: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    barrier: Callable[[str], None] | None = None,
) -> ExportResult:
    """Runs the backbone over every record's image (once per image_id) into `store_dir`.

    Resumable: finished shards whose image ids still match are kept, the rest is computed.
    Missing or undecodable image files raise `DataError` naming the file, or with
    `skip_bad_images` are left out and returned in `ExportResult.skipped`.
    `seed` seeds random ('none') weights (default: encoder.seed or 0).

    Several processes (hosts) share the work: process p computes the shards k with
    k % process_count == p (shards are made small enough that every process gets one), `barrier`
    waits for all of them, and process 0 then writes the index (metadata.json) covering every
    shard.
    """
    settings = backbone.encoder_settings(encoder_config, seed)
    weights_path = backbone.resolve_weights(encoder_config)  # Fails fast, before touching the disk.
    ids, paths = _unique_images(records)
    if not skip_bad_images:
        # Cheap up-front check, so a wrong data dir fails in a second rather than mid-export.
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise DataError(
                f"{len(missing)} of {len(paths)} image files are missing, e.g. {missing[:3]}. "
                f"Check config.data.dir, or set config.data.skip_bad_images=True to skip them."
            )

    os.makedirs(store_dir, exist_ok=True)
    first = process_index == 0
    barrier = barrier or (lambda name: None)
    old_metadata = _check_store_settings(store_dir, settings) if first else None
    barrier("feature store checked")  # Process 0 has refused a mismatched store, or not.
    recorded = _recorded_shards(store_dir)

    shard_size = min(shard_size, max(1, -(-len(ids) // process_count)))
    num_shards = -(-len(ids) // shard_size)
    todo: list[tuple[int, int, int]] = []  # (shard, first, end) positions into work_*.
    work_ids: list[str] = []
    work_paths: list[str] = []
    done_images = 0
    for shard in range(num_shards):
        if shard % process_count != process_index:
            continue  # Another process's share.
        lo, hi = shard * shard_size, min((shard + 1) * shard_size, len(ids))
        path = _shard_path(store_dir, shard)
        problem = shard_damage(path, recorded.get(os.path.basename(path)))
        if problem is None and os.path.isfile(path) and _read_shard_index(path) is None:
            problem = "unreadable"
        if problem:
            logger.warning("Feature shard %s is damaged (%s): exporting it again.", path, problem)
        done = None if problem else _read_shard_index(path)
        if done is not None:
            done_ids, done_skipped = done
            complete = sorted(done_ids + [s[0] for s in done_skipped]) == ids[lo:hi]
            # Without skipping, a shard with skipped images is redone (the file may be fixed).
            if complete and (skip_bad_images or not done_skipped):
                done_images += hi - lo
                continue
        todo.append((shard, len(work_ids), len(work_ids) + hi - lo))
        work_ids += ids[lo:hi]
        work_paths += paths[lo:hi]
    logger.info(
        "Feature export into %s%s: %d images already in finished shards, %d to compute.",
        store_dir,
        f" (process {process_index} of {process_count})" if process_count > 1 else "",
        done_images,
        len(work_ids),
    )
    # Shards left over from a larger record set would otherwise be loaded with the rest.
    for name in os.listdir(store_dir) if first else []:
        match = SHARD_PATTERN.match(name)
        if match and int(match.group(1)) >= num_shards:
            os.remove(os.path.join(store_dir, name))

    metadata = {
        **settings,
        "weights_path": weights_path,
        "preprocessing": (
            "decode RGB, bilinear antialiased resize to a square image_size (aspect not kept), "
            f"keras.applications.{backbone.backbone_spec(encoder_config).module}.preprocess_input"
        ),
        "shard_size": shard_size,
        "versions": _library_versions(),
        "complete": False,
        "shards": recorded,
    }
    if old_metadata and old_metadata.get("versions") != metadata["versions"]:
        logger.warning(
            "Resuming %s, started with %s, now %s: features may differ slightly.",
            store_dir,
            old_metadata.get("versions"),
            metadata["versions"],
        )
    old_shape = (old_metadata or {}).get("feature_shape")
    runner = None  # Built only when there are images to compute (a Keras model takes seconds).
    if work_ids or (first and not old_shape):
        runner = backbone.get_runner(encoder_config, encoder_config.batch_size, seed)
    metadata["feature_shape"] = list(runner.feature_shape) if runner else old_shape
    if first:
        _write_json(os.path.join(store_dir, METADATA_FILE), metadata)

    seconds = _export_shards(store_dir, todo, work_ids, work_paths, runner, skip_bad_images)
    barrier("feature shards written")

    num_images, skipped = 0, []
    for shard in range(num_shards):
        shard_ids, shard_skipped = _read_shard_index(_shard_path(store_dir, shard))
        num_images += len(shard_ids)
        skipped += shard_skipped
    metadata.update(num_images=num_images, skipped=skipped, complete=True)
    if first:
        names = [os.path.basename(_shard_path(store_dir, shard)) for shard in range(num_shards)]
        metadata["shards"] = {
            name: _shard_record(os.path.join(store_dir, name), recorded.get(name)) for name in names
        }
        _write_json(os.path.join(store_dir, METADATA_FILE), metadata)
    barrier("feature store complete")
    rate = len(work_ids) / seconds if seconds > 0 else 0.0
    logger.info(
        "Feature store %s: %d images (%d computed now in %.1f s, %.1f images/s; %d skipped).",
        store_dir,
        num_images,
        len(work_ids),
        seconds,
        rate,
        len(skipped),
    )
    return ExportResult(store_dir, num_images, len(work_ids), skipped, seconds, rate)


def _export_shards(
    store_dir: str,
    todo: list[tuple[int, int, int]],
    work_ids: list[str],
    work_paths: list[str],
    runner: backbone.Runner | None,
    skip_bad_images: bool,
) -> float:
    """Computes the `todo` shards (one pipeline for all, so it never drains); returns seconds."""
    if not work_ids:
        return 0.0
    positions_buf: list[np.ndarray] = []
    features_buf: list[np.ndarray] = []
    failures_buf: list[tuple[int, str]] = []
    next_todo, reported = 0, 0
    start = time.perf_counter()
    with tqdm(total=len(work_ids), unit="img", desc="export features", smoothing=0.1) as bar:
        for positions, features, failures, done in backbone.iter_features(work_paths, runner):
            if failures and not skip_bad_images:
                position, reason = failures[0]
                raise DataError(
                    f"Cannot read image {work_paths[position]} (image_id "
                    f"{work_ids[position]!r}): {reason}. Fix or remove the file, or set "
                    f"config.data.skip_bad_images=True to skip unreadable images."
                )
            positions_buf.append(positions)
            features_buf.append(features)
            failures_buf += failures
            # Write every shard whose images have all been accounted for.
            while next_todo < len(todo) and todo[next_todo][2] <= done:
                shard, _, end = todo[next_todo]
                all_positions = np.concatenate(positions_buf)
                all_features = np.concatenate(features_buf)
                mine = all_positions < end
                _write_shard(
                    _shard_path(store_dir, shard),
                    [work_ids[p] for p in all_positions[mine]],
                    all_features[mine],
                    [(work_ids[p], reason) for p, reason in failures_buf if p < end],
                )
                positions_buf, features_buf = [all_positions[~mine]], [all_features[~mine]]
                failures_buf = [(p, r) for p, r in failures_buf if p >= end]
                next_todo += 1
            bar.update(done - reported)
            reported = done
    return time.perf_counter() - start


def load_feature_store(store_dir: str, *, on_disk: bool = False) -> FeatureStore:
    """Reads a complete feature store: all shards concatenated in id order, into memory, or,
    with `on_disk`, as `MappedFeatures` that read the rows they are asked for."""
    path = os.path.join(store_dir, METADATA_FILE)
    if not os.path.isfile(path):
        raise FeatureStoreError(
            f"No feature store at {store_dir} ({METADATA_FILE} missing): run the export first "
            f"(main.py --mode=export_features)."
        )
    with open(path) as f:
        metadata = json.load(f)
    metadata["store_dir"] = store_dir
    if not metadata.get("complete"):
        raise FeatureStoreError(
            f"The feature store {store_dir} is incomplete (its export was interrupted): run the "
            f"export again, it resumes where it stopped."
        )
    names = sorted(name for name in os.listdir(store_dir) if SHARD_PATTERN.match(name))
    for name in names:  # Sizes only: the export checks checksums.
        path = os.path.join(store_dir, name)
        record = metadata.get("shards", {}).get(name)
        if record and os.path.getsize(path) != record["size"]:
            raise FeatureStoreError(
                f"{path} is damaged ({shard_damage(path, record)}): run the export again (any "
                "run does), it exports that shard again from the images."
            )
    ids: list[str] = []
    chunks: list[np.ndarray] = []
    for name in names:
        with np.load(os.path.join(store_dir, name)) as shard:
            ids += shard["ids"].tolist()
            if not on_disk:
                chunks.append(shard["features"])
    if len(ids) != metadata["num_images"]:
        raise FeatureStoreError(
            f"The feature store {store_dir} has {len(ids)} images in its shards but its "
            f"{METADATA_FILE} says {metadata['num_images']}: delete the folder and export again."
        )
    shape = (0, *metadata["feature_shape"])
    if on_disk and names:
        features = MappedFeatures([os.path.join(store_dir, name) for name in names])
    else:
        features = np.concatenate(chunks) if chunks else np.zeros(shape, metadata["dtype"])
    return FeatureStore(ids, features, metadata)
