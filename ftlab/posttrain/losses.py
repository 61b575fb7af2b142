"""Post-training objectives as pure JAX functions: reward models, DPO family, PPO, GRPO, KL.

Every function takes arrays and keyword hyperparameters and returns arrays; nothing here knows a
model. Shapes: ``[batch]`` for per-sequence quantities (a reward, a summed log-probability),
``[batch, time]`` with a 0/1 ``mask`` for per-token ones (log-probs, values, rewards of the
completion tokens). Pairwise and preference losses return per-pair losses ``[batch]`` (take the
mean, or weight them, yourself); the PPO losses return a masked-mean scalar and a metrics dict,
as the PPO update consumes them.

Log-probabilities of sequences come from `ftlab.posttrain.logprobs`. For DPO with a
parameter-efficient method the reference log-probs are the same model with the method switched
off (`logprobs.reference_logprobs`), or precomputed once before training.

References:
    Bradley & Terry, "Rank Analysis of Incomplete Block Designs", Biometrika 1952.
    Ouyang et al., "Training language models to follow instructions with human feedback",
    https://arxiv.org/abs/2203.02155 (reward model loss); Touvron et al., "Llama 2",
    https://arxiv.org/abs/2307.09288 (its margin).
    Rafailov et al., "Direct Preference Optimization", https://arxiv.org/abs/2305.18290
    Mitchell, "A note on DPO with noisy preferences" (cDPO, label smoothing), 2023.
    Azar et al., "A General Theoretical Paradigm to Understand Learning from Human
    Preferences" (IPO), https://arxiv.org/abs/2310.12036
    Meng et al., "SimPO: Simple Preference Optimization with a Reference-Free Reward",
    https://arxiv.org/abs/2405.14734
    Schulman et al., "Proximal Policy Optimization Algorithms", https://arxiv.org/abs/1707.06347
    Schulman et al., "High-Dimensional Continuous Control Using Generalized Advantage
    Estimation", https://arxiv.org/abs/1506.02438
    Ziegler et al., "Fine-Tuning Language Models from Human Preferences",
    https://arxiv.org/abs/1909.08593 (adaptive KL controller)
    Shao et al., "DeepSeekMath" (GRPO), https://arxiv.org/abs/2402.03300
    Schulman, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html (k1, k2, k3)
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = [
    "KL_ESTIMATORS",
    "KLControllerState",
    "bradley_terry_loss",
    "dpo_loss",
    "dpo_rewards",
    "gae",
    "grpo_advantages",
    "ipo_loss",
    "kl_controller_init",
    "kl_controller_update",
    "kl_penalized_rewards",
    "masked_mean",
    "per_token_kl",
    "ppo_policy_loss",
    "ppo_value_loss",
    "simpo_loss",
]

KL_ESTIMATORS = ("k1", "k2", "k3")


def _check_same_shape(**arrays: jax.Array) -> None:
    shapes = {name: jnp.shape(a) for name, a in arrays.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{k} {v}" for k, v in shapes.items())
        raise ValueError(f"these arrays must have the same shape: {listed}.")


def _check_label_smoothing(label_smoothing: float) -> None:
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(
            f"label_smoothing={label_smoothing} must be in [0, 0.5): it is the assumed chance "
            "that a preference label is flipped."
        )


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """``sum(x * mask) / max(sum(mask), 1)``: the mean over the real entries, 0 with none.

    >>> float(masked_mean(jnp.array([1.0, 3.0, 100.0]), jnp.array([1, 1, 0])))
    2.0
    """
    _check_same_shape(x=x, mask=mask)
    mask = mask.astype(jnp.float32)
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _smoothed_logistic(logits: jax.Array, label_smoothing: float) -> jax.Array:
    # -(1 - eps) log sigmoid(z) - eps log sigmoid(-z); log_sigmoid is stable for large |z|.
    return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(logits) - (
        label_smoothing * jax.nn.log_sigmoid(-logits)
    )


def bradley_terry_loss(
    chosen: jax.Array, rejected: jax.Array, *, margin: jax.Array | float = 0.0
) -> jax.Array:
    """Per-pair reward-model loss ``-log sigmoid(r_chosen - r_rejected - margin)``.

    The Bradley-Terry model says the preferred item wins with probability
    ``sigmoid(r_chosen - r_rejected)``; the loss is its negative log-likelihood (Ouyang et al.
    2022, eq. 1). Llama 2's reward model subtracts a ``margin`` that grows with how clearly the
    raters preferred one side (Touvron et al. 2023, eq. 2): here a scalar or one per pair, e.g.
    the difference of two snippets' mean human ratings.

    Args:
        chosen: ``[batch]`` rewards of the preferred items.
        rejected: ``[batch]`` rewards of the others.
        margin: Scalar or ``[batch]``, 0 by default.

    Returns:
        ``[batch]`` float32 losses.

    >>> round(float(bradley_terry_loss(jnp.array([0.0]), jnp.array([0.0]))[0]), 4)  # log 2
    0.6931
    """
    _check_same_shape(chosen=chosen, rejected=rejected)
    margin = jnp.asarray(margin, jnp.float32)
    if margin.ndim:
        _check_same_shape(chosen=chosen, margin=margin)
    diff = chosen.astype(jnp.float32) - rejected.astype(jnp.float32) - margin
    return -jax.nn.log_sigmoid(diff)


def _dpo_logits(policy_chosen, policy_rejected, reference_chosen, reference_rejected):
    _check_same_shape(
        policy_chosen=policy_chosen,
        policy_rejected=policy_rejected,
        reference_chosen=reference_chosen,
        reference_rejected=reference_rejected,
    )
    f32 = jnp.float32
    pi = policy_chosen.astype(f32) - policy_rejected.astype(f32)
    ref = reference_chosen.astype(f32) - reference_rejected.astype(f32)
    return pi - ref


def dpo_loss(
    policy_chosen: jax.Array,
    policy_rejected: jax.Array,
    reference_chosen: jax.Array,
    reference_rejected: jax.Array,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> jax.Array:
    """Per-pair DPO loss (sigmoid form), with cDPO's label smoothing.

    With ``h = (log pi(y_w|x) - log pi(y_l|x)) - (log ref(y_w|x) - log ref(y_l|x))``::

        loss = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)

    (Rafailov et al. 2023, eq. 7; ``eps`` = ``label_smoothing``, the assumed rate of flipped
    labels, Mitchell 2023; TRL's ``loss_type="sigmoid"``). Inputs are summed log-probabilities
    of each whole response (`logprobs.sequence_logprobs`).

    Args:
        policy_chosen: ``[batch]`` policy log-prob of the preferred responses.
        policy_rejected: ``[batch]`` policy log-prob of the rejected responses.
        reference_chosen: ``[batch]`` reference log-prob of the preferred responses.
        reference_rejected: ``[batch]`` reference log-prob of the rejected responses.
        beta: Inverse temperature: the strength of the implicit KL to the reference.
        label_smoothing: ``eps`` in ``[0, 0.5)``.

    Returns:
        ``[batch]`` float32 losses.

    >>> z = jnp.zeros(1)
    >>> round(float(dpo_loss(z, z, z, z)[0]), 4)
    0.6931
    """
    _check_label_smoothing(label_smoothing)
    return _smoothed_logistic(
        beta * _dpo_logits(policy_chosen, policy_rejected, reference_chosen, reference_rejected),
        label_smoothing,
    )


def dpo_rewards(policy: jax.Array, reference: jax.Array, *, beta: float = 0.1) -> jax.Array:
    """DPO's implicit reward of a response, ``beta * (log pi(y|x) - log ref(y|x))``.

    Logged for chosen and rejected responses; their difference's sign is the reward accuracy.

    >>> dpo_rewards(jnp.array([-1.0]), jnp.array([-2.0]), beta=0.5).tolist()
    [0.5]
    """
    _check_same_shape(policy=policy, reference=reference)
    return beta * (policy.astype(jnp.float32) - reference.astype(jnp.float32))


def ipo_loss(
    policy_chosen: jax.Array,
    policy_rejected: jax.Array,
    reference_chosen: jax.Array,
    reference_rejected: jax.Array,
    *,
    beta: float = 0.1,
) -> jax.Array:
    """Per-pair IPO loss ``(h - 1 / (2 beta))^2``, ``h`` the log-ratio difference of `dpo_loss`.

    Azar et al. 2023, eq. 17, with ``tau`` = ``beta``. A squared loss toward a finite target, so
    the policy cannot push ``h`` to infinity on deterministic preferences as DPO can. TRL (and
    Azar et al.'s experiments) feed it log-probs averaged over each response's tokens
    (`logprobs.sequence_logprobs(..., average=True)`); this function takes whichever it is given.

    Returns:
        ``[batch]`` float32 losses.

    >>> z = jnp.zeros(1)
    >>> float(ipo_loss(z, z, z, z, beta=0.5)[0])  # (0 - 1)^2
    1.0
    """
    if beta <= 0:
        raise ValueError(f"beta={beta} must be positive: the target 1 / (2 beta) is finite.")
    h = _dpo_logits(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    return (h - 1.0 / (2.0 * beta)) ** 2


def simpo_loss(
    policy_chosen: jax.Array,
    policy_rejected: jax.Array,
    *,
    beta: float = 2.0,
    gamma: float = 1.0,
    label_smoothing: float = 0.0,
) -> jax.Array:
    """Per-pair SimPO loss: reference-free, on length-normalised log-probabilities.

    With ``a_w``, ``a_l`` the mean per-token log-probs of the responses
    (`logprobs.sequence_logprobs(..., average=True)`)::

        loss = -(1 - eps) log sigmoid(beta (a_w - a_l) - gamma) - eps log sigmoid(-(...))

    (Meng et al. 2024, eq. 6; ``gamma`` is the target reward margin, TRL's ``simpo_gamma``
    equals ``beta * gamma_beta_ratio``).

    Args:
        policy_chosen: ``[batch]`` mean token log-prob of the preferred responses.
        policy_rejected: ``[batch]`` the same of the rejected responses.
        beta: Reward scale (the paper uses 2.0-2.5).
        gamma: Target margin.
        label_smoothing: ``eps`` in ``[0, 0.5)``.

    Returns:
        ``[batch]`` float32 losses.

    >>> round(float(simpo_loss(jnp.zeros(1), jnp.zeros(1), gamma=0.0)[0]), 4)
    0.6931
    """
    _check_same_shape(policy_chosen=policy_chosen, policy_rejected=policy_rejected)
    _check_label_smoothing(label_smoothing)
    diff = policy_chosen.astype(jnp.float32) - policy_rejected.astype(jnp.float32)
    return _smoothed_logistic(beta * diff - gamma, label_smoothing)


def ppo_policy_loss(
    logprobs: jax.Array,
    old_logprobs: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    clip_eps: float = 0.2,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PPO's clipped surrogate, as a loss to minimise, averaged over the masked tokens.

    With ``ratio = exp(logprobs - old_logprobs)`` per token::

        loss = mean_mask( max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)) )

    (Schulman et al. 2017, eq. 7, negated). The ``max`` of the two negated terms is the ``min``
    of the paper's objective: the pessimistic bound.

    Args:
        logprobs: ``[batch, time]`` log-probs of the sampled tokens under the current policy.
        old_logprobs: The same under the policy that sampled them (no gradient flows there).
        advantages: ``[batch, time]`` advantage estimates (e.g. `gae`, `grpo_advantages`).
        mask: ``[batch, time]`` 1 for completion tokens, 0 for prompt and padding.
        clip_eps: ``eps``.

    Returns:
        ``(loss, {"clip_fraction", "approx_kl"})``: the share of tokens whose ratio was clipped
        and ``mean(k3)`` of old against new (Schulman's low-variance KL estimate).
    """
    _check_same_shape(
        logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask
    )
    old_logprobs = jax.lax.stop_gradient(old_logprobs)
    advantages = jax.lax.stop_gradient(advantages)
    log_ratio = logprobs.astype(jnp.float32) - old_logprobs.astype(jnp.float32)
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(jnp.maximum(unclipped, clipped), mask)
    metrics = {
        "clip_fraction": masked_mean((clipped > unclipped).astype(jnp.float32), mask),
        "approx_kl": masked_mean(per_token_kl(old_logprobs, logprobs, kind="k3"), mask),
    }
    return loss, jax.lax.stop_gradient(metrics)


def ppo_value_loss(
    values: jax.Array,
    old_values: jax.Array,
    returns: jax.Array,
    mask: jax.Array,
    *,
    clip_eps: float = 0.2,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped value loss ``0.5 mean_mask(max((V - R)^2, (V_clip - R)^2))``.

    ``V_clip = V_old + clip(V - V_old, -eps, eps)`` keeps the value function near the one that
    computed the advantages, as the policy ratio is kept near 1 (the PPO2 baselines code; TRL's
    ``cliprange_value``).

    Args:
        values: ``[batch, time]`` current value predictions.
        old_values: The predictions made when the advantages were computed.
        returns: ``[batch, time]`` targets (``advantages + old_values`` from `gae`).
        mask: ``[batch, time]`` completion-token mask.
        clip_eps: ``eps``, in units of the value.

    Returns:
        ``(loss, {"clip_fraction"})``: the share of tokens where the clipped error was larger.
    """
    _check_same_shape(values=values, old_values=old_values, returns=returns, mask=mask)
    old_values = jax.lax.stop_gradient(old_values)
    returns = jax.lax.stop_gradient(returns)
    v = values.astype(jnp.float32)
    v_clipped = old_values + jnp.clip(v - old_values, -clip_eps, clip_eps)
    err, err_clipped = (v - returns) ** 2, (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(jnp.maximum(err, err_clipped), mask)
    fraction = masked_mean((err_clipped > err).astype(jnp.float32), mask)
    return loss, {"clip_fraction": jax.lax.stop_gradient(fraction)}


def gae(
    rewards: jax.Array,
    values: jax.Array,
    mask: jax.Array,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimates and lambda-returns, by a reverse-time `lax.scan`.

    With ``m`` the mask and the episode ending at its last real step (no bootstrap after it)::

        delta_t = r_t + gamma V_{t+1} m_{t+1} - V_t
        A_t     = delta_t + gamma lam m_{t+1} A_{t+1}
        R_t     = A_t + V_t

    (Schulman et al. 2016, eq. 16). A sequence that ended early (EOS, then padding with
    ``mask = 0``) takes no value or reward from its padding; advantages and returns are 0 there.
    The mask of one sequence must be a run of ones then zeros (or ones throughout): a zero
    inside the run would end the episode there.

    Args:
        rewards: ``[batch, time]`` per-step rewards (e.g. `kl_penalized_rewards`).
        values: ``[batch, time]`` value predictions ``V_t``.
        mask: ``[batch, time]`` 1 for real steps.
        gamma: Discount.
        lam: GAE's lambda.

    Returns:
        ``(advantages, returns)``, float32 ``[batch, time]``, constant (no gradient).

    >>> a, r = gae(jnp.array([[0.0, 1.0]]), jnp.zeros((1, 2)), jnp.ones((1, 2)), lam=1.0)
    >>> a.tolist(), r.tolist()
    ([[1.0, 1.0]], [[1.0, 1.0]])
    """
    _check_same_shape(rewards=rewards, values=values, mask=mask)
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be [batch, time]; got shape {rewards.shape}.")
    f32 = jnp.float32
    m = mask.astype(f32)
    r = rewards.astype(f32) * m
    v = jax.lax.stop_gradient(values).astype(f32) * m
    next_v = jnp.concatenate([v[:, 1:], jnp.zeros_like(v[:, :1])], axis=1)
    next_m = jnp.concatenate([m[:, 1:], jnp.zeros_like(m[:, :1])], axis=1)
    delta = (r + gamma * next_v * next_m - v) * m

    def step(next_adv, xs):
        delta_t, next_m_t, m_t = xs
        adv = (delta_t + gamma * lam * next_m_t * next_adv) * m_t
        return adv, adv

    # time-major for the scan, last step first
    xs = (delta.T, next_m.T, m.T)
    _, adv = jax.lax.scan(step, jnp.zeros(r.shape[0], f32), xs, reverse=True)
    adv = adv.T
    return jax.lax.stop_gradient(adv), jax.lax.stop_gradient((adv + v) * m)


def grpo_advantages(rewards: jax.Array, *, eps: float = 1e-4, ddof: int = 1) -> jax.Array:
    """GRPO's group-relative advantages ``(r - mean_group) / (std_group + eps)``.

    Each row holds the rewards of the ``G`` completions sampled for one prompt; a completion's
    advantage is its reward standardised within its group, and every token of the completion
    gets it (Shao et al. 2024, section 4.1.2, outcome supervision). ``ddof=1`` (the unbiased
    standard deviation) is what TRL's `GRPOTrainer` computes (torch's default); ``ddof=0`` the
    population one. A group of equal rewards gets advantages 0.

    Args:
        rewards: ``[num_prompts, G]`` scalar rewards.
        eps: Added to the standard deviation.
        ddof: Delta degrees of freedom of the standard deviation.

    Returns:
        ``[num_prompts, G]`` float32 advantages.

    Raises:
        ValueError: ``rewards`` is not 2-D, or ``G <= ddof`` (the deviation is undefined).

    >>> grpo_advantages(jnp.array([[1.0, 3.0]]), eps=0.0, ddof=0).tolist()
    [[-1.0, 1.0]]
    """
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be [num_prompts, G]; got shape {rewards.shape}.")
    if rewards.shape[1] <= ddof:
        raise ValueError(
            f"rewards has G={rewards.shape[1]} completions per prompt; the standard deviation "
            f"with ddof={ddof} needs at least {ddof + 1}."
        )
    r = rewards.astype(jnp.float32)
    mean = jnp.mean(r, axis=1, keepdims=True)
    std = jnp.std(r, axis=1, keepdims=True, ddof=ddof)
    return (r - mean) / (std + eps)


def per_token_kl(logprobs: jax.Array, ref_logprobs: jax.Array, *, kind: str = "k1") -> jax.Array:
    """Per-token estimates of ``KL(pi || ref)`` from tokens sampled from ``pi``.

    With ``log r = ref_logprobs - logprobs`` (Schulman 2020)::

        k1 = -log r                  unbiased, high variance, can be negative
        k2 = (log r)^2 / 2           biased, low variance
        k3 = (r - 1) - log r         unbiased, low variance, never negative (GRPO's)

    Args:
        logprobs: ``[...]`` log-probs of the sampled tokens under the policy.
        ref_logprobs: The same under the reference.
        kind: One of `KL_ESTIMATORS`.

    Returns:
        float32 estimates, same shape.

    >>> per_token_kl(jnp.array([0.0]), jnp.array([0.0]), kind="k3").tolist()
    [0.0]
    """
    _check_same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs)
    log_r = ref_logprobs.astype(jnp.float32) - logprobs.astype(jnp.float32)
    if kind == "k1":
        return -log_r
    if kind == "k2":
        return 0.5 * log_r**2
    if kind == "k3":
        return jnp.expm1(log_r) - log_r
    raise ValueError(f"kind={kind!r}; expected one of {KL_ESTIMATORS}.")


def kl_penalized_rewards(
    scores: jax.Array,
    logprobs: jax.Array,
    ref_logprobs: jax.Array,
    mask: jax.Array,
    *,
    kl_coef: jax.Array | float,
    kind: str = "k1",
) -> tuple[jax.Array, jax.Array]:
    """Per-token RLHF rewards: ``-kl_coef * KL_t``, plus the sequence's score on its last token.

    Ziegler et al. 2019, eq. 2: ``R(x, y) = r(x, y) - beta log(pi(y|x) / ref(y|x))``, the KL
    term spread over the tokens (TRL's PPO does the same). The score lands on the last real
    token of each row.

    Args:
        scores: ``[batch]`` reward-model scores of the completions.
        logprobs: ``[batch, time]`` policy log-probs of the completion tokens.
        ref_logprobs: ``[batch, time]`` reference log-probs.
        mask: ``[batch, time]`` completion-token mask (a run of ones, then zeros).
        kl_coef: ``beta`` (e.g. `KLControllerState.kl_coef`).
        kind: The KL estimator (`per_token_kl`).

    Returns:
        ``(rewards [batch, time], kl [batch, time])``, both zero outside the mask.
    """
    _check_same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs, mask=mask)
    if scores.shape != mask.shape[:1]:
        raise ValueError(f"scores must be [batch]={mask.shape[:1]}; got {scores.shape}.")
    m = mask.astype(jnp.float32)
    kl = per_token_kl(logprobs, ref_logprobs, kind=kind) * m
    # index of the last real token: the last position where mask is 1
    t = jnp.arange(mask.shape[1])
    last = jnp.max(jnp.where(mask > 0, t[None, :], -1), axis=1)
    at_last = (t[None, :] == last[:, None]).astype(jnp.float32)
    return -kl_coef * kl + scores.astype(jnp.float32)[:, None] * at_last, kl


class KLControllerState(NamedTuple):
    """The adaptive KL coefficient ``beta`` (a float32 scalar), a pytree for the train state."""

    kl_coef: jax.Array


def kl_controller_init(kl_coef: float) -> KLControllerState:
    """The controller's start: ``beta = kl_coef`` (Ziegler et al. start at 0.1 or 0.2)."""
    if kl_coef < 0:
        raise ValueError(f"kl_coef={kl_coef} must be non-negative.")
    return KLControllerState(jnp.asarray(kl_coef, jnp.float32))


def kl_controller_update(
    state: KLControllerState,
    kl: jax.Array | float,
    num_steps: jax.Array | int,
    *,
    target: float,
    horizon: float,
) -> KLControllerState:
    """One step of Ziegler et al.'s proportional controller of ``beta``.

    ::

        e      = clip(KL / target - 1, -0.2, 0.2)
        beta  <- beta * (1 + e * num_steps / horizon)

    (Ziegler et al. 2019, eq. 3; ``num_steps`` is the number of samples (TRL: the batch size)
    since the last update). ``beta`` rises while the measured KL is above ``target`` and falls
    below it, by at most 20% per ``horizon`` samples.

    Args:
        state: The current `KLControllerState`.
        kl: The measured KL to the reference (mean per sequence).
        num_steps: Samples since the last update.
        target: The KL to hold (e.g. 6 nats).
        horizon: The samples over which the error is corrected (e.g. 10,000).

    Returns:
        The new state.

    >>> s = kl_controller_update(kl_controller_init(0.1), 12.0, 100, target=6.0, horizon=1000)
    >>> round(float(s.kl_coef), 6)  # error clipped to 0.2: 0.1 * (1 + 0.2 * 0.1)
    0.102
    """
    if target <= 0 or horizon <= 0:
        raise ValueError(f"target={target} and horizon={horizon} must be positive.")
    error = jnp.clip(jnp.asarray(kl, jnp.float32) / target - 1.0, -0.2, 0.2)
    mult = 1.0 + error * jnp.asarray(num_steps, jnp.float32) / horizon
    return KLControllerState(state.kl_coef * mult)
