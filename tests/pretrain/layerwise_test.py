"""Greedy layer-wise pretraining: stages touch their own layer only, frozen layers carry no
optimizer state, and the autoencoders (or temporary heads) learn."""

import chex
import jax
import numpy as np
import optax
import pytest

from ftlab.core import partition, train
from ftlab.pretrain import layerwise

FEATURES = (6, 5)
TX = optax.adam(1e-2)
STEPS = 150


def _data():
    rng = np.random.default_rng(0)
    # Rank-2 non-negative 4x4 "images": an autoencoder with 6 units can reconstruct them.
    u, v = rng.uniform(size=(64, 2)), rng.uniform(size=(2, 16))
    images = (u @ v / 2).reshape(64, 4, 4).astype(np.float32)
    return {"image": images, "label": np.argmax(u @ [[1, -1, 0], [0, 1, -1]], -1).astype(np.int32)}


DATA = _data()


def _pretrain(params, stages, *, supervised=False):
    """Each stage from a fresh optimizer state on its rules' leaves, as the trainer runs them."""
    history, rng = [], np.random.default_rng(0)
    for k in stages:
        label_tree = partition.labels(params, layerwise.stage_rules(k, supervised=supervised))
        state = train.init_state(params, label_tree, TX, seed=k)
        loss_fn = layerwise.make_stage_loss(k, supervised=supervised)
        step, metrics = jax.jit(train.make_train_step(loss_fn, TX)), []
        for _ in range(STEPS):
            idx = rng.choice(64, 16, replace=False)
            state, m = step(state, {name: v[idx] for name, v in DATA.items()})
            metrics.append(m)
        params = jax.device_get(state.params)
        history.append({n: np.stack([m[n] for m in jax.device_get(metrics)]) for n in metrics[0]})
    return params, history


@pytest.fixture(scope="module")
def staged():
    params = layerwise.init(jax.random.PRNGKey(0), input_dim=16, features=FEATURES)
    after_0, history_0 = _pretrain(params, [0])
    after_1, history_1 = _pretrain(after_0, [1])
    return params, after_0, after_1, history_0 + history_1


def _layer(params, part, k):
    return {
        n: v for n, v in partition.flatten(params).items() if n.startswith(f"{part}/layer_{k}/")
    }


def test_stage_rules_move_with_the_stage():
    params = layerwise.init(jax.random.PRNGKey(0), input_dim=16, features=FEATURES)
    for k in range(2):
        trainable, frozen = partition.split(
            params, partition.labels(params, layerwise.stage_rules(k))
        )
        assert sorted(partition.flatten(trainable)) == [
            f"{part}/layer_{k}/{leaf}"
            for part in ("decoder", "encoder")
            for leaf in ("bias", "kernel")
        ]
        assert len(partition.flatten(frozen)) == 2 * 2 * 2 - 4  # layers x parts x leaves
    supervised = layerwise.stage_rules(1, supervised=True)
    assert supervised[1] == ("stage_head/layer_1/.*", "train")


def test_each_stage_changes_its_layer_and_leaves_the_others_bit_identical(staged):
    params, after_0, after_1, _ = staged
    for part in ("encoder", "decoder"):
        # Stage 0 trains layer 0 only; stage 1 trains layer 1 only.
        assert not np.allclose(
            _layer(after_0, part, 0)[f"{part}/layer_0/kernel"],
            _layer(params, part, 0)[f"{part}/layer_0/kernel"],
        )
        chex.assert_trees_all_equal(_layer(after_0, part, 1), _layer(params, part, 1))
        chex.assert_trees_all_equal(_layer(after_1, part, 0), _layer(after_0, part, 0))
        assert not np.allclose(
            _layer(after_1, part, 1)[f"{part}/layer_1/kernel"],
            _layer(after_0, part, 1)[f"{part}/layer_1/kernel"],
        )


def test_frozen_layers_have_no_optimizer_state(staged):
    _, after_0, _, _ = staged
    label_tree = partition.labels(after_0, layerwise.stage_rules(1))
    state = train.init_state(after_0, label_tree, TX, seed=0)
    arrays = {n: v for n, v in partition.flatten(state.opt_state).items() if np.ndim(v) > 0}
    assert arrays and all("/layer_1/" in n for n in arrays), sorted(arrays)
    # Adam's mu and nu for the trainable leaves, plus a scalar count.
    assert partition.count(state.opt_state) == 2 * partition.count(state.trainable) + 1
    assert sorted(partition.flatten(state.frozen)) == sorted(
        n for n in partition.flatten(after_0) if "/layer_1/" not in n
    )


def test_autoencoder_reconstruction_loss_decreases(staged):
    *_, history = staged
    for stage in history:
        loss = stage["train/loss"]
        assert loss.shape == (STEPS,)
        assert loss[-10:].mean() < 0.3 * loss[:10].mean(), (loss[:10].mean(), loss[-10:].mean())


def test_supervised_variant_trains_each_layer_through_a_temporary_head():
    params = layerwise.init(jax.random.PRNGKey(1), input_dim=16, features=FEATURES, num_classes=3)
    assert sorted(params) == ["encoder", "stage_head"]
    trained, [history] = _pretrain(params, [0], supervised=True)
    assert history["train/loss"][-10:].mean() < 0.7 * history["train/loss"][:10].mean()
    assert history["train/accuracy"][-10:].mean() > history["train/accuracy"][:10].mean()
    chex.assert_trees_all_equal(_layer(trained, "encoder", 1), _layer(params, "encoder", 1))


def test_errors_name_what_to_fix():
    with pytest.raises(ValueError, match="at least 2 encoder layers"):
        layerwise.init(jax.random.PRNGKey(0), input_dim=16, features=(4,))
