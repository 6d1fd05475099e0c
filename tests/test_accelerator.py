"""What only a GPU or TPU can show: float32 matmuls at full precision, the feature store held in
the accelerator's memory and gathered from by the train step, bfloat16 steps that agree with
float32. Marked `accelerator`: skipped, with that reason, where JAX has only a CPU
(tests/conftest.py); `python -m pytest -m accelerator tests` runs them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from captioning import parallel
from captioning.data import prepare
from tests.test_train_step import _setup

pytestmark = pytest.mark.accelerator


def _platforms(array: jax.Array) -> set[str]:
    return {d.platform for d in array.devices()}


def test_float32_matmuls_are_full_precision():
    """The suite's setting (tests/conftest.py) reaches the accelerator: no TF32 or bfloat16
    passes in a float32 product, so the reference comparisons of the other tests hold."""
    rng = np.random.default_rng(0)
    a, b = (rng.normal(size=(512, 512)).astype(np.float32) for _ in range(2))
    got = np.asarray(jnp.asarray(a) @ jnp.asarray(b), np.float64)
    want = a.astype(np.float64) @ b.astype(np.float64)
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) < 1e-5


def test_device_residency_puts_the_store_in_accelerator_memory():
    """`data.feature_residency=device`: `auto` picks it for a small store, the store placed as
    train.py places it lives in the accelerator's memory (its bytes in use grow by the store's
    size), and a train step gathers its rows there, however far into the store."""
    device = jax.local_devices()[0]
    assert device.platform in ("gpu", "tpu"), device
    assert "bytes_limit" in (device.memory_stats() or {}), "the device reports no memory limit"
    assert prepare.choose_residency("auto", 10**6) == "device"
    state, train_step, _, features, batch = _setup(decoder="merge_attention")
    # 2**20 rows, 84 MB of float16: the batch's 4 images again and again.
    store = np.tile(np.asarray(features, np.float16), (2**18, 1, 1, 1))
    before = device.memory_stats()["bytes_in_use"]
    resident = parallel.replicate(store, parallel.make_mesh([device]))
    resident.block_until_ready()
    assert _platforms(resident) == {device.platform}
    assert device.memory_stats()["bytes_in_use"] - before >= store.nbytes
    far = dict(batch, image_index=batch["image_index"] + len(store) - 4)  # The same 4 images.
    start = (state["params"], state["opt_state"])
    _, _, near = train_step(*start, resident, batch, jax.random.key(0), np.int32(0))
    _, _, away = train_step(*start, resident, far, jax.random.key(0), np.int32(0))
    assert _platforms(near["loss_sum"]) == {device.platform}
    assert float(near["count"]) > 0 and float(away["loss_sum"]) == float(near["loss_sum"])


@pytest.mark.parametrize("decoder", ["merge", "merge_attention"])
def test_bfloat16_train_steps_track_float32(decoder):
    """The same start and batch trained 10 steps with bfloat16 matmuls and with float32: the
    losses agree to bfloat16's precision on the accelerator's own bfloat16 units."""
    losses = {}
    for dtype in ("float32", "bfloat16"):
        state, train_step, eval_step, features, batch = _setup(dtype=dtype, decoder=decoder)
        params, opt_state = state["params"], state["opt_state"]
        curve = []
        for step in range(10):
            params, opt_state, stats = train_step(
                params, opt_state, features, batch, jax.random.key(0), np.int32(step)
            )
            curve.append(float(stats["loss_sum"] / stats["count"]))
        assert _platforms(stats["loss_sum"]) <= {"gpu", "tpu"}
        losses[dtype] = curve
    np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=3e-2)
    assert losses["bfloat16"][-1] < losses["bfloat16"][0]
