"""Tiny scenes run for the tests: seconds on a CPU.

python main.py --config=configs/test.py --workdir=/tmp/test_run
"""

from configs import scenes


def get_config():
    config = scenes.get_config()
    config.data.num_train = 48  # A few images keep the test run short.
    config.data.num_val = 8  # Validation images.
    config.data.num_test = 8  # Test images.
    config.data.image_size = 80  # Small renders.
    config.encoder.image_size = 64  # Small input keeps export fast.
    config.encoder.batch_size = 16  # Images per backbone call.
    config.model.embed_dim = 16  # Tiny decoder.
    config.model.hidden_size = 32  # Tiny decoder.
    config.train.num_epochs = 2  # Two epochs: enough to test checkpoint and resume.
    config.train.batch_size = 32  # Captions per step.
    config.train.warmup_steps = 2  # Short warm-up.
    config.train.num_buckets = 2  # Fewer compiled steps keep the tests fast.
    config.train.log_every = 2  # Log often.
    config.decode.batch_size = 8  # Images per decode call.
    config.eval.meteor = False  # Java start-up is slow; the metrics tests cover METEOR.
    config.eval.num_samples = 4  # Small picture.
    return config
