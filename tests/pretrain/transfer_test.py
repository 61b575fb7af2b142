"""Transfer: probing freezes the encoder bit for bit, and fine-tuning trains it."""

import chex
import jax
import numpy as np
import optax
import pytest

from ftlab.core import partition, train
from ftlab.pretrain import network, transfer

TX = optax.adam(1e-2)
STEPS, BATCH = 5, 8
RNG = jax.random.PRNGKey(7)


def _data():
    rng = np.random.default_rng(0)
    return {
        "image": rng.uniform(size=(24, 4, 4)).astype(np.float32),
        "label": rng.integers(0, 3, 24).astype(np.int32),
    }


DATA = _data()
ENCODER = network.init_mlp(jax.random.PRNGKey(0), input_dim=16, features=(6, 5))


def _state(mode):
    params = transfer.new_classifier(ENCODER, jax.random.PRNGKey(1), num_classes=3)
    return train.init_state(params, partition.labels(params, transfer.RULES[mode]), TX, seed=0)


@pytest.fixture(scope="module")
def step():
    return train.make_train_step(transfer.classifier_loss, TX)


def _fit(step, state):
    """STEPS steps on distinct rows drawn with fold_in(RNG, step), as the trainer draws them."""
    losses, jitted = [], jax.jit(step)
    for s in range(STEPS):
        idx = jax.random.choice(jax.random.fold_in(RNG, s), 24, (BATCH,), replace=False)
        state, m = jitted(state, {k: v[np.asarray(idx)] for k, v in DATA.items()})
        losses.append(m["train/loss"])
    return state, {"train/loss": np.asarray(losses)}


@pytest.fixture(scope="module")
def probed(step):
    start = _state("probe")
    end, metrics = _fit(step, start)
    return start, end, metrics


def test_new_classifier_has_encoder_and_fresh_head_only():
    pretext = {"encoder": ENCODER, "projector": {}}
    params = transfer.new_classifier(pretext["encoder"], jax.random.PRNGKey(1), num_classes=3)
    assert sorted(params) == ["encoder", "head"]
    assert params["head"]["kernel"].shape == (5, 3)
    chex.assert_trees_all_equal(params["encoder"], ENCODER)


def test_probe_keeps_the_encoder_bit_identical_without_optimizer_state(probed):
    start, end, metrics = probed
    chex.assert_trees_all_equal(end.frozen, {"encoder": ENCODER})
    assert sorted(end.trainable) == ["head"]
    assert not np.allclose(end.trainable["head"]["kernel"], start.trainable["head"]["kernel"])
    assert partition.count(end.opt_state) == 2 * (5 * 3 + 3) + 1
    assert metrics["train/loss"].shape == (STEPS,)


def test_finetune_trains_the_encoder(step):
    start = _state("finetune")
    assert start.frozen == {}
    end, _ = _fit(step, start)
    for name, leaf in partition.flatten(end.trainable).items():
        assert not np.allclose(leaf, partition.flatten(start.trainable)[name]), name
