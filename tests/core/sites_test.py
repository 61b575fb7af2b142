"""The consumption check behind 'nothing silent': every method leaf must be read by something."""

import jax.numpy as jnp
import pytest

from ftlab.core import sites


def _tree():
    return {
        "encoder": {
            "layer_0": {
                "query": {
                    "kernel": jnp.ones((2, 2)),
                    "lora_a": jnp.ones((2, 1)),
                    "lora_b": jnp.zeros((1, 2)),
                },
                "attention_adapter": {"down": {"kernel": jnp.ones((2, 1))}},
            }
        },
        "head": {"kernel": jnp.ones((2, 1))},
    }


def test_unconsumed_leaves_are_named_and_consumed_ones_pass():
    with pytest.raises(sites.UnconsumedLeavesError, match="apply: 2 .*lora_a") as e:
        with sites.tracking(_tree(), what="apply"):
            sites.consume("encoder/layer_0/query", "lora_b")
    assert set(e.value.leaves) == {
        "encoder/layer_0/query/lora_a",
        "encoder/layer_0/attention_adapter/down/kernel",
    }
    with sites.tracking(_tree(), what="apply"):
        sites.consume("encoder/layer_0/query", "lora_a", "lora_b")
        sites.consume("encoder/layer_0/attention_adapter")  # a whole subtree


def test_paths_match_by_suffix_so_wrapped_variables_count():
    # The model sees the tree as its root; the caller passed {"params": tree}.
    with sites.tracking({"params": _tree()}, what="apply"):
        sites.consume(("encoder", "layer_0", "query"), "lora_a", "lora_b")
        sites.consume("encoder/layer_0", "attention_adapter")


def test_nested_contexts_each_check_their_own_tree_and_share_consumption():
    inner = {"query": {"lora_a": jnp.ones(1), "lora_b": jnp.ones(1)}}
    with sites.tracking({"x": {"prompt": jnp.ones(1)}}, what="outer"):
        with sites.tracking(inner, what="inner"):
            sites.consume("query", "lora_a", "lora_b")
            sites.consume("x", "prompt")
    assert not sites.is_tracking()


def test_an_error_inside_the_application_is_not_masked():
    with pytest.raises(KeyError):
        with sites.tracking(_tree(), what="apply"):
            raise KeyError("boom")
    assert not sites.is_tracking()


def test_register_adds_a_users_method_and_refuses_a_taken_name():
    sites.register(["my_gate_test"], "gating")
    with pytest.raises(sites.UnconsumedLeavesError, match="gating"):
        with sites.tracking({"a": {"my_gate_test": jnp.ones(1)}}, what="apply"):
            pass
    with pytest.raises(ValueError, match="already belongs to LoRA"):
        sites.register(["lora_a"], "mine")
    del sites.METHOD_NAMES["my_gate_test"]


def test_consume_outside_tracking_is_a_no_op():
    sites.consume("a", "lora_a")
    assert not sites.is_tracking()
