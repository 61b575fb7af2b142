"""Text classification on a BERT encoder: full fine-tuning, linear probing, BitFit, ... by rules.

Every method is the same loop; ``config.partition.rules`` decides what trains.
"""

from __future__ import annotations

import pathlib

import ml_collections
import numpy as np
from absl import logging

from experiments import data as data_lib
from experiments import evaluation, features, loop, models
from ftlab.core import parallel, partition, train
from ftlab.data import batching
from ftlab.tasks import classification


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains, evaluates and checkpoints into ``workdir``; resumes from its latest checkpoint.

    Returns:
      The final metrics, also written to ``workdir/results.json``.
    """
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    is_chief = loop.is_chief()
    plan = loop.plan_from(config)
    plan.check_batch_size(config.optim.batch_size, what="config.optim.batch_size")
    plan.check_batch_size(config.evals.batch_size, what="config.evals.batch_size")

    # -- data -------------------------------------------------------------------------------
    data = data_lib.build(config)
    n_train = len(data["train"]["label"])
    logging.info("data: %s", {k: len(v["label"]) for k, v in data.items()})

    # -- model, partition, optimizer --------------------------------------------------------
    # The classifier, its apply and its PEFT method are `experiments.models`' (multitask's too).
    model, params = models.encoder_classifier(config)
    n_base = partition.count(params)
    sites = None
    if config.peft.method in models.STRUCTURAL:
        sites = models.encoder_sites(config, params, models.classifier_apply(model))
    params, apply = models.encoder_method(
        config, params, models.classifier_apply(model), sites=sites
    )
    rules = [tuple(r) for r in config.partition.rules]
    label_tree, n_trainable = models.partition_of(params, rules, what="config.partition.rules")
    tx = models.adamw(config, label_tree)
    policy = loop.step_policy(config)
    state = train.init_state(params, label_tree, tx, seed=config.seed, precision=policy.precision)

    # -- cached features: the head's inputs, when the trunk below it is frozen and fixed ------
    data, apply = features.for_head(
        config, model, params, label_tree, data, apply, workdir, is_chief=is_chief
    )

    # -- evaluators -------------------------------------------------------------------------
    axis = parallel.DATA_AXIS if plan.mode == "pmap" else None
    eval_step = plan.compile_eval_step(
        policy.eval_step(classification.make_eval_fn(apply), axis_name=axis)
    )

    on = dict(eval_step=eval_step, plan=plan, data=data, batch_size=config.evals.batch_size)
    run_eval = {s: evaluation.split_evaluator(None)(split=s, **on) for s in ("validation", "test")}
    evaluators = [
        loop.Evaluator("validation", run_eval["validation"], every_steps=config.evals.every_steps),
        *loop.from_config(
            config.evals.get("plugins"), types=evaluation.CLASSIFICATION_PLUGINS, **on
        ),
    ]

    # -- loop -------------------------------------------------------------------------------
    # A run may stop early (config.max_steps_per_run, e.g. to fit a job's time limit); running
    # the same command again resumes from the checkpoint written at the stop.
    logging.info("%d steps per epoch", batching.steps_per_epoch(n_train, config.optim.batch_size))
    run = loop.train(
        config,
        workdir,
        plan=plan,
        state=state,
        step_fn=policy.train_step(classification.make_loss_fn(apply), tx, axis_name=axis),
        batch_at=lambda step: batching.train_batch(
            data["train"], step, batch_size=config.optim.batch_size, seed=config.data.seed
        ),
        evaluators=evaluators,
    )
    if not run.finished:
        return {"step": run.step}
    total, state = run.step, run.state

    # -- final evaluation -------------------------------------------------------------------
    results = {"step": total, **run_eval["validation"](state), **run_eval["test"](state)}
    results["trainable_params"] = n_trainable
    results["total_params"] = partition.count(params)
    results["base_params"] = n_base
    # The most frequent class's share (any number of classes; a user's file may have more).
    results["majority_baseline/test"] = float(
        np.bincount(data["test"]["label"]).max() / len(data["test"]["label"])
    )
    if run.is_chief:
        run.checkpointer.wait_until_finished()
        final = plan.get_state(state)
        results.update(
            models.save_method(config, final.trainable, final.frozen, workdir, sites=sites)
        )
    return run.finish(results)
