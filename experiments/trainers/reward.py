"""A reward model from human ratings: Bradley-Terry on pairs of rated movie snippets.

Hutto & Gilbert's 10,605 Rotten Tomatoes snippets carry the mean sentiment of about 19 raters
each (`ftlab.data.ratings`). The reward model is a pretrained network with a scalar head on its
pooled final hidden states (`experiments.scorers`): MiniLM (``config.model.backbone``
``minilm``/``tiny``, pooling ``mean``/``cls``) or SmolLM2's last real token (``smollm2``/
``tiny_llama``, pooling ``last``/``mean``). Any method of `models.add_method`
(``config.peft.method``) composes with it, and ``config.partition.rules`` decides what trains
(the head is ``head/...`` for every backbone).

The loss is Bradley-Terry, ``-log sigmoid(r_chosen - r_rejected - margin)`` with ``margin =
config.loss.margin_scale * (mean_chosen - mean_rejected)`` (Llama 2's margin; 0: none), over
pairs of training-split snippets whose means differ by at least ``config.data.min_difference``.
``config.data.pairing`` says which pairs a step sees, always a pure function of the step (a
resumed run sees the pairs it would have seen):

    sampled   ``config.optim.batch_size`` pairs drawn uniformly among all such pairs
              (`ratings.pairs`, seeded by the step): 2 x batch_size rows per step.
    in_batch  ``config.optim.batch_size`` snippets (passes over a fresh permutation per epoch,
              `batching.train_batch`) and every such pair among them, the loss averaged over
              the pairs: InstructGPT's "all K choose 2 comparisons" of one batch element, so
              each forward pass serves many comparisons.

Evaluation on held-out snippets (the test split, each snippet on the side of ftlab's Rotten
Tomatoes split where its text lies): Pearson and Spearman correlation of the rewards with the
mean human rating and the pairwise accuracy over every pair whose means differ by at least
``config.evals.min_difference``, beside VADER's compound score and one human rater (a random
rater per snippet, against the mean of the others: `ratings.held_out_rater`) on the same
snippets, all computed in the run. The validation split is scored during training.

Writes into the workdir: ``results.json``, ``results.md`` (the table), ``reward_vs_rating.png``
(test rewards and VADER scores against the mean rating), ``training.png`` (the loss and the
validation correlation against the step), with ``config.plot_metrics`` ``train.png``/``eval.png``
(every metric of metrics.jsonl), ``scores.npz`` (the test scores), checkpoints and metrics.jsonl.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from experiments import data as data_lib
from experiments import loop, models, reports, scorers
from ftlab.core import metrics as metrics_lib
from ftlab.core import parallel, partition, train
from ftlab.data import batching, ratings
from ftlab.posttrain import losses
from ftlab.posttrain import metrics as agreement_lib

# -- data -----------------------------------------------------------------------------------------


def pair_seed(seed: int, step: int) -> int:
    """The seed of ``step``'s pairs: a pure function of (seed, step)."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1)[0])


def pairs_at(config: ml_collections.ConfigDict, mean: np.ndarray, step: int):
    """``(chosen, rejected, margin)`` of ``step``: indices into ``mean`` and float32 margins."""
    chosen, rejected = ratings.pairs(
        mean,
        min_difference=config.data.min_difference,
        num_pairs=config.optim.batch_size,
        seed=pair_seed(config.data.seed, step),
    )
    margin = config.loss.margin_scale * (mean[chosen] - mean[rejected])
    return chosen, rejected, margin.astype(np.float32)


# -- training -------------------------------------------------------------------------------------


def make_in_batch_loss_fn(apply, *, min_difference: float, margin_scale: float):
    """Bradley-Terry over every pair of the batch's snippets whose means differ enough."""

    def loss_fn(params, batch, rng):
        r = apply(
            params,
            {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]},
            rng,
        )
        mean = batch["mean"]
        # pair (i, j): i chosen over j
        diff = mean[:, None] - mean[None, :]
        weight = (diff >= min_difference).astype(jnp.float32)
        per_pair = losses.bradley_terry_loss(
            jnp.broadcast_to(r[:, None], diff.shape),
            jnp.broadcast_to(r[None, :], diff.shape),
            margin=margin_scale * diff,
        )
        count = jnp.maximum(jnp.sum(weight), 1.0)
        right = (r[:, None] > r[None, :]).astype(jnp.float32)
        return jnp.sum(per_pair * weight) / count, {
            "accuracy": jnp.sum(right * weight) / count,
            "pairs": jnp.sum(weight),
        }

    return loss_fn


def make_loss_fn(apply):
    """Bradley-Terry over a batch of pairs; chosen and rejected go through one forward pass."""

    def loss_fn(params, batch, rng):
        ids = jnp.concatenate([batch["chosen_ids"], batch["rejected_ids"]], axis=0)
        mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]], axis=0)
        r = apply(params, {"input_ids": ids, "attention_mask": mask}, rng)
        n = batch["margin"].shape[0]
        chosen, rejected = r[:n], r[n:]
        loss = jnp.mean(losses.bradley_terry_loss(chosen, rejected, margin=batch["margin"]))
        return loss, {
            "accuracy": jnp.mean((chosen > rejected).astype(jnp.float32)),
            "reward_gap": jnp.mean(chosen - rejected),
        }

    return loss_fn


# -- evaluation -----------------------------------------------------------------------------------


def make_scorer_step(plan: parallel.Plan, apply):
    """``scores(state, host batch) -> [rows]`` numpy rewards, data parallel over ``plan``."""

    def fn(state, batch):
        return {"scores": apply(state.params, batch, None)}

    if plan.mode == "pmap":
        pfn = jax.pmap(fn, axis_name=parallel.DATA_AXIS)
        return lambda state, batch: np.asarray(pfn(state, plan.put_batch(batch))["scores"]).reshape(
            -1
        )
    step = plan.compile_eval_step(fn)
    return lambda state, batch: np.asarray(
        jax.device_get(step(state, plan.put_batch(batch)))["scores"]
    )


def score_rows(scores_step, state, arrays, *, batch_size: int) -> np.ndarray:
    """Rewards of every row of ``arrays`` in order (the padded tail of the last batch dropped)."""
    out = []
    for batch in batching.eval_batches(arrays, batch_size=batch_size):
        real = int(batch.pop("mask").sum())
        out.append(scores_step(state, batch)[:real])
    return np.concatenate(out)


def agreement(scores, mean, *, min_difference: float) -> dict[str, float]:
    """Pearson, Spearman, pairwise accuracy of ``scores`` against ``mean`` (`metrics.agreement`)."""
    return agreement_lib.agreement(scores, mean, min_difference=min_difference)


# -- main -----------------------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains the reward model, evaluates it against VADER and a human rater, writes ``workdir``.

    Resumes from the workdir's newest checkpoint. Returns the results (also results.json).
    """
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    plan = loop.plan_from(config)
    plan.check_batch_size(config.optim.batch_size, what="config.optim.batch_size")
    plan.check_batch_size(config.evals.batch_size, what="config.evals.batch_size")

    # -- data -------------------------------------------------------------------------------
    snippets, splits = data_lib.rated_movies(config)
    logging.info("movie snippets: %s", {k: len(v) for k, v in splits.items()})
    scorer = scorers.build_scorer(config, [snippets.text[i] for i in splits["train"]])
    arrays = {name: scorer.encode([snippets.text[i] for i in idx]) for name, idx in splits.items()}
    train_mean = snippets.mean[splits["train"]]
    # snippets that fill every position (cut there, or exactly that long)
    truncated = sum(int(np.sum(a["attention_mask"][:, -1])) for a in arrays.values())
    logging.info("snippets at config.data.max_length=%d: %d", config.data.max_length, truncated)

    # -- model, partition, optimizer --------------------------------------------------------
    rules = [tuple(r) for r in config.partition.rules]
    label_tree, n_trainable = models.partition_of(
        scorer.params, rules, what="config.partition.rules"
    )
    tx = models.adamw(config, label_tree)
    state = train.init_state(scorer.params, label_tree, tx, seed=config.seed)
    axis = models.axis_name(plan)
    scores_step = make_scorer_step(plan, scorer.apply)
    e = config.evals

    def evaluate(state, split):
        s = score_rows(scores_step, state, arrays[split], batch_size=e.batch_size)
        return s, agreement(s, snippets.mean[splits[split]], min_difference=e.min_difference)

    evaluators = [
        loop.Evaluator(
            "validation",
            lambda s: {f"eval/validation/{k}": v for k, v in evaluate(s, "validation")[1].items()},
            every_steps=e.every_steps,
        )
    ]

    # -- loop -------------------------------------------------------------------------------
    train_arrays = arrays["train"]

    def sampled_batch_at(step):
        chosen, rejected, margin = pairs_at(config, train_mean, step)
        return {
            "chosen_ids": train_arrays["input_ids"][chosen],
            "chosen_mask": train_arrays["attention_mask"][chosen],
            "rejected_ids": train_arrays["input_ids"][rejected],
            "rejected_mask": train_arrays["attention_mask"][rejected],
            "margin": margin,
        }

    if config.data.pairing == "sampled":
        batch_at, loss_fn = sampled_batch_at, make_loss_fn(scorer.apply)
    elif config.data.pairing == "in_batch":
        if plan.mode == "pmap":  # each device would pair its own rows only
            raise ValueError(
                "config.data.pairing='in_batch' pairs rows across the whole batch, which "
                "config.parallel.mode='pmap' splits per device; use mode='mesh'"
            )
        with_mean = {**train_arrays, "mean": train_mean.astype(np.float32)}

        def batch_at(step):
            return batching.train_batch(
                with_mean, step, batch_size=config.optim.batch_size, seed=config.data.seed
            )

        loss_fn = make_in_batch_loss_fn(
            scorer.apply,
            min_difference=config.data.min_difference,
            margin_scale=config.loss.margin_scale,
        )
    else:
        raise ValueError(
            f"config.data.pairing={config.data.pairing!r}; expected 'sampled' or 'in_batch'"
        )
    run = loop.train(
        config,
        workdir,
        plan=plan,
        state=state,
        step_fn=train.make_train_step(loss_fn, tx, axis_name=axis),
        batch_at=batch_at,
        evaluators=evaluators,
    )
    if not run.finished:
        return {"step": run.step}

    # -- final evaluation: the reward model, VADER and one rater on the same test snippets ---
    test = splits["test"]
    mean = snippets.mean[test]
    test_scores, model_row = evaluate(run.state, "test")
    _, validation_row = evaluate(run.state, "validation")
    vader = ratings.vader_scores([snippets.text[i] for i in test])
    one, others = ratings.held_out_rater(snippets, seed=e.rater_seed)
    kw = {"min_difference": e.min_difference}
    method = config.method
    rows = [
        {"scorer": f"reward model ({config.model.backbone}, {method})", **model_row},
        {"scorer": "VADER (compound score)", **agreement(vader, mean, **kw)},
        {
            "scorer": "one human rater vs the others' mean",
            **agreement(one[test], others[test], **kw),
        },
    ]
    results = {
        "step": run.step,
        "backbone": config.model.backbone,
        "method": method,
        "num_test": int(len(test)),
        "num_train": int(len(splits["train"])),
        **{f"eval/test/{k}": v for k, v in model_row.items()},
        **{f"eval/validation/{k}": v for k, v in validation_row.items()},
        "vader": rows[1],
        "human_rater": rows[2],
        "rows": rows,
        "trainable_params": n_trainable,
        "total_params": partition.count(scorer.params),
        "snippets_at_max_length": truncated,
    }
    markdown = reports.reward_table(rows, n_test=len(test), min_difference=e.min_difference)
    title = f"{config.model.backbone} reward model, {method}, {run.step} steps"
    figures = {
        "reward_vs_rating.png": lambda: reports.reward_plot(test_scores, vader, mean, title=title),
        "training.png": lambda: reports.reward_training_plot(
            metrics_lib.read_jsonl(workdir / "metrics.jsonl")
        ),
    }
    # with config.plot_metrics, every metric's curve (seconds of drawing)
    curves = "" if config.plot_metrics else None
    results = run.finish(results, table=markdown, figures=figures, curves=curves)
    if run.is_chief:
        np.savez(workdir / "scores.npz", reward=test_scores, vader=vader, mean=mean, index=test)
        logging.info("reward model vs VADER vs a human rater:\n%s", markdown)
    return results
