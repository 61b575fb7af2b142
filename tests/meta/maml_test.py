"""MAML family: meta-gradients against finite differences and hand-derived formulas, ANIL and
LoRA partitions leave the rest untouched, Meta-SGD and Reptile against plain numpy references,
and task-shape errors that name the array."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import flatten_util

from ftlab import meta
from ftlab.core import partition, train
from ftlab.data import sinusoid
from ftlab.peft import lora

LR = 0.1


def _mlp(params, x):  # a smooth net, so second-order terms are not zero: [n, 1] -> [n, 1]
    h = jnp.tanh(x @ params["body"]["w"] + params["body"]["b"][None])
    return h @ params["head"]["w"] + params["head"]["b"][None]


def _mse(params, batch):
    return jnp.mean((_mlp(params, batch["x"]) - batch["y"]) ** 2)


def _mse_loss(params, batch, rng):  # the loss signature of every ftlab step
    del rng
    return _mse(params, batch), {}


def _params(dtype=np.float32, width=3):
    rng = np.random.default_rng(0)
    shapes = {"body": {"w": (1, width), "b": (width,)}, "head": {"w": (width, 1), "b": (1,)}}
    return jax.tree.map(
        lambda s: rng.normal(scale=0.8, size=s).astype(dtype),
        shapes,
        is_leaf=lambda s: isinstance(s, tuple),
    )


def _tasks(num_tasks=2, shots=4, dtype=np.float32):
    t = sinusoid.sample(7, 0, num_tasks=num_tasks, shots=shots, query_shots=shots)
    return jax.tree.map(lambda a: a.astype(dtype), {"support": t["support"], "query": t["query"]})


def _loss_kwargs(**kw):
    return dict(loss_fn=_mse_loss, inner_lr=LR, **kw)


# -- MAML and FOMAML meta-gradients ---------------------------------------------------------------
def test_meta_gradient_matches_finite_differences_and_remat_changes_nothing():
    with jax.enable_x64(True):
        params, tasks = _params(np.float64), _tasks(dtype=np.float64)

        @jax.jit
        def loss_and_grads(p):
            f = lambda t, remat: meta.meta_loss(  # noqa: E731
                t, {}, tasks, num_steps=2, remat=remat, **_loss_kwargs()
            )
            grads = jax.grad(f)(p, False)
            grads_remat = jax.grad(f)(p, True)
            return f(p, False), grads, grads_remat

        _, grads, grads_remat = loss_and_grads(params)
        chex.assert_trees_all_close(grads, grads_remat, rtol=1e-12)
        flat, unravel = flatten_util.ravel_pytree(params)
        g = flatten_util.ravel_pytree(grads)[0]
        eps = 1e-6
        for seed in range(3):
            d = np.random.default_rng(seed).normal(size=flat.shape)
            plus = loss_and_grads(unravel(flat + eps * d))[0]
            minus = loss_and_grads(unravel(flat - eps * d))[0]
            np.testing.assert_allclose((plus - minus) / (2 * eps), g @ d, rtol=1e-6)


@pytest.fixture(scope="module")
def one_step_grads():
    """MAML and FOMAML meta-gradients (1 inner step) and the pieces of the chain rule."""
    with jax.enable_x64(True):
        params, tasks = _params(np.float64), _tasks(dtype=np.float64)
        flat, unravel = flatten_util.ravel_pytree(params)

        @jax.jit
        def compute(flat):
            params = unravel(flat)

            def grads(first_order):
                g = jax.grad(meta.meta_loss)(
                    params,
                    {},
                    tasks,
                    num_steps=1,
                    **_loss_kwargs(first_order=first_order),
                )
                return flatten_util.ravel_pytree(g)[0]

            # Hand-derived, per task: adapted = theta - a g_s(theta); MAML's gradient is
            # (I - a H_s(theta)) g_q(adapted), FOMAML's drops the Hessian term: g_q(adapted).
            expect_maml, expect_fomaml = 0.0, 0.0
            for i in range(2):
                s = jax.tree.map(lambda a, i=i: a[i], tasks["support"])
                q = jax.tree.map(lambda a, i=i: a[i], tasks["query"])
                ls = lambda f, s=s: _mse(unravel(f), s)  # noqa: E731
                adapted = flat - LR * jax.grad(ls)(flat)
                g_q = jax.grad(lambda f, q=q: _mse(unravel(f), q))(adapted)
                hess = jax.hessian(ls)(flat)
                expect_maml += (jnp.eye(len(flat)) - LR * hess) @ g_q / 2
                expect_fomaml += g_q / 2
            return grads(False), grads(True), expect_maml, expect_fomaml

        return tuple(np.asarray(a) for a in compute(flat))


def test_maml_is_the_hand_derived_second_order_gradient(one_step_grads):
    maml_g, _, expect_maml, _ = one_step_grads
    np.testing.assert_allclose(maml_g, expect_maml, rtol=1e-10, atol=1e-12)


def test_fomaml_is_maml_without_the_second_order_term(one_step_grads):
    maml_g, fomaml_g, _, expect_fomaml = one_step_grads
    np.testing.assert_allclose(fomaml_g, expect_fomaml, rtol=1e-10, atol=1e-12)
    # The Hessian term is not negligible here, so the two gradients really differ.
    assert np.linalg.norm(maml_g - fomaml_g) > 1e-3 * np.linalg.norm(maml_g)


# -- ANIL ---------------------------------------------------------------------------------------
def test_anil_adapts_only_the_head_and_meta_trains_the_body():
    params, tasks = _params(), _tasks()
    support = jax.tree.map(lambda a: a[0], tasks["support"])

    @jax.jit
    def compute(params):
        adapted = meta.adapt(
            params, support, num_steps=3, rules=meta.head_rules(), **_loss_kwargs()
        )
        g = jax.grad(meta.meta_loss)(
            params, {}, tasks, num_steps=1, rules=meta.head_rules(), **_loss_kwargs()
        )
        return adapted, g

    adapted, grads = compute(params)
    # The body passes through the inner loop untouched: not even a float round trip.
    for name in ("body/w", "body/b"):
        np.testing.assert_array_equal(
            partition.flatten(adapted)[name], partition.flatten(params)[name]
        )
    assert not np.allclose(adapted["head"]["w"], params["head"]["w"])
    # The outer gradient still reaches the body (through the adapted head), as in Raghu et al.
    assert np.linalg.norm(grads["body"]["w"]) > 0


# -- MAML over LoRA factors ---------------------------------------------------------------------
class _Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(16, name="hidden_0")(x))
        x = nn.relu(nn.Dense(16, name="hidden_1")(x))
        return nn.Dense(1, name="head")(x)


def test_maml_over_lora_factors_learns_and_keeps_frozen_leaves_bit_identical():
    model = _Net()
    base = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 1)))["params"]
    params = jax.tree.map(
        np.asarray,
        lora.init(base, jax.random.key(1), targets=["hidden_.", "head"], rank=1, alpha=1.0),
    )
    apply = lora.wrap_apply(lambda p, x: model.apply({"params": p}, x), alpha=1.0, rank=1)

    def loss_fn(p, batch, rng):
        del rng
        return jnp.mean((apply(p, batch["x"]) - batch["y"]) ** 2), {}

    label_tree = partition.labels(params, lora.rules())
    inner = ((".*/lora_(a|b)", meta.ADAPT), (".*", partition.FROZEN))
    tx = optax.adam(1e-2)
    state = train.init_state(params, label_tree, tx, seed=0)
    # Optimizer state exists for the LoRA factors only.
    mu = partition.flatten(state.opt_state[0].mu)
    assert sorted(mu) == sorted(partition.flatten(state.trainable))
    assert all(k.endswith(("lora_a", "lora_b")) for k in mu)
    kw = dict(loss_fn=loss_fn, inner_lr=0.01, num_steps=2, rules=inner)
    step = jax.jit(meta.make_meta_step(tx=tx, **kw))
    held_out = _tasks(num_tasks=50, shots=10)
    evaluate = jax.jit(lambda s: meta.meta_loss(s.trainable, s.frozen, held_out, **kw))
    before = float(evaluate(state))
    for i in range(30):
        t = sinusoid.sample(1, i, num_tasks=8, shots=10, query_shots=10)
        state, _ = step(state, {"support": t["support"], "query": t["query"]})
    after = float(evaluate(state))
    assert after < 0.8 * before, (before, after)
    final = partition.flatten(state.params)
    for name, leaf in partition.flatten(params).items():
        if not name.endswith(("lora_a", "lora_b")):
            np.testing.assert_array_equal(final[name], leaf, err_msg=name)
        else:
            assert not np.array_equal(final[name], leaf), name


def test_compiler_options_change_speed_not_numbers():
    """A meta-step compiled with `meta.compiler_options()` agrees with XLA's default compile."""
    options = meta.compiler_options()
    assert set(options) <= {"xla_cpu_experimental_ynn_fusion_type"}
    assert meta.compiler_options("gpu") == {}
    params = _params(width=40)
    tx = optax.adam(1e-2)
    state = train.init_state(params, partition.labels(params, ((".*", "train"),)), tx, seed=0)
    step = meta.make_meta_step(tx=tx, num_steps=2, **_loss_kwargs())
    tasks = _tasks(num_tasks=5, shots=10)
    results = []
    for opts in (options, None):
        compiled = jax.jit(step, compiler_options=opts).lower(state, tasks).compile()
        s = state
        for _ in range(3):
            s, metrics = compiled(s, tasks)
        results.append((s.params, metrics["train/loss"]))
    chex.assert_trees_all_close(results[0], results[1], rtol=1e-5, atol=1e-6)


# -- Meta-SGD and Reptile against numpy references (linear regression, hand gradients) -----------
def _linear_tasks(num_tasks=3, shots=4, dim=3):
    rng = np.random.default_rng(3)
    mk = lambda: {  # noqa: E731
        "x": rng.normal(size=(num_tasks, shots, dim)).astype(np.float32),
        "y": rng.normal(size=(num_tasks, shots)).astype(np.float32),
    }
    return {"support": mk(), "query": mk()}


def _linear_loss(params, batch, rng):
    del rng
    return jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2), {}


def _np_grad(w, x, y):
    return 2.0 / len(y) * x.T @ (x @ w - y)


def test_metasgd_step_matches_numpy_reference():
    tasks = _linear_tasks()
    w = np.array([0.3, -0.2, 0.5], np.float32)
    alpha = np.array([0.05, 0.1, 0.02], np.float32)
    beta = 0.1
    tx = optax.sgd(beta)
    # The learned rates are leaves of the tree, trained like the weights.
    params = {"w": w, "inner_lr": {"w": alpha}}
    state = train.init_state(params, {"w": "train", "inner_lr": {"w": "train"}}, tx, seed=0)
    step = meta.make_meta_step(_linear_loss, tx, inner_lr=None, num_steps=1)
    new, metrics = jax.jit(step)(state, tasks)

    dw, dalpha, losses = 0.0, 0.0, []
    for t in range(3):
        xs, ys = tasks["support"]["x"][t].astype(np.float64), tasks["support"]["y"][t]
        xq, yq = tasks["query"]["x"][t].astype(np.float64), tasks["query"]["y"][t]
        g_s = _np_grad(w, xs, ys)
        w1 = w - alpha * g_s
        g_q = _np_grad(w1, xq, yq)
        hess = 2.0 / len(ys) * xs.T @ xs
        dw += (np.eye(3) - hess @ np.diag(alpha)) @ g_q / 3
        dalpha += -g_s * g_q / 3
        losses.append(np.mean((xq @ w1 - yq) ** 2))
    np.testing.assert_allclose(new.trainable["w"], w - beta * dw, rtol=1e-5, atol=1e-6)
    lr = meta.split_inner_lr(new.params)[1]["w"]
    np.testing.assert_allclose(lr, alpha - beta * dalpha, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["train/loss"], np.mean(losses), rtol=1e-5)


def test_reptile_step_matches_numpy_reference():
    tasks = _linear_tasks()
    w = np.array([0.3, -0.2, 0.5], np.float32)
    inner_lr, eps, k = 0.05, 0.5, 3
    tx = optax.sgd(eps)
    state = train.init_state({"w": w}, {"w": "train"}, tx, seed=0)
    step = meta.make_reptile_step(_linear_loss, tx, inner_lr=inner_lr, num_steps=k)
    new, _ = jax.jit(step)(state, tasks)

    phis = []
    for t in range(3):
        xs, ys = tasks["support"]["x"][t].astype(np.float64), tasks["support"]["y"][t]
        phi = w.astype(np.float64)
        for _ in range(k):
            phi = phi - inner_lr * _np_grad(phi, xs, ys)
        phis.append(phi)
    expected = w + eps * (np.mean(phis, axis=0) - w)
    np.testing.assert_allclose(new.trainable["w"], expected, rtol=1e-5, atol=1e-6)


# -- errors -------------------------------------------------------------------------------------
def test_bad_task_shapes_name_the_array_and_the_expected_shape():
    tasks = _linear_tasks()
    state = train.init_state({"w": np.zeros(3, np.float32)}, {"w": "train"}, optax.sgd(1.0), seed=0)
    step = meta.make_meta_step(_linear_loss, optax.sgd(1.0), inner_lr=0.1, num_steps=1)

    bad = {
        "support": dict(tasks["support"], y=tasks["support"]["y"][:, :3]),
        "query": tasks["query"],
    }
    with pytest.raises(
        ValueError, match=r"tasks\['support'\]\['y'\] has shape \(3, 3\); expected \[3, 4, \.\.\.\]"
    ):
        step(state, bad)
    bad = {"support": tasks["support"], "query": jax.tree.map(lambda a: a[:2], tasks["query"])}
    with pytest.raises(
        ValueError, match=r"tasks\['query'\]\['x'\] has shape \(2, 4, 3\); expected \[tasks=3"
    ):
        step(state, bad)
    with pytest.raises(ValueError, match=r"tasks has no 'query' batch"):
        step(state, {"support": tasks["support"]})
    with pytest.raises(
        ValueError, match=r"tasks\['support'\]\['y'\] has shape \(3,\); expected \[tasks, shots"
    ):
        step(state, {"support": dict(tasks["support"], y=np.zeros(3)), "query": tasks["query"]})
    one = {"x": np.zeros((4, 3), np.float32), "y": np.zeros(5, np.float32)}
    with pytest.raises(
        ValueError, match=r"support\['y'\] has shape \(5,\); expected \[4, \.\.\.\]"
    ):
        meta.adapt({"w": np.zeros(3)}, one, loss_fn=_linear_loss, inner_lr=0.1, num_steps=1)
    with pytest.raises(ValueError, match=r"inner_lr\['w'\] has shape \(2,\); expected \(3,\)"):
        meta.adapt(
            {"w": np.zeros(3)},
            dict(one, y=np.zeros(4)),
            loss_fn=_linear_loss,
            inner_lr={"w": np.zeros(2)},
            num_steps=1,
        )


# -- one loss signature -------------------------------------------------------------------------
def test_a_train_style_loss_drives_the_meta_step_and_reports_its_metrics():
    """The loss `train.make_train_step` takes, with an rng and aux metrics, works unchanged."""
    seen = []

    def loss_fn(params, batch, rng):
        seen.append(rng)
        noise = 0.0 * jax.random.normal(rng, ())  # uses the key: it must be a real key
        err = _mlp(params, batch["x"]) - batch["y"]
        return jnp.mean(err**2) + noise, {"mae": jnp.mean(jnp.abs(err))}

    params, tasks = _params(), _tasks()
    tx = optax.sgd(0.1)
    state = train.init_state(params, partition.labels(params, [(".*", "train")]), tx, seed=0)
    new, metrics = jax.jit(meta.make_meta_step(loss_fn, tx, inner_lr=LR, num_steps=2))(state, tasks)
    assert set(metrics) == {"train/loss", "train/grad_norm", "train/mae"}
    assert 0 < float(metrics["train/mae"]) < float(metrics["train/loss"]) ** 0.5 + 1
    assert int(new.step) == 1 and seen
    # The same loss trains the same state with the plain train step.
    joint = {k: jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), tasks[k]) for k in tasks}
    _, m = jax.jit(train.make_train_step(loss_fn, tx))(state, joint["support"])
    assert set(m) == {"train/loss", "train/grad_norm", "train/mae"}


def test_inner_lr_given_twice_or_never_is_an_error():
    w = np.array([0.3, -0.2, 0.5], np.float32)
    tx = optax.sgd(0.1)
    learned = {"w": w, "inner_lr": {"w": np.full(3, 0.1, np.float32)}}
    state = train.init_state(learned, jax.tree.map(lambda _: "train", learned), tx, seed=0)
    with pytest.raises(ValueError, match=r"inner_lr=0.1, but the parameters hold learned rates"):
        meta.make_meta_step(_linear_loss, tx, inner_lr=0.1, num_steps=1)(state, _linear_tasks())
    plain = train.init_state({"w": w}, {"w": "train"}, tx, seed=0)
    with pytest.raises(ValueError, match=r"inner_lr=None and the parameters hold no learned"):
        meta.make_meta_step(_linear_loss, tx, inner_lr=None, num_steps=1)(plain, _linear_tasks())
    with pytest.raises(ValueError, match=r"Reptile does not learn inner learning rates"):
        meta.make_reptile_step(_linear_loss, tx, inner_lr=0.1, num_steps=1)(state, _linear_tasks())
    with pytest.raises(ValueError, match=r"adapt: params holds learned rates under 'inner_lr'"):
        meta.adapt(
            learned, _linear_tasks()["support"], loss_fn=_linear_loss, inner_lr=0.1, num_steps=1
        )
    stats = train.init_state({"w": w}, {"w": "train"}, tx, seed=0, collections={"s": {"m": w}})
    with pytest.raises(ValueError, match=r"make_meta_step: the state holds collections \['s'\]"):
        meta.make_meta_step(_linear_loss, tx, inner_lr=0.1, num_steps=1)(stats, _linear_tasks())
