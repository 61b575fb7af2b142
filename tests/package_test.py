"""The top-level names of the design (`ftlab.lora.init`, `ftlab.partition.split`,
`ftlab.maml.adapt`, `ftlab.online.run`) work as a researcher would type them."""

import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ftlab


def _params():
    k = jax.random.split(jax.random.PRNGKey(0), 2)
    return {
        "encoder": {"layer_0": {"query": {"kernel": jax.random.normal(k[0], (4, 4))}}},
        "head": {"kernel": jax.random.normal(k[1], (4,)), "bias": jnp.zeros(())},
    }


def test_the_design_calls_compose_on_a_toy_regression():
    params = ftlab.lora.init(
        _params(), jax.random.PRNGKey(1), targets=[r"encoder/.*/query"], rank=2, alpha=4
    )
    rules = [(".*/lora_[ab]", "train"), ("head/.*", "train"), (".*", "frozen")]
    trainable, frozen = ftlab.partition.split(params, ftlab.partition.labels(params, rules))
    assert sorted(ftlab.partition.flatten(frozen)) == ["encoder/layer_0/query/kernel"]
    assert "encoder/layer_0/query/lora_a" in ftlab.partition.flatten(trainable)

    def loss_fn(p, batch, rng):  # the loss signature of every ftlab step
        del rng
        q = p["encoder"]["layer_0"]["query"]
        w = q["kernel"] + q["lora_a"] @ q["lora_b"]
        pred = jnp.tanh(batch["x"] @ w) @ p["head"]["kernel"] + p["head"]["bias"]
        return jnp.mean((pred - batch["y"]) ** 2), {}

    x = jax.random.normal(jax.random.PRNGKey(2), (8, 4))
    support = {"x": x, "y": jnp.sin(x[:, 0])}
    adapted = ftlab.maml.adapt(
        params, support, loss_fn=loss_fn, inner_lr=0.1, num_steps=3, rules=rules
    )
    assert loss_fn(adapted, support, None)[0] < loss_fn(params, support, None)[0]
    # the frozen kernel is passed through untouched
    chex.assert_trees_all_equal(
        adapted["encoder"]["layer_0"]["query"]["kernel"],
        params["encoder"]["layer_0"]["query"]["kernel"],
    )

    model = ftlab.online.logistic_regression(2)
    stream = ftlab.online.prepare(np.array([[1.0, 0.0], [0.0, 1.0]] * 4), np.array([1, 0] * 4))
    result = ftlab.online.run(model, model.init(), stream, learner=ftlab.online.ogd(0.5))
    assert result.metrics["loss"].shape == (8,)
    assert result.metrics["loss"][-1] < result.metrics["loss"][0]


def test_short_names_are_the_modules_where_the_code_lives():
    from ftlab.core import partition
    from ftlab.meta import maml
    from ftlab.peft import lora

    assert ftlab.lora is lora
    assert ftlab.partition is partition
    assert ftlab.maml is maml
    assert set(ftlab.__all__) <= set(dir(ftlab))


def test_an_unknown_name_lists_the_modules():
    with pytest.raises(AttributeError, match="modules: .*lora"):
        ftlab.lorra  # noqa: B018


def test_import_ftlab_loads_no_method_module():
    code = "import sys, ftlab; print(sorted(m for m in sys.modules if m.startswith('ftlab.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
