"""Partition rules: labels, split/merge, optimizer masks, and errors that name the leaf."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import struct

from ftlab.core import partition


def _params():
    return {
        "encoder": {
            "layer_0": {"dense": {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros((4,))}},
            "layer_1": {"dense": {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros((4,))}},
        },
        "head": {"kernel": jnp.ones((4, 2)), "bias": jnp.zeros((2,))},
    }


FZ = partition.FROZEN
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


# --- any pytree, not only nested dicts --------------------------------------------------------


@struct.dataclass
class _Block:
    kernel: jax.Array
    bias: jax.Array
    name: str = struct.field(pytree_node=False, default="block")


class _Pair:
    """A custom pytree node registered without keys (its leaves are named 0, 1)."""

    def __init__(self, left, right):
        self.left, self.right = left, right


jax.tree_util.register_pytree_node(
    _Pair, lambda p: ((p.left, p.right), None), lambda _, kids: _Pair(*kids)
)


def _mixed():
    return {
        "layers": [
            _Block(jnp.ones((2, 2)), jnp.zeros((2,))),
            _Block(2 * jnp.ones((2, 2)), jnp.ones((2,))),
        ],
        "pair": _Pair(jnp.arange(3.0), (jnp.ones(()), jnp.zeros(()))),
        "head": {"kernel": jnp.ones((2, 1))},
    }


MIXED_RULES = [("layers/1/.*", "train"), (".*/bias", "train"), ("pair/1/0", "train"), (".*", FZ)]


def _structure(tree):
    return jax.tree_util.tree_structure(tree)


def test_split_and_merge_keep_lists_tuples_dataclasses_and_custom_nodes():
    params = _mixed()
    label_tree = partition.labels(params, MIXED_RULES)
    assert _structure(label_tree) == _structure(params)
    trainable, frozen = partition.split(params, label_tree)
    assert sorted(partition.flatten(trainable)) == [
        "layers/0/bias",
        "layers/1/bias",
        "layers/1/kernel",
        "pair/1/0",
    ]
    # Node types survive; a leaf of the other part is None below a non-dict node.
    assert isinstance(trainable["layers"], list) and isinstance(trainable["layers"][0], _Block)
    assert trainable["layers"][0].kernel is None and trainable["layers"][0].name == "block"
    assert isinstance(trainable["pair"], _Pair) and trainable["pair"].left is None
    assert "head" not in trainable  # dicts drop what belongs to the other part, as before
    merged = partition.merge(trainable, frozen)
    assert _structure(merged) == _structure(params)
    assert isinstance(merged["layers"], list) and isinstance(merged["pair"].right, tuple)
    chex.assert_trees_all_equal(merged, params)


def test_a_list_comes_back_as_a_list_not_a_dict_of_indices():
    params = [jnp.ones(2), jnp.zeros(3)]
    trainable, frozen = partition.split(params, ["train", "frozen"])
    assert trainable[1] is None and frozen[0] is None
    merged = partition.merge(trainable, frozen)
    assert isinstance(merged, list)
    chex.assert_trees_all_equal(merged, params)
    # all trainable: frozen keeps the list's shape, with nothing in it
    trainable, frozen = partition.split(params, ["train", "train"])
    assert frozen == [None, None]
    chex.assert_trees_all_equal(partition.merge(trainable, frozen), params)


def test_empty_subtrees_survive_the_round_trip():
    params = {"params": {"w": jnp.ones(2)}, "intermediates": {}, "extra": []}
    trainable, frozen = partition.split(params, partition.labels(params, [(".*", "train")]))
    assert trainable == {"params": {"w": params["params"]["w"]}}
    assert partition.merge(trainable, frozen) == params


def test_grad_jit_and_optax_work_on_a_trainable_part_with_placeholders():
    params = _mixed()
    label_tree = partition.labels(params, MIXED_RULES)
    trainable, frozen = partition.split(params, label_tree)
    tx = partition.optimizer({"train": optax.sgd(0.5)}, label_tree)
    opt_state = tx.init(trainable)

    def loss_fn(p):
        return sum(jnp.sum(x**2) for x in jax.tree.leaves(p))

    @jax.jit
    def step(trainable, opt_state):
        grads = jax.grad(lambda t: loss_fn(partition.merge(t, frozen)))(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state

    new, _ = step(trainable, opt_state)
    assert _structure(new) == _structure(trainable)
    # sgd(0.5) on x**2: x - 0.5 * 2x = 0 for every trainable leaf
    for leaf in jax.tree.leaves(new):
        np.testing.assert_array_equal(leaf, np.zeros_like(leaf))
    merged = partition.merge(new, frozen)
    chex.assert_trees_all_equal(merged["head"], params["head"])
    chex.assert_trees_all_equal(merged["layers"][0].kernel, params["layers"][0].kernel)


def test_per_group_optimizer_on_a_list_tree():
    params = [jnp.ones(2), jnp.ones(2), jnp.ones(2)]
    label_tree = partition.labels(params, [("0", "a"), ("1", "b"), (".*", "frozen")])
    trainable, _ = partition.split(params, label_tree)
    tx = partition.optimizer({"a": optax.sgd(1.0), "b": optax.sgd(0.0)}, label_tree)
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, trainable), tx.init(trainable))
    np.testing.assert_array_equal(updates[0], -np.ones(2))
    np.testing.assert_array_equal(updates[1], np.zeros(2))
    assert updates[2] is None


def test_nnx_state_round_trips():
    nnx = pytest.importorskip("flax.nnx")
    _, state = nnx.split(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
    label_tree = partition.labels(state, [("bias/.*", "train"), (".*", "frozen")])
    trainable, frozen = partition.split(state, label_tree)
    assert list(partition.flatten(trainable)) == ["bias/value"]
    merged = partition.merge(trainable, frozen)
    assert type(merged) is type(state) and _structure(merged) == _structure(state)
    chex.assert_trees_all_equal(merged, state)


def test_merge_names_the_path_of_a_conflict():
    with pytest.raises(ValueError, match=r"leaf a/0 appears in more than one tree"):
        partition.merge({"a": [1, None]}, {"a": [2, None]})
    with pytest.raises(ValueError, match=r"a is a list .* in one tree and a tuple"):
        partition.merge({"a": [1, None]}, {"a": (None, 2)})
    with pytest.raises(ValueError, match=r"b is both a leaf and a subtree"):
        partition.merge({"b": 1}, {"b": [2]})


def test_unflatten_like_rebuilds_the_structure():
    params = _mixed()
    flat = partition.flatten(params)
    chex.assert_trees_all_equal(partition.unflatten(flat, like=params), params)
    with pytest.raises(ValueError, match=r"only in like \['head/kernel'\]"):
        partition.unflatten({k: v for k, v in flat.items() if k != "head/kernel"}, like=params)


# --- labels that cannot take effect are errors ----------------------------------------------


@pytest.mark.parametrize("label", ["freeze", "Frozen", "frozen ", "fixed", "none", "None"])
def test_a_frozen_like_label_is_refused_naming_it(label):
    rules = [("head/.*", "train"), (".*/bias", "train"), (".*", label)]
    with pytest.raises(ValueError, match=rf"rules\[2\]: label '{label}' .*'frozen'"):
        partition.labels(_params(), rules)


def test_a_non_string_label_is_refused():
    with pytest.raises(ValueError, match=r"rules\[1\]: label None is not a string"):
        partition.labels(_params(), [("head/.*", "train"), (".*", None)])


def test_a_frozen_like_label_in_a_hand_made_label_tree_is_refused_by_split():
    params = {"w": jnp.ones(2), "b": jnp.ones(2)}
    with pytest.raises(ValueError, match=r"label_tree\['w'\]: label 'freeze'"):
        partition.split(params, {"w": "freeze", "b": "train"})


def test_errors_name_the_argument_or_what_the_caller_passes():
    with pytest.raises(ValueError, match=r"^rules: pattern 'x' matched no leaf"):
        partition.labels(_params(), [("x", "train"), (".*", "frozen")])
    with pytest.raises(ValueError, match=r"^config\.partition\.rules\[0\]: invalid regex"):
        partition.labels(_params(), [("(", "train")], what="config.partition.rules")


def test_a_key_with_a_slash_is_an_error_naming_it():
    params = {"encoder": {"layer/0": {"kernel": jnp.ones(2)}}, "head": jnp.ones(2)}
    with pytest.raises(ValueError, match=r"dict key 'layer/0' under 'encoder' contains '/'"):
        partition.labels(params, [(".*", "train")])


class _Twins:
    """A custom node whose two children carry the same key name."""

    def __init__(self, a, b):
        self.a, self.b = a, b


jax.tree_util.register_pytree_with_keys(
    _Twins,
    lambda t: (((jax.tree_util.GetAttrKey("w"), t.a), (jax.tree_util.DictKey("w"), t.b)), None),
    lambda _, kids: _Twins(*kids),
)


def test_two_leaves_with_one_name_are_an_error():
    with pytest.raises(ValueError, match=r"two leaves share the path name 'm/w'"):
        partition.labels({"m": _Twins(jnp.ones(1), jnp.ones(1))}, [(".*", "train")])


def test_a_label_tree_of_nested_dicts_fits_a_dataclass_by_name():
    # _Block lists kernel before bias; a nested dict lists bias first
    params = {"b": _Block(jnp.ones((2, 2)), jnp.zeros((2,)))}
    trainable, frozen = partition.split(params, {"b": {"kernel": "frozen", "bias": "train"}})
    assert trainable["b"].kernel is None and trainable["b"].bias is params["b"].bias
    assert frozen["b"].kernel is params["b"].kernel and frozen["b"].bias is None
