"""Partition rules: labels, split/merge, optimizer masks, and errors that name the leaf."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ftlab.core import partition


def _params():
    return {
        "encoder": {
            "layer_0": {"dense": {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros((4,))}},
            "layer_1": {"dense": {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros((4,))}},
        },
        "head": {"kernel": jnp.ones((4, 2)), "bias": jnp.zeros((2,))},
    }


BITFIT = [("head/.*", "train"), (".*/bias", "train"), (".*", "frozen")]


def test_flatten_names_leaves_by_slash_path():
    assert list(partition.flatten(_params())) == [
        "encoder/layer_0/dense/bias",
        "encoder/layer_0/dense/kernel",
        "encoder/layer_1/dense/bias",
        "encoder/layer_1/dense/kernel",
        "head/bias",
        "head/kernel",
    ]


def test_first_matching_rule_wins():
    labels = partition.flatten(partition.labels(_params(), BITFIT))
    assert labels["head/kernel"] == "train"
    assert labels["encoder/layer_0/dense/bias"] == "train"
    assert labels["encoder/layer_0/dense/kernel"] == "frozen"


def test_split_then_merge_restores_the_tree():
    params = _params()
    trainable, frozen = partition.split(params, partition.labels(params, BITFIT))
    assert set(partition.flatten(trainable)) == {
        "encoder/layer_0/dense/bias",
        "encoder/layer_1/dense/bias",
        "head/bias",
        "head/kernel",
    }
    chex.assert_trees_all_equal(partition.merge(trainable, frozen), params)


def test_rule_matching_nothing_is_an_error_naming_it():
    with pytest.raises(ValueError, match=r"'encodr/\.\*' matched no leaf.*encoder, head"):
        partition.labels(_params(), [("encodr/.*", "train"), (".*", "frozen")])


def test_uncovered_leaf_is_an_error_naming_it():
    with pytest.raises(ValueError, match="encoder/layer_0/dense/bias"):
        partition.labels(_params(), [("head/.*", "train")])


def test_bad_regex_names_the_rule_index():
    with pytest.raises(ValueError, match=r"rules\[0\]: invalid regex"):
        partition.labels(_params(), [("head/(", "train"), (".*", "frozen")])


def test_optimizer_state_holds_only_trainable_leaves():
    params = _params()
    labels = partition.labels(params, BITFIT)
    trainable, _ = partition.split(params, labels)
    tx = partition.optimizer({"train": optax.adam(1e-3)}, labels)
    state = tx.init(trainable)
    sizes = sum(x.size for x in jax.tree.leaves(state))
    # adam keeps mu and nu for each trainable leaf (+ a count): nothing for frozen kernels.
    assert sizes == 2 * partition.count(trainable) + 1


def test_per_group_learning_rates_via_labels():
    params = _params()
    rules = [("head/.*", "head"), (".*/bias", "bias"), (".*", "frozen")]
    labels = partition.labels(params, rules)
    trainable, _ = partition.split(params, labels)
    tx = partition.optimizer({"head": optax.sgd(1.0), "bias": optax.sgd(0.0)}, labels)
    grads = jax.tree.map(jnp.ones_like, trainable)
    updates, _ = tx.update(grads, tx.init(trainable), trainable)
    np.testing.assert_array_equal(updates["head"]["kernel"], -np.ones((4, 2)))
    np.testing.assert_array_equal(updates["encoder"]["layer_0"]["dense"]["bias"], np.zeros(4))


def test_optimizer_missing_for_label_is_an_error():
    labels = partition.labels(_params(), [("head/.*", "head"), (".*", "frozen")])
    with pytest.raises(ValueError, match=r"no optimizer for partition label\(s\) \['head'\]"):
        partition.optimizer({"train": optax.sgd(1.0)}, labels)


def test_summary_counts_per_module():
    params = _params()
    text = partition.summary(params, partition.labels(params, BITFIT))
    assert "encoder" in text and "head" in text
    assert "trainable: 18 of 46 parameters" in text


def test_claims_reports_each_rule():
    claimed = partition.claims(_params(), BITFIT)
    assert claimed == [("head/.*", "train", 2), (".*/bias", "train", 2), (".*", "frozen", 2)]
