"""Each post-training loss against a direct numpy computation written here, independently."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftlab.posttrain import losses


def _rng(seed=0):
    return np.random.default_rng(seed)


def _log_sigmoid(z):
    return -np.log1p(np.exp(-z))


def test_bradley_terry_matches_the_logistic_likelihood_with_a_per_pair_margin():
    rng = _rng()
    chosen, rejected = rng.normal(size=6), rng.normal(size=6)
    margin = rng.uniform(0, 2, size=6)
    want = [
        -math.log(1 / (1 + math.exp(-(c - r - m))))
        for c, r, m in zip(chosen, rejected, margin, strict=True)
    ]
    got = losses.bradley_terry_loss(
        jnp.array(chosen), jnp.array(rejected), margin=jnp.array(margin)
    )
    np.testing.assert_allclose(got, want, rtol=1e-5)
    no_margin = losses.bradley_terry_loss(jnp.array(chosen), jnp.array(rejected))
    np.testing.assert_allclose(no_margin, -_log_sigmoid(chosen - rejected), rtol=1e-5)
    # stable far out: a confidently right pair costs ~0, a confidently wrong one ~|diff|
    far = losses.bradley_terry_loss(jnp.array([100.0, -100.0]), jnp.zeros(2))
    np.testing.assert_allclose(far, [0.0, 100.0], atol=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        losses.bradley_terry_loss(jnp.zeros(3), jnp.zeros(3), margin=jnp.zeros(2))


def _np_dpo_logits(pc, pr, rc, rr):
    return (pc - pr) - (rc - rr)


def test_dpo_ipo_simpo_match_their_formulas():
    rng = _rng(1)
    pc, pr, rc, rr = (rng.normal(-20, 3, size=5) for _ in range(4))
    j = [jnp.array(a, jnp.float32) for a in (pc, pr, rc, rr)]
    h = _np_dpo_logits(pc, pr, rc, rr)
    beta, eps = 0.3, 0.1
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    want = -(1 - eps) * np.log(sig(beta * h)) - eps * np.log(sig(-beta * h))
    np.testing.assert_allclose(losses.dpo_loss(*j, beta=beta, label_smoothing=eps), want, rtol=1e-4)
    np.testing.assert_allclose(losses.dpo_loss(*j, beta=beta), -np.log(sig(beta * h)), rtol=1e-4)
    np.testing.assert_allclose(losses.ipo_loss(*j, beta=beta), (h - 1 / (2 * beta)) ** 2, rtol=1e-4)
    g = 0.7
    want_simpo = -(1 - eps) * np.log(sig(2.0 * (pc - pr) - g)) - eps * np.log(
        sig(-(2.0 * (pc - pr) - g))
    )
    got = losses.simpo_loss(j[0], j[1], beta=2.0, gamma=g, label_smoothing=eps)
    np.testing.assert_allclose(got, want_simpo, rtol=1e-4)
    np.testing.assert_allclose(
        losses.dpo_rewards(j[0], j[2], beta=beta), beta * (pc - rc), rtol=1e-5
    )
    with pytest.raises(ValueError, match="label_smoothing=0.5"):
        losses.dpo_loss(*j, label_smoothing=0.5)
    with pytest.raises(ValueError, match="same shape"):
        losses.dpo_loss(j[0], j[1][:2], j[2], j[3])


def test_dpo_and_bradley_terry_gradients_match_finite_differences():
    rng = _rng(2)
    x = rng.normal(size=(4, 3))  # policy chosen/rejected, reference chosen/rejected, 3 pairs
    beta, eps = 0.5, 0.2

    def f(a):  # the mean loss in float64 numpy
        h = _np_dpo_logits(*a)
        return np.mean(-(1 - eps) * _log_sigmoid(beta * h) - eps * _log_sigmoid(-beta * h))

    def loss(a):
        return jnp.mean(losses.dpo_loss(a[0], a[1], a[2], a[3], beta=beta, label_smoothing=eps))

    grad = np.asarray(jax.grad(loss)(jnp.array(x, jnp.float32)))
    step = 1e-5
    numeric = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        up, down = x.copy(), x.copy()
        up[idx] += step
        down[idx] -= step
        numeric[idx] = (f(up) - f(down)) / (2 * step)
    np.testing.assert_allclose(grad, numeric, atol=1e-5)
    # the reference takes a gradient in the formula, so the test sees it is not dropped
    assert np.abs(grad[2]).min() > 0

    c, r = rng.normal(size=5), rng.normal(size=5)
    g = jax.grad(lambda c_: jnp.sum(losses.bradley_terry_loss(c_, jnp.array(r), margin=0.5)))
    numeric = [
        (-_log_sigmoid(c[i] + step - r[i] - 0.5) + _log_sigmoid(c[i] - step - r[i] - 0.5))
        / (2 * step)
        for i in range(5)
    ]
    np.testing.assert_allclose(g(jnp.array(c, jnp.float32)), numeric, atol=1e-5)


def test_ppo_policy_loss_is_the_pessimistic_clipped_surrogate():
    rng = _rng(3)
    shape = (3, 7)
    old = rng.normal(-2, 0.5, size=shape)
    new = old + rng.normal(0, 0.4, size=shape)  # ratios well beyond 1 +- 0.2 for some tokens
    adv = rng.normal(size=shape)
    mask = (rng.uniform(size=shape) > 0.3).astype(np.float64)
    eps = 0.2
    total, count, clipped = 0.0, 0.0, 0
    for b, t in np.ndindex(*shape):
        if not mask[b, t]:
            continue
        ratio = math.exp(new[b, t] - old[b, t])
        objective = min(ratio * adv[b, t], min(max(ratio, 1 - eps), 1 + eps) * adv[b, t])
        total += -objective
        count += 1
        clipped += -min(max(ratio, 1 - eps), 1 + eps) * adv[b, t] > -ratio * adv[b, t]
    args = [jnp.array(a, jnp.float32) for a in (new, old, adv, mask)]
    loss, metrics = losses.ppo_policy_loss(*args, clip_eps=eps)
    np.testing.assert_allclose(loss, total / count, rtol=1e-5)
    np.testing.assert_allclose(metrics["clip_fraction"], clipped / count, rtol=1e-6)
    assert 0 < clipped < count  # both branches were exercised
    # no gradient reaches the old log-probs or the advantages
    g_old = jax.grad(lambda o: losses.ppo_policy_loss(args[0], o, args[2], args[3])[0])(args[1])
    assert not np.any(np.asarray(g_old))


def test_ppo_value_loss_clips_around_the_old_values():
    rng = _rng(4)
    shape = (2, 5)
    old_v, returns = rng.normal(size=shape), rng.normal(size=shape)
    v = old_v + rng.normal(0, 0.5, size=shape)
    mask = np.ones(shape)
    mask[1, 3:] = 0
    eps = 0.2
    terms = []
    for b, t in np.ndindex(*shape):
        if mask[b, t]:
            vc = old_v[b, t] + min(max(v[b, t] - old_v[b, t], -eps), eps)
            terms.append(0.5 * max((v[b, t] - returns[b, t]) ** 2, (vc - returns[b, t]) ** 2))
    args = [jnp.array(a, jnp.float32) for a in (v, old_v, returns, mask)]
    loss, _ = losses.ppo_value_loss(*args, clip_eps=eps)
    np.testing.assert_allclose(loss, np.mean(terms), rtol=1e-5)


def _np_gae(rewards, values, mask, gamma, lam):
    batch, time = rewards.shape
    adv = np.zeros((batch, time))
    for b in range(batch):
        length = int(mask[b].sum())  # real steps come first
        running = 0.0
        for t in reversed(range(length)):
            next_v = values[b, t + 1] if t + 1 < length else 0.0
            delta = rewards[b, t] + gamma * next_v - values[b, t]
            running = delta + gamma * lam * running
            adv[b, t] = running
    returns = (adv + values) * mask
    return adv, returns


def test_gae_matches_the_backward_recursion_and_ignores_ended_sequences():
    rng = _rng(5)
    rewards, values = rng.normal(size=(3, 6)), rng.normal(size=(3, 6))
    mask = np.ones((3, 6))
    mask[1, 4:] = 0  # ended after 4 tokens
    mask[2, 1:] = 0  # one token
    gamma, lam = 0.9, 0.8
    want_a, want_r = _np_gae(rewards, values, mask, gamma, lam)
    a, r = losses.gae(jnp.array(rewards), jnp.array(values), jnp.array(mask), gamma=gamma, lam=lam)
    np.testing.assert_allclose(a, want_a, atol=1e-5)
    np.testing.assert_allclose(r, want_r, atol=1e-5)
    # whatever sits in the padding of an ended row changes nothing
    noisy_r, noisy_v = rewards.copy(), values.copy()
    noisy_r[1, 4:], noisy_v[1, 4:] = 50.0, -50.0
    a2, _ = losses.gae(
        jnp.array(noisy_r), jnp.array(noisy_v), jnp.array(mask), gamma=gamma, lam=lam
    )
    np.testing.assert_allclose(a2, a, atol=1e-6)


def test_grpo_advantages_standardise_within_each_group():
    rng = _rng(6)
    rewards = rng.normal(size=(3, 4))
    rewards[2] = 1.5  # a group where every completion scored the same
    for ddof in (0, 1):
        want = np.zeros_like(rewards)
        for i, row in enumerate(rewards):
            mean = sum(row) / len(row)
            std = math.sqrt(sum((x - mean) ** 2 for x in row) / (len(row) - ddof))
            want[i] = [(x - mean) / (std + 1e-4) for x in row]
        got = losses.grpo_advantages(jnp.array(rewards), eps=1e-4, ddof=ddof)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert not np.any(np.asarray(got[2]))
    with pytest.raises(ValueError, match="G=1 completions per prompt"):
        losses.grpo_advantages(jnp.zeros((2, 1)))


def test_kl_estimators_and_penalised_rewards():
    rng = _rng(7)
    lp, ref = rng.normal(-2, 1, size=(2, 4)), rng.normal(-2, 1, size=(2, 4))
    log_r = ref - lp
    want = {"k1": -log_r, "k2": 0.5 * log_r**2, "k3": np.exp(log_r) - 1 - log_r}
    for kind, w in want.items():
        np.testing.assert_allclose(
            losses.per_token_kl(jnp.array(lp), jnp.array(ref), kind=kind), w, rtol=1e-4, atol=1e-6
        )
    with pytest.raises(ValueError, match="kind='k4'"):
        losses.per_token_kl(jnp.array(lp), jnp.array(ref), kind="k4")
    # k1 and k3 are unbiased for KL(p || q): sample from p and average
    p, q = np.array([0.7, 0.2, 0.1]), np.array([0.4, 0.4, 0.2])
    x = rng.choice(3, size=200_000, p=p)
    exact = float(np.sum(p * np.log(p / q)))
    for kind in ("k1", "k3"):
        est = losses.per_token_kl(jnp.log(p[x]), jnp.log(q[x]), kind=kind).mean()
        assert abs(float(est) - exact) < 0.01, (kind, float(est), exact)

    mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0]], np.float32)
    scores = np.array([2.0, -1.0])
    rewards, kl = losses.kl_penalized_rewards(
        jnp.array(scores), jnp.array(lp), jnp.array(ref), jnp.array(mask), kl_coef=0.1
    )
    want_r = -0.1 * (lp - ref) * mask
    want_r[0, 2] += 2.0
    want_r[1, 0] += -1.0
    np.testing.assert_allclose(rewards, want_r, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(kl, (lp - ref) * mask, rtol=1e-5, atol=1e-6)


def test_adaptive_kl_controller_follows_ziegler_et_al():
    beta, target, horizon = 0.2, 6.0, 10_000
    state = losses.kl_controller_init(beta)
    update = jax.jit(
        lambda s, kl: losses.kl_controller_update(s, kl, 256, target=target, horizon=horizon)
    )
    for kl in (3.0, 6.5, 20.0, 0.0):
        error = min(max(kl / target - 1, -0.2), 0.2)
        beta *= 1 + error * 256 / horizon
        state = update(state, kl)
        np.testing.assert_allclose(state.kl_coef, beta, rtol=1e-6)
    chex.assert_shape(state.kl_coef, ())
    with pytest.raises(ValueError, match="target=0"):
        losses.kl_controller_update(state, 1.0, 1, target=0, horizon=1)


def test_masked_mean_is_zero_without_entries():
    assert float(losses.masked_mean(jnp.ones(3), jnp.zeros(3))) == 0.0
