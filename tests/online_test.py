"""ftlab.online: the scan equals a plain loop, delays shift updates, regret and its bound."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ftlab import online

T, D = 24, 3


def _logistic_stream(num, dim, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(num, dim)).astype(np.float32)
    w = rng.normal(size=dim)
    y = (x @ w + rng.logistic(size=num) > 0).astype(np.float32)
    return x, y


@pytest.fixture(scope="module")
def model():
    return online.logistic_regression(D)


@pytest.fixture(scope="module")
def run_sqrt(model):
    """OGD with eta_t = lr / sqrt(t) (lr traced), compiled once per stream shape."""
    run = jax.jit(
        lambda s, lr: online.run(model, model.init(), s, learner=online.ogd(lr, decay="sqrt"))
    )
    return lambda s, lr=0.5: run(s, jnp.float32(lr))


def _numpy_loop(task, x, y, valid=None, *, lr, decay="constant", adagrad=False, delay=0, batch=1):
    """The online protocol as a plain numpy loop on a linear model (closed-form gradients).

    Predict and suffer the loss on each example of a block, then update once with the mean
    gradient of the block whose labels arrived (the one `delay` blocks back). OGD, or optax's
    AdaGrad rule (accumulator starts at 0.1, eps 1e-7).
    """
    x, y = np.asarray(x, np.float64), np.asarray(y)
    valid = np.ones(len(y), bool) if valid is None else valid
    k = 3 if task == "multiclass" else None
    w = np.zeros((x.shape[1], k) if k else x.shape[1])
    b = np.zeros(k) if k else np.zeros(())
    accumulators = [np.full_like(w, 0.1), np.full_like(b, 0.1)]
    losses, update_index, pending, updates = np.zeros(len(y)), np.full(len(y), -1), [], 0

    def output_grad(i):
        z = x[i] @ w + b
        if task == "binary":
            return np.logaddexp(0.0, -(2 * y[i] - 1) * z), 1 / (1 + np.exp(-z)) - y[i]
        if task == "multiclass":
            p = np.exp(z - z.max())
            p /= p.sum()
            return -np.log(p[int(y[i])]), p - np.eye(k)[int(y[i])]
        return (z - y[i]) ** 2, 2 * (z - y[i])

    for start in range(0, len(y), batch):
        block = [i for i in range(start, min(start + batch, len(y)))]
        for i in block:
            losses[i] = output_grad(i)[0] if valid[i] else 0.0
        pending.append([i for i in block if valid[i]])
        arrived = pending.pop(0) if len(pending) > delay else []
        if not arrived:
            continue
        grads = [np.zeros_like(w), np.zeros_like(b)]
        for i in arrived:
            dz = output_grad(i)[1]
            grads[0] += np.multiply.outer(x[i], dz) / len(arrived)
            grads[1] += dz / len(arrived)
        updates += 1
        eta = lr / np.sqrt(updates) if decay == "sqrt" else lr
        if adagrad:
            for acc, g in zip(accumulators, grads, strict=True):
                acc += g**2
            grads = [g / np.sqrt(acc + 1e-7) for g, acc in zip(grads, accumulators, strict=True)]
        w, b = w - eta * grads[0], b - eta * grads[1]
        update_index[block[0]] = arrived[0]
    return {"w": w, "b": b}, losses, update_index


@pytest.mark.parametrize("case", ["ogd_sqrt", "adagrad_delay2_batch2"])
def test_scan_equals_python_loop(model, run_sqrt, case):
    if case == "ogd_sqrt":
        num = T
        x, y = _logistic_stream(num, D, seed=0)
        result = run_sqrt(online.prepare(x, y, model=model))
        params, losses, update_index = _numpy_loop("binary", x, y, lr=0.5, decay="sqrt")
    else:
        num = 11  # a ragged last minibatch
        x, y = _logistic_stream(num, D, seed=0)
        learner, delay, batch_size = optax.adagrad(0.3), 2, 2
        result = jax.jit(
            lambda s: online.run(
                model, model.init(), s, learner=learner, delay=delay, batch_size=batch_size
            )
        )(online.prepare(x, y, model=model))
        params, losses, update_index = _numpy_loop(
            "binary", x, y, lr=0.3, adagrad=True, delay=delay, batch=batch_size
        )
    np.testing.assert_allclose(result.metrics["loss"], losses, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(result.params, params, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(result.update_index, update_index)
    # The progressive log loss is the running mean of the losses suffered.
    np.testing.assert_allclose(
        result.metrics["log_loss"], np.cumsum(losses) / np.arange(1, num + 1), rtol=1e-5
    )


def test_progressive_accuracy_is_predict_then_learn(model, run_sqrt):
    x, y = _logistic_stream(T, D, seed=1)
    result = run_sqrt(online.prepare(x, y, model=model))
    # Replay: the prediction for x_t must come from the parameters before learning (x_t, y_t).
    p = np.asarray(result.metrics["prediction"])
    hits = (p > 0.5) == (y > 0.5)
    np.testing.assert_allclose(result.metrics["accuracy"], np.cumsum(hits) / np.arange(1, T + 1))
    assert p[0] == 0.5  # zero init: the first prediction is made before any update


def test_delay_shifts_updates_by_exactly_d():
    # A linear loss has a gradient that does not depend on the parameters, so a run with labels
    # d steps late must apply exactly the same updates, d steps later.
    d, dim = 3, 2
    model = online.custom_model(
        lambda p, x: x @ p["w"],
        task="regression",
        init=lambda: {"w": jnp.zeros(dim)},
        feature_shape=(dim,),
        loss=lambda out, y: -y * out,
    )
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(12, dim)), rng.normal(size=12)
    stream = online.prepare(x, y, model=model)
    delayed = jax.jit(
        lambda s: online.run(model, model.init(), s, learner=online.ogd(0.1), delay=d)
    )(stream)
    np.testing.assert_array_equal(delayed.update_index, np.r_[[-1] * d, np.arange(12 - d)])
    assert int(delayed.num_updates) == 12 - d
    # The loss suffered at step t is l_t(w_t), and w_t is the undelayed run's w_{t-d}.
    steps = 0.1 * y[:, None] * x  # -eta * gradient of -y <x, w>
    w_undelayed = np.concatenate([np.zeros((1, dim)), np.cumsum(steps, axis=0)])  # w_0..w_12
    w_delayed = np.concatenate([np.zeros((d, dim)), w_undelayed[: 12 - d]])
    np.testing.assert_allclose(
        delayed.metrics["loss"], -y * np.sum(x * w_delayed, axis=1), rtol=1e-5, atol=1e-6
    )
    # The last d labels arrive after the stream ends: the final parameters are w_{T-d}.
    np.testing.assert_allclose(delayed.params["w"], w_undelayed[12 - d], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def bounded_stream():
    """Synthetic logistic stream with ||(x, 1)|| <= G = sqrt(2): ||x|| <= 1 plus the intercept."""
    num, dim = 2000, 4
    x, y = _logistic_stream(num, dim, seed=4)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1.0)
    model = online.logistic_regression(dim)
    stream = online.prepare(x, y, model=model)
    steps = online.checkpoints(num, points=8, start=30)
    prefix = jax.jit(lambda s: online.best_fixed_prefixes(model, s, steps, tol=1e-5))(stream)
    u_star = jax.tree.map(lambda a: a[-1], prefix.params)
    radius = 1.5 * float(optax.tree_utils.tree_norm(u_star))
    # One compiled run serves both tests below: projected OGD, eta_t = lr / sqrt(t).
    run = jax.jit(
        lambda s, w0, lr: online.run(
            model, w0, s, learner=online.ogd(lr, decay="sqrt", radius=radius), comparator=u_star
        )
    )
    return model, stream, steps, prefix, u_star, radius, run


def test_best_fixed_against_itself_has_zero_regret(bounded_stream):
    """The comparator fed as the learner (start at u*, zero step) has regret exactly 0."""
    _, stream, steps, prefix, u_star, _, run = bounded_stream
    result = run(stream, u_star, 0.0)
    np.testing.assert_array_equal(result.metrics["regret"], np.zeros(stream.x.shape[0]))
    chex.assert_trees_all_equal(result.params, u_star)
    np.testing.assert_allclose(
        float(result.metrics["cumulative_loss"][-1]), float(prefix.total_loss[-1]), rtol=1e-5
    )
    # The prefix solutions are minimisers: no fixed model does better on its prefix.
    assert np.all(online.regret_curve(result.metrics["loss"], steps, prefix) >= -1e-3)


def test_regret_below_ogd_bound_and_sublinear(bounded_stream):
    """Projected OGD on a ball of radius r, eta_t = D / (G sqrt(t)) with diameter D = 2r.

    Bound (Hazan 2016, Thm 3.1): R(T) <= 1.5 * D * G * sqrt(T) against any u in the ball, with
    G bounding the gradient norms. For the log loss, ||grad|| = |sigmoid(z) - y| ||(x, 1)|| <= G
    = sqrt(2) here. r is set above ||u*||, so the hindsight solution lies in the ball.
    """
    model, stream, steps, prefix, u_star, radius, run = bounded_stream
    num = stream.x.shape[0]
    assert float(jnp.max(prefix.grad_norm)) < 1e-5
    diameter, g = 2 * radius, np.sqrt(2.0)
    result = run(stream, model.init(), diameter / g)
    regret = online.regret_curve(result.metrics["loss"], steps, prefix)
    bound = 1.5 * diameter * g * np.sqrt(steps)
    assert np.all(regret <= bound), (regret, bound)
    np.testing.assert_allclose(regret[-1], float(result.metrics["regret"][-1]), rtol=1e-3)
    slope, _ = online.fit_slope(steps, regret)
    assert 0.2 < slope < 0.75, slope
    assert int(result.num_updates) == num


def test_errors_name_the_bad_example(model):
    x, y = _logistic_stream(T, D, seed=5)
    x[7, 1] = np.nan
    with pytest.raises(ValueError, match=r"stream example 7: x\[7\] has nan at flat feature 1"):
        online.prepare(x, y, model=model)
    y_bad = y.copy()
    y_bad[4] = np.inf
    with pytest.raises(ValueError, match=r"stream example 4: y\[4\] = inf"):
        online.prepare(x[:5] * 0, y_bad[:5], model=model)
    rows = list(x)
    rows[9] = np.zeros(D + 1)
    with pytest.raises(ValueError, match=r"stream example 9: x\[9\] has shape \(4,\), expected"):
        online.prepare(rows, y, model=model)
    with pytest.raises(ValueError, match=r"expects \(3,\)"):
        online.prepare(np.zeros((T, D + 1)), y, model=model)
    with pytest.raises(ValueError, match="x has 24 examples but y has 23"):
        online.prepare(x, y[:-1])
    stream = online.prepare(x, y, on_error="skip")
    with pytest.raises(ValueError, match=r"the model expects \(5,\)"):
        online.run(online.logistic_regression(5), None, stream, learner=online.ogd(0.1))


def test_skip_means_no_update_and_is_counted(model, run_sqrt):
    x, y = _logistic_stream(T, D, seed=6)
    x[7, 1] = np.nan
    rows = list(x)
    rows[11] = np.zeros(D + 1)
    stream = online.prepare(rows, y, model=model, on_error="skip")
    np.testing.assert_array_equal(np.flatnonzero(~np.asarray(stream.valid)), [7, 11])
    result = run_sqrt(stream)
    assert int(result.num_skipped) == 2 and int(result.num_updates) == T - 2
    assert 7 not in np.asarray(result.update_index) and 11 not in np.asarray(result.update_index)
    valid = np.asarray(stream.valid)
    # The learning-rate schedule counts updates, so it skips the skipped examples too.
    params, losses, _ = _numpy_loop("binary", np.asarray(stream.x), y, valid, lr=0.5, decay="sqrt")
    chex.assert_trees_all_close(result.params, params, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.metrics["loss"], losses, rtol=1e-5, atol=1e-6)
    assert np.isfinite(np.asarray(result.metrics["accuracy"])).all()


def test_vmap_over_step_sizes_equals_separate_runs(model, run_sqrt):
    x, y = _logistic_stream(T, D, seed=7)
    x[5] = np.nan  # one skipped example, to check the running sums count it out
    stream = online.prepare(x, y, model=model, on_error="skip")
    lrs = jnp.array([0.05, 0.5, 2.0])
    # per_step=False: only the running sums leave the scan; they must equal the last step.
    swept = jax.jit(
        lambda s: online.sweep(
            model,
            model.init(),
            s,
            make_learner=lambda lr: online.ogd(lr, decay="sqrt"),
            learning_rates=lrs,
            per_step=False,
        )
    )(stream)
    assert swept.metrics["accuracy"].shape == (3,)
    for i, lr in enumerate(lrs):
        single = run_sqrt(stream, lr)
        chex.assert_trees_all_close(
            jax.tree.map(lambda a, i=i: a[i], swept.params), single.params, rtol=1e-6, atol=1e-7
        )
        for name in ("accuracy", "log_loss", "cumulative_loss"):
            np.testing.assert_allclose(
                swept.metrics[name][i], single.metrics[name][-1], rtol=1e-6, err_msg=name
            )
        assert int(swept.num_updates[i]) == int(single.num_updates) == T - 1


def test_bf16_parameters_are_held_in_bf16_and_track_float32(model, run_sqrt):
    x, y = _logistic_stream(T, D, seed=8)
    stream = online.prepare(x, y, model=model)
    low = jax.jit(
        lambda s: online.run(
            model,
            model.init(),
            s,
            learner=online.ogd(0.5, decay="sqrt"),
            param_dtype=jnp.bfloat16,
            update_dtype=jnp.bfloat16,
        )
    )(stream)
    full = run_sqrt(stream)
    assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(low.params))
    chex.assert_trees_all_close(
        jax.tree.map(lambda a: a.astype(jnp.float32), low.params), full.params, atol=0.05
    )
    assert not np.array_equal(np.asarray(low.metrics["loss"]), np.asarray(full.metrics["loss"]))


def test_softmax_and_regression_models_match_numpy():
    rng = np.random.default_rng(9)
    x = rng.normal(size=(8, 2)).astype(np.float32)
    for model, y in [
        (online.softmax_regression(2, 3), rng.integers(0, 3, size=8)),
        (online.linear_regression(2), rng.normal(size=8).astype(np.float32)),
    ]:
        stream = online.prepare(x, y, model=model)
        result = jax.jit(
            lambda s, model=model: online.run(model, model.init(), s, learner=online.ogd(0.2))
        )(stream)
        params, losses, _ = _numpy_loop(model.task, x, y, lr=0.2)
        chex.assert_trees_all_close(result.params, params, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(result.metrics["loss"], losses, rtol=1e-5, atol=1e-6)
    errors = np.asarray(result.metrics["prediction"]) - y
    np.testing.assert_allclose(result.metrics["mae"][-1], np.mean(np.abs(errors)), rtol=1e-5)
    np.testing.assert_allclose(result.metrics["rmse"][-1], np.sqrt(np.mean(errors**2)), rtol=1e-5)


def test_compiler_options_change_speed_not_numbers(model):
    """`run` compiled with `online.compiler_options()` gives the default compile's numbers."""
    x, y = _logistic_stream(T, D, seed=7)
    stream = online.prepare(x, y, model=model)
    u = {"w": jnp.full((D,), 0.3), "b": jnp.float32(-0.1)}

    def fn(s):
        return online.run(model, model.init(), s, learner=online.ogd(0.2), comparator=u)

    options = online.compiler_options()
    assert set(options) <= {"xla_cpu_use_fusion_emitters"}
    assert online.compiler_options("gpu") == {}
    chex.assert_trees_all_equal(
        jax.jit(fn, compiler_options=options)(stream).metrics, jax.jit(fn)(stream).metrics
    )


def test_compiler_options_fall_back_to_none_where_xla_lacks_them(monkeypatch):
    monkeypatch.setattr(online, "_CPU_OPTIONS", {"xla_cpu_no_such_option": True})
    assert online.compiler_options("cpu") == {}


@pytest.mark.parametrize("delay,batch", [(2, 1), (1, 2)])
def test_chunk_by_chunk_equals_one_scan_bit_for_bit(model, delay, batch):
    # A stream of 37 (one example skipped) in chunks of 6, the last padded with invalid rows:
    # `start` + `advance` per chunk gives the sweep's per-example metrics and final parameters.
    x, y = _logistic_stream(37, D, seed=4)
    x[5, 1] = np.nan
    stream = online.prepare(x, y, model=model, on_error="skip")
    u = {"w": jnp.full((D,), 0.3), "b": jnp.float32(-0.1)}  # any fixed comparator
    lrs = jnp.asarray([0.1, 0.5, 2.0])
    kw = dict(delay=delay, batch_size=batch)

    def learner(lr):
        return optax.adagrad(lr) if batch > 1 else online.ogd(lr, decay="sqrt")

    want = jax.jit(
        lambda s: online.sweep(
            model, model.init(), s, make_learner=learner, learning_rates=lrs, comparator=u, **kw
        )
    )(stream)
    padded = online.Stream(
        *(np.concatenate([a, np.zeros((5, *a.shape[1:]), a.dtype)]) for a in stream)
    )
    carry = jax.vmap(lambda lr: online.start(model, model.init(), learner=learner(lr), **kw))(lrs)
    advance = jax.jit(
        jax.vmap(
            lambda lr, c, chunk: online.advance(
                model, c, chunk, learner=learner(lr), comparator=u, length=37, **kw
            ),
            in_axes=(0, 0, None),
        )
    )
    chunks = []
    for i in range(0, 42, 6):
        carry, metrics = advance(lrs, carry, online.Stream(*(a[i : i + 6] for a in padded)))
        chunks.append(metrics)
    assert chunks[0].keys() == want.metrics.keys()
    for key in want.metrics:
        got = np.concatenate([c[key] for c in chunks], axis=1)[:, :37]
        np.testing.assert_array_equal(got, want.metrics[key], err_msg=key)
    chex.assert_trees_all_equal(carry.params, want.params)
    with pytest.raises(ValueError, match=r"advance: delay=0, batch_size=2, but the carry"):
        online.advance(model, jax.tree.map(lambda a: a[0], carry), padded, learner=learner(1.0),
                       batch_size=2)  # fmt: skip


def test_sweep_step_chunk_by_chunk_equals_one_sweep(model):
    # Two learners, a stream of 3 chunks (the last padded): the chunked sweep's carries and the
    # main learner's losses equal one `sweep` over the whole stream.
    from ftlab.core import parallel

    x, y = _logistic_stream(10, D, seed=3)
    stream = online.prepare(x, y, model=model)
    lrs, size, main = (0.1, 0.5), 4, 1
    learner = lambda lr: online.ogd(lr, decay="sqrt")  # noqa: E731
    pad = -10 % size
    host = {
        k: np.concatenate([np.asarray(a), np.zeros((pad, *a.shape[1:]), a.dtype)])
        for k, a in zip(("x", "y", "valid"), stream, strict=True)
    }
    state = online.sweep_start(model, lrs, make_learner=learner, padded_length=12)
    step = jax.jit(
        online.sweep_step(
            model,
            make_learner=learner,
            plan=parallel.make_plan("mesh", num_devices=1),
            length=10,
            main=main,
            comparator=model.init(),
        )
    )
    for i in range(3):
        state, metrics = step(state, {k: a[i * size : (i + 1) * size] for k, a in host.items()})
    whole = online.sweep(
        model, model.init(), stream, make_learner=learner, learning_rates=jnp.array(lrs),
        comparator=model.init(),
    )  # fmt: skip
    chex.assert_trees_all_close(state["carry"].params, whole.params, rtol=1e-6)
    np.testing.assert_allclose(state["losses"][:10], whole.metrics["loss"][main], rtol=1e-6)
    assert int(state["seen"]) == 12
    np.testing.assert_allclose(
        metrics["regret/final_comparator"], whole.metrics["regret"][main][-1], rtol=1e-5
    )


def test_chunked_pads_with_invalid_zero_examples_to_whole_chunks():
    stream = online.Stream(
        np.ones((5, 2), np.float32), np.arange(5, dtype=np.int32), np.ones(5, bool)
    )
    host = online.chunked(stream, 4)
    assert host["x"].shape == (8, 2) and host["y"].dtype == np.int32
    np.testing.assert_array_equal(host["valid"], [True] * 5 + [False] * 3)
    np.testing.assert_array_equal(host["x"][5:], 0.0)
    assert len(online.chunked(stream, 5)["y"]) == 5
    with pytest.raises(ValueError, match=r"chunked: size=0 must be a positive integer"):
        online.chunked(stream, 0)
