"""Entry point: `python main.py --config=configs/scenes_transformer.py --workdir=runs/scenes`.

Modes:
  train            train (resuming from the workdir's checkpoints), then evaluate the best one.
  evaluate         score the best checkpoint on --config.eval.split with --config.decode.method.
  caption          caption new images: --images=FILE|FOLDER|GLOB (uses the run's own settings).
  export_features  only export the CNN feature store for the configured dataset and backbone.
  serve            web demo and API of a trained run (Gradio): --host, --port, --max_upload_mb.

Any config field can be overridden, e.g. `--config.model.hidden_size=512`.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).")
flags.DEFINE_string("workdir", None, "Run directory: config, vocabulary, checkpoints, logs, evals.")
flags.DEFINE_enum(
    "mode", "train", ["train", "evaluate", "caption", "export_features", "serve"], "What to do."
)
flags.DEFINE_string("images", None, "caption mode: an image file, a folder or a glob pattern.")
flags.DEFINE_string("output", None, "caption mode: JSON file for the captions (default: workdir).")
flags.DEFINE_integer("port", 7860, "serve mode: the port the web demo listens on.")
flags.DEFINE_string(
    "host", "127.0.0.1", "serve mode: the address to bind (0.0.0.0 opens it to the network)."
)
flags.DEFINE_float("max_upload_mb", 10, "serve mode: largest image file accepted, in MB.")
flags.DEFINE_string(
    "coordinator_address",
    None,
    "Several processes (hosts): host:port of process 0's coordinator (not needed on Cloud TPU or "
    "under SLURM, where it is detected).",
)
flags.DEFINE_integer("num_processes", None, "Several processes: how many take part.")
flags.DEFINE_integer("process_id", None, "Several processes: this process's index, 0 first.")
flags.mark_flag_as_required("workdir")


def _quiet_library_logs():
    """Keeps the log readable: Orbax and TF info lines are dropped, warnings kept."""
    import logging as py_logging

    from captioning import faults

    def keep(record):
        noisy = "/orbax/" in record.pathname or "/tensorflow/" in record.pathname
        if noisy and record.exc_info and faults.is_disk_full(record.exc_info[1]):
            return False  # Said in one line (faults.DiskFull) when the run stops.
        return record.levelno >= py_logging.WARNING or not noisy

    logging.get_absl_handler().addFilter(keep)

    default_hook = sys.unraisablehook

    def drop_failed_reads(unraisable):
        # A damaged checkpoint's other reads fail in coroutines Orbax leaves behind; the damage is
        # said once (faults.DamagedCheckpoint), not as a traceback per array when they are freed.
        if "_read_array_index_and_device_put" not in repr(unraisable.object):
            default_hook(unraisable)

    sys.unraisablehook = drop_failed_reads


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    _quiet_library_logs()
    from captioning import host

    host.keep_freed_memory()  # Before the first large allocation (captioning/host.py: why).
    # Imported here so `--help` is fast. TensorFlow never grabs an accelerator JAX wants, except
    # in export mode, where the backbone runs data parallel over the GPUs (nothing trains there).
    import tensorflow as tf

    if FLAGS.mode == "export_features":
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # Leave the GPUs to TF.
        for gpu in tf.config.list_physical_devices("GPU"):
            tf.config.experimental.set_memory_growth(gpu, True)
    else:
        tf.config.set_visible_devices([], "GPU")
    from captioning import cli, parallel

    parallel.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    from captioning import faults

    try:
        cli.run(
            FLAGS.mode,
            FLAGS.config,
            FLAGS.workdir,
            images=FLAGS.images,
            output=FLAGS.output,
            host=FLAGS.host,
            port=FLAGS.port,
            max_upload_mb=FLAGS.max_upload_mb,
        )
    except faults.Fault as e:  # An expected fault: its message says what to do, no traceback.
        logging.error("%s: %s", type(e).__name__, e)
        raise SystemExit(1) from None
    logging.info("Done: %s", FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
