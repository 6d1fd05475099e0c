"""Data parallelism: 8 (simulated CPU) devices give the same training as 1 for the same batch,
in cross-entropy and in SCST."""

import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent(
    """
    import jax, numpy as np
    from flax import nnx
    from captioning import models
    from captioning import parallel
    from captioning.data import text
    from captioning.training import train
    from configs import test as test_config

    assert len(jax.devices()) == 8, jax.devices()
    config = test_config.get_config()
    config.model.decoder = "merge"  # On pooled [10] features.
    config.model.feed_dim = 0
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, 13, (16, 7)).astype(np.int32)
    tokens[:, 0] = text.START_ID
    tokens[:, -1] = text.END_ID
    batch = {"image_index": np.arange(16, dtype=np.int32) % 5,
             "inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    features_np = rng.normal(size=(5, 10)).astype(np.float32)

    def run(devices):
        mesh = parallel.make_mesh(devices)
        model = models.create_model(config.model, 13, (10,), rngs=nnx.Rngs(0))
        graphdef, state, tx, _ = train.init_train_state(config, model, total_steps=10)
        step_fn, _ = train.make_steps(graphdef, tx, config.model)
        step_fn = jax.jit(step_fn)
        params = parallel.replicate(state["params"], mesh)
        opt_state = parallel.replicate(state["opt_state"], mesh)
        features = parallel.replicate(features_np, mesh)
        losses = []
        for step in range(3):
            sharded = parallel.shard_batch(batch, mesh)
            params, opt_state, stats = step_fn(params, opt_state, features, sharded,
                                               jax.random.key(0), step)
            losses.append(float(stats["loss_sum"] / stats["count"]))
        assert len(sharded["inputs"].sharding.device_set) == len(devices)
        return losses, jax.tree.leaves(params)

    one_losses, one_params = run(jax.devices()[:1])
    all_losses, all_params = run(jax.devices())
    np.testing.assert_allclose(all_losses, one_losses, rtol=1e-5)
    for a, b in zip(one_params, all_params):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    try:
        parallel.check_batch_size(12, parallel.make_mesh(), "config.train.batch_size")
    except ValueError as e:
        assert "config.train.batch_size=12" in str(e)
    else:
        raise AssertionError("batch 12 on 8 devices must be refused")
    print("SAME", one_losses, all_losses)
    """
)


def _run_on_eight_devices(script: str) -> subprocess.CompletedProcess:
    """Runs `script` in a process that sees 8 simulated CPU devices."""
    env = dict(
        os.environ,
        XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=REPO,
    )
    return subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_eight_devices_train_like_one():
    result = _run_on_eight_devices(SCRIPT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SAME" in result.stdout


SCST_SCRIPT = textwrap.dedent(
    """
    import types
    import jax, numpy as np, optax
    from flax import nnx
    from captioning import models, parallel
    from captioning.data import text
    from captioning.training import scst
    from configs import test as test_config

    assert len(jax.devices()) == 8, jax.devices()
    config = test_config.get_config()
    config.model.decoder = "merge"  # On pooled [10] features.
    config.model.feed_dim = 0
    config.scst.batch_size = 8
    config.scst.num_samples = 2
    vocab = text.Vocabulary(["red", "blue", "circle", "square", "left", "of", "a", "the"])
    features = np.random.default_rng(0).normal(size=(20, 10)).astype(np.float32)
    data = types.SimpleNamespace(
        features=features, vocab=vocab, stats=None, rows=lambda split: np.arange(20)
    )

    def reward_fn(texts, rows):  # Distinct words, and a little for length: deterministic.
        return np.array([len(set(t.split())) + 0.1 * len(t) for t in texts], np.float64)

    def run(devices):
        mesh = parallel.make_mesh(devices)
        model = models.create_model(config.model, len(vocab), (10,), rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(model)
        tx = optax.adam(1e-2)
        phase = scst.ScstPhase(config, data, graphdef, tx, reward_fn, None, mesh=mesh)
        params, opt_state = phase.place(params), phase.place(tx.init(params))
        rewards, losses = [], []
        for step, batch in enumerate(phase.batches(0)):  # 3 steps, the last one padded.
            params, opt_state, stats = phase.step(params, opt_state, batch, step)
            rewards.append(stats["reward"])
            losses.append(float(stats["loss"]))
        assert len(params["out_proj"]["kernel"].sharding.device_set) == len(devices)
        return rewards, losses, jax.tree.leaves(params)

    one = run(jax.devices()[:1])
    eight = run(jax.devices())
    assert one[0] == eight[0], (one[0], eight[0])  # The same samples, the same rewards.
    np.testing.assert_allclose(eight[1], one[1], rtol=1e-4, atol=1e-6)
    for a, b in zip(one[2], eight[2]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    assert len(set(one[0])) > 1  # The steps saw different samples.
    print("SAME", one[0], eight[0])
    """
)


def test_scst_on_eight_devices_trains_like_one():
    result = _run_on_eight_devices(SCST_SCRIPT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SAME" in result.stdout
