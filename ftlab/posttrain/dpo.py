"""Direct preference optimisation: one train step for DPO, IPO and SimPO, with any method.

A batch holds ``B`` preference pairs as token rows, the prompt followed by each response::

    chosen_input_ids, chosen_attention_mask, chosen_loss_mask           [B, seq]
    rejected_input_ids, rejected_attention_mask, rejected_loss_mask     [B, seq]
    reference_chosen, reference_rejected                                 [B] (optional)

``*_loss_mask`` is 1 on the response tokens (the ones scored). Both sides share one ``seq`` (pad
the shorter); the step runs them as one ``[2B, seq]`` batch, so the model is applied once for the
policy and once for the reference.

The reference policy is the starting model, in one of two ways, never both:

- **Method off** (``base_apply`` given): the base model's apply on the frozen leaves alone
  (``state.frozen``), the same weights the method wraps, so no second copy of the model is held.
  Exact for methods that only add leaves and freeze the base (LoRA, DoRA, IA3, prompt and prefix
  tuning, adapters, ReFT), see `ftlab.posttrain.logprobs.policy_and_reference`.
- **Precomputed** (``reference_chosen`` / ``reference_rejected`` in the batch): the reference
  log-probs computed once before training with `reference_logprobs` (full fine-tuning, where the
  base leaves themselves are trained).

The step differentiates only the policy: the reference is computed outside the gradient and fed to
`ftlab.core.train.make_train_step`'s loss as data, so gradient accumulation and multi-device
steps work as for any other loss.

Log-probabilities are summed over a response's tokens for DPO and averaged (per token) for IPO
and SimPO, as TRL does (Azar et al. and Meng et al. normalise by length).

References:
    Rafailov et al., "Direct Preference Optimization", https://arxiv.org/abs/2305.18290
    Azar et al., "A General Theoretical Paradigm to Understand Learning from Human Preferences"
    (IPO), https://arxiv.org/abs/2310.12036
    Meng et al., "SimPO: Simple Preference Optimization with a Reference-Free Reward",
    https://arxiv.org/abs/2405.14734
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from ftlab.core import train
from ftlab.posttrain import logprobs, losses
from ftlab.types import Params

__all__ = [
    "LOSSES",
    "averages",
    "make_dpo_loss",
    "make_dpo_step",
    "pair_batch",
    "reference_logprobs",
]

# loss name -> whether its log-probs are averaged over the response tokens (else summed)
LOSSES = {"sigmoid": False, "ipo": True, "simpo": True}
_SIDES = ("chosen", "rejected")
_ROW_KEYS = ("input_ids", "attention_mask", "loss_mask")
_REFERENCE_KEYS = ("reference_chosen", "reference_rejected")


def averages(loss: str) -> bool:
    """Whether ``loss`` scores responses by mean (True) or summed (False) token log-prob.

    >>> averages("sigmoid"), averages("simpo")
    (False, True)
    """
    if loss not in LOSSES:
        raise ValueError(f"loss={loss!r}; expected one of {sorted(LOSSES)}.")
    return LOSSES[loss]


def pair_batch(batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """The ``[2B, seq]`` model batch of a pair batch: chosen rows, then rejected rows.

    Returns ``input_ids``, ``attention_mask``, and ``targets`` / ``weights`` from
    `logprobs.next_token_targets` of each side's ``loss_mask``.

    Raises:
        ValueError: a key is missing, or the two sides' shapes differ.
    """
    missing = [f"{s}_{k}" for s in _SIDES for k in _ROW_KEYS if f"{s}_{k}" not in batch]
    if missing:
        raise ValueError(
            f"the pair batch has no {missing}; it needs chosen_/rejected_ input_ids, "
            f"attention_mask and loss_mask (keys: {sorted(batch)})."
        )
    shapes = {f"{s}_{k}": jnp.shape(batch[f"{s}_{k}"]) for s in _SIDES for k in _ROW_KEYS}
    if len(set(shapes.values())) > 1:
        raise ValueError(
            f"the pair batch's rows differ in shape: {shapes}; pad chosen and rejected rows to "
            "one [batch, seq]."
        )
    ids = jnp.concatenate([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    attention = jnp.concatenate([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    loss_mask = jnp.concatenate([batch["chosen_loss_mask"], batch["rejected_loss_mask"]])
    targets, weights = logprobs.next_token_targets(ids, loss_mask)
    return {"input_ids": ids, "attention_mask": attention, "targets": targets, "weights": weights}


def _side_logprobs(apply, params, batch, *, average: bool) -> tuple[jax.Array, jax.Array]:
    rows = pair_batch(batch)
    lp = logprobs.sequence_logprobs(
        apply(params, rows), rows["targets"], rows["weights"], average=average
    )
    half = lp.shape[0] // 2
    return lp[:half], lp[half:]


def reference_logprobs(
    base_apply: logprobs.LogitsFn,
    params: Params,
    batch: Mapping[str, jax.Array],
    *,
    loss: str = "sigmoid",
) -> dict[str, jax.Array]:
    """``{"reference_chosen", "reference_rejected"}`` ``[B]`` log-probs of a pair batch.

    Compute them once with the starting parameters before training (jit it) and add them to
    the batch; needed for full fine-tuning, optional otherwise. ``loss`` decides summed or
    averaged log-probs (`averages`), and must be the step's.

    Args:
        base_apply: ``(params, batch) -> logits`` of the starting model.
        params: The starting parameters.
        batch: A pair batch (module docstring).
        loss: The step's loss name.
    """
    chosen, rejected = _side_logprobs(base_apply, params, batch, average=averages(loss))
    return {"reference_chosen": chosen, "reference_rejected": rejected}


def make_dpo_loss(
    policy_apply: logprobs.LogitsFn,
    *,
    loss: str = "sigmoid",
    beta: float | None = None,
    label_smoothing: float = 0.0,
    gamma: float = 1.0,
) -> train.LossFn:
    """``loss_fn(params, batch, rng) -> (loss, aux)`` of `ftlab.core.train` for preference pairs.

    The batch must hold the reference log-probs (``reference_chosen`` / ``reference_rejected``)
    unless ``loss="simpo"``, which has no reference and must not be given one. `make_dpo_step`
    fills them from the frozen base.

    Args:
        policy_apply: ``(params, batch) -> logits`` [batch, seq, vocab] with the method on.
        loss: ``"sigmoid"`` (DPO, `losses.dpo_loss`), ``"ipo"`` (`losses.ipo_loss`) or
            ``"simpo"`` (`losses.simpo_loss`).
        beta: The loss's beta; None takes its default (0.1 for DPO and IPO, 2.0 for SimPO).
        label_smoothing: cDPO's flip rate (``"sigmoid"`` and ``"simpo"``).
        gamma: SimPO's target margin (``"simpo"`` only).

    Returns:
        The loss function; aux: ``rewards/chosen``, ``rewards/rejected`` (mean implicit reward
        ``beta * (log pi - log ref)``, SimPO: ``beta * log pi``), ``rewards/margin`` (their
        mean difference), ``rewards/accuracy`` (share of pairs with chosen above rejected) and
        ``logps/chosen``, ``logps/rejected`` (mean policy log-probs).

    Raises:
        ValueError: an unknown ``loss``, or an option the loss does not take (label smoothing
            with IPO, ``gamma`` other than 1.0 without SimPO).
    """
    average = averages(loss)
    if loss == "ipo" and label_smoothing:
        raise ValueError(f"label_smoothing={label_smoothing} has no effect on loss='ipo'.")
    if loss != "simpo" and gamma != 1.0:
        raise ValueError(f"gamma={gamma} is SimPO's margin; it has no effect on loss={loss!r}.")
    if beta is None:
        beta = 2.0 if loss == "simpo" else 0.1

    def loss_fn(params, batch, rng):
        del rng
        chosen, rejected = _side_logprobs(policy_apply, params, batch, average=average)
        given = [k for k in _REFERENCE_KEYS if k in batch]
        if loss == "simpo":
            if given:
                raise ValueError(
                    f"loss='simpo' is reference-free; the batch's {given} would have no effect."
                )
            per_pair = losses.simpo_loss(
                chosen, rejected, beta=beta, gamma=gamma, label_smoothing=label_smoothing
            )
            r_chosen, r_rejected = beta * chosen, beta * rejected
        else:
            if len(given) < 2:
                raise ValueError(
                    f"loss={loss!r} needs the reference log-probs {list(_REFERENCE_KEYS)} in the "
                    f"batch (keys: {sorted(batch)}): give make_dpo_step a base_apply, or add "
                    "reference_logprobs(...) to the data."
                )
            ref_c, ref_r = batch["reference_chosen"], batch["reference_rejected"]
            ref_c, ref_r = jax.lax.stop_gradient(ref_c), jax.lax.stop_gradient(ref_r)
            if loss == "sigmoid":
                per_pair = losses.dpo_loss(
                    chosen, rejected, ref_c, ref_r, beta=beta, label_smoothing=label_smoothing
                )
            else:
                per_pair = losses.ipo_loss(chosen, rejected, ref_c, ref_r, beta=beta)
            r_chosen = losses.dpo_rewards(chosen, ref_c, beta=beta)
            r_rejected = losses.dpo_rewards(rejected, ref_r, beta=beta)
        r_chosen, r_rejected = jax.lax.stop_gradient((r_chosen, r_rejected))
        aux = {
            "rewards/chosen": jnp.mean(r_chosen),
            "rewards/rejected": jnp.mean(r_rejected),
            "rewards/margin": jnp.mean(r_chosen - r_rejected),
            "rewards/accuracy": jnp.mean((r_chosen > r_rejected).astype(jnp.float32)),
            "logps/chosen": jnp.mean(jax.lax.stop_gradient(chosen)),
            "logps/rejected": jnp.mean(jax.lax.stop_gradient(rejected)),
        }
        return jnp.mean(per_pair), aux

    return loss_fn


def make_dpo_step(
    policy_apply: logprobs.LogitsFn,
    tx: optax.GradientTransformation,
    *,
    base_apply: logprobs.LogitsFn | None = None,
    loss: str = "sigmoid",
    beta: float | None = None,
    label_smoothing: float = 0.0,
    gamma: float = 1.0,
    accumulate: int = 1,
    axis_name: str | None = None,
) -> Callable[[train.TrainState, Mapping[str, jax.Array]], tuple[train.TrainState, dict]]:
    """``step(state, batch) -> (state, metrics)`` of DPO / IPO / SimPO on preference pairs.

    With ``base_apply`` the reference log-probs are ``base_apply(state.frozen, ...)``: the model
    with the method switched off, computed without a gradient before the policy's forward pass.
    Without it they must be in the batch (`reference_logprobs`), except for SimPO, which has
    none. Jit the step with the state donated, as any `ftlab.core.train` step.

    Args:
        policy_apply: ``(params, batch) -> logits`` with the method on (e.g. wrapped by
            `ftlab.peft.lora.wrap_apply`); ``batch`` holds ``input_ids`` and ``attention_mask``.
        tx: The optimizer over ``state.trainable``.
        base_apply: ``(params, batch) -> logits`` of the base model (the function the method
            wrapped), or None for precomputed reference log-probs.
        loss: ``"sigmoid"``, ``"ipo"`` or ``"simpo"`` (`make_dpo_loss`).
        beta: See `make_dpo_loss`.
        label_smoothing: See `make_dpo_loss`.
        gamma: See `make_dpo_loss`.
        accumulate: Micro-batches per update (`train.make_train_step`).
        axis_name: The `jax.pmap` axis, or None under `jax.jit`.

    Returns:
        The step. Metrics: ``train/loss``, ``train/grad_norm`` and ``train/<aux>`` of
        `make_dpo_loss`.

    Raises:
        ValueError: ``base_apply`` with ``loss="simpo"`` (it would have no effect); at trace
            time, a ``base_apply`` on a state without frozen leaves (full fine-tuning: there is
            no base left to switch to; precompute the reference), a batch that holds reference
            log-probs as well as a ``base_apply``, or one with neither.
    """
    if loss == "simpo" and base_apply is not None:
        raise ValueError("loss='simpo' is reference-free; base_apply would have no effect.")
    inner = train.make_train_step(
        make_dpo_loss(
            policy_apply, loss=loss, beta=beta, label_smoothing=label_smoothing, gamma=gamma
        ),
        tx,
        accumulate=accumulate,
        axis_name=axis_name,
    )

    def step(state: train.TrainState, batch: Mapping[str, jax.Array]):
        if base_apply is not None:
            given = [k for k in _REFERENCE_KEYS if k in batch]
            if given:
                raise ValueError(
                    f"the batch holds {given} and make_dpo_step has a base_apply: one reference "
                    "would be ignored; drop one of them."
                )
            if not jax.tree.leaves(state.frozen):
                raise ValueError(
                    "make_dpo_step: base_apply needs the frozen base, but state.frozen has no "
                    "leaves (full fine-tuning); pass base_apply=None and add "
                    "reference_logprobs(...) of the starting parameters to the batch."
                )
            frozen = jax.lax.stop_gradient(state.frozen)
            reference = reference_logprobs(base_apply, frozen, batch, loss=loss)
            batch = {**batch, **jax.lax.stop_gradient(reference)}
        return inner(state, batch)

    return step
