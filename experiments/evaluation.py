"""Evaluations several trainers share: exact sums over a split's batches (classification,
SFT), fine-tuning trajectories on held-out tasks, and their summary (mean and 95% interval per
number of steps); and the evaluator plugins of `experiments.loop` (``config.evals.plugins``) that
are not one trainer's own: a classifier's metrics on a split (``classification``, ``accuracy``,
``loss``), and a tuned decoder's zero-shot label accuracy, label-word loss and greedy generation
(``label_accuracy``, ``label_loss``, ``generation``).

The meta-learning trainer (``meta``, both task families) evaluates an initialisation this way
(``held_out_adaptation``, its plugins ``finetune_mse`` and ``finetune_accuracy``): fine-tune it
on each held-out task's support set with single `ftlab.meta.adapt` steps and measure it on the
query set before every step and after the last.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from experiments import loop
from ftlab import generation, icl, meta
from ftlab.core import report
from ftlab.data import batching
from ftlab.models import llama

__all__ = [
    "CLASSIFICATION_PLUGINS",
    "DECODER_PLUGINS",
    "adapt_trajectory",
    "batch_sums",
    "generation_match",
    "held_out_adaptation",
    "label_accuracy",
    "label_loss",
    "split_evaluator",
    "steps_summary",
]


def batch_sums(plan, eval_step, state, arrays: Mapping, *, batch_size: int) -> dict[str, float]:
    """Each sum ``eval_step(state, batch)`` returns, added up over ``arrays`` in batches.

    ``eval_step`` (compiled by ``plan``) returns sums over a batch's real rows (the padding of
    the last batch masked out, `ftlab.data.batching.eval_batches`), so a mean divided out of
    them is exact whatever the batch size or device count.
    """
    totals: dict[str, float] = {}
    for batch in batching.eval_batches(arrays, batch_size=batch_size):
        for k, v in jax.device_get(eval_step(state, plan.put_batch(batch))).items():
            totals[k] = totals.get(k, 0.0) + float(v)
    return totals


def adapt_trajectory(
    measure: Callable[[object, Mapping], object], loss_fn: Callable, *, rules, num_steps: int
) -> Callable:
    """``trajectories(params, inner_lr, tasks) -> measure after 0, 1, ..., num_steps steps``.

    Per task (a `jax.vmap` over the leading axis of ``tasks``), one `jax.lax.scan` of single
    `ftlab.meta.adapt` steps on ``task["support"]``, so all step counts come from one
    compiled loop; ``measure(params, task)`` (a pytree of arrays) is stacked along a new axis
    of ``num_steps + 1`` after the task axis. Compiled with `jax.jit`.
    """

    def trajectory(params, inner_lr, task):
        def step(p, _):
            out = measure(p, task)
            p = meta.adapt(
                p, task["support"], loss_fn=loss_fn, inner_lr=inner_lr, num_steps=1, rules=rules
            )
            return p, out

        last, outs = jax.lax.scan(step, params, None, length=num_steps)
        return jax.tree.map(lambda a, b: jnp.concatenate([a, b[None]]), outs, measure(last, task))

    return jax.jit(jax.vmap(trajectory, in_axes=(None, None, 0)))


def steps_summary(values: np.ndarray, steps: Iterable[int], name: str) -> dict[str, float]:
    """``eval/<name>_step_<k>`` and its 95% half-width ``..._ci95`` for k in 0 and ``steps``.

    ``values``: ``[tasks, max steps + 1]``, the metric of each task after 0, 1, ... steps.
    """
    out = {}
    for k in sorted({0, *steps}):
        key = f"eval/{name}_step_{k}"
        out[key], out[f"{key}_ci95"] = report.interval95(values[:, k])
    return out


@loop.register("finetune_mse")
@loop.register("finetune_accuracy")
def held_out_adaptation(*, num_tasks=None, num_steps=None, metric=None, config, family, plan):
    """``evaluate(state) -> {eval/<metric>_step_<k>: query metric}`` of held-out tasks.

    ``num_tasks`` tasks (default ``config.evals.num_tasks``), the state's network fine-tuned on
    each support set for ``k`` in ``num_steps`` (default ``config.evals.num_steps``) steps, all
    step counts from one compiled `adapt_trajectory`. The fine-tuning rules and step size are
    ``config.meta.method``'s (its inner rules and rate, Meta-SGD's learned rates), or for a
    baseline (any method not in `ftlab.meta.METHODS`) ``config.evals.finetune_rules`` and
    ``finetune_lr``. ``family`` (the meta trainer's task family) gives the held-out tasks, the
    losses, the ``measure`` and the default ``metric``. ``evaluate.full(state)``: the summary
    with 95% intervals, the tasks and the measure's extras (``[tasks, max steps + 1, ...]``).
    """
    e, method = config.evals, config.meta.method
    steps = tuple(e.num_steps if num_steps is None else num_steps)
    num_tasks = e.num_tasks if num_tasks is None else num_tasks
    metric = family.metric if metric is None else metric
    if not steps or min(steps) < 0:
        raise ValueError(f"num_steps={steps!r}: expected fine-tuning step counts >= 0")
    if num_tasks < 1:
        raise ValueError(f"num_tasks={num_tasks!r}: expected >= 1")
    baseline = method not in meta.METHODS
    rules = tuple(e.finetune_rules) if baseline else meta.inner_rules(method)
    trajectories = adapt_trajectory(
        family.measure, family.adapt_loss, rules=rules, num_steps=max((*steps, *family.plot_steps))
    )

    def full(state):
        params, learned = meta.split_inner_lr(plan.get_state(state).params)
        # Fine-tuning step size: the baseline's, learned (Meta-SGD), or the inner lr.
        if baseline:
            params, lr = family.for_baseline(params), e.finetune_lr
        else:
            lr = learned if method == "metasgd" else config.meta.inner_lr
        tasks = family.held_out(num_tasks)
        outs = [
            jax.device_get(trajectories(params, lr, {"support": t["support"], "query": t["query"]}))
            for t in tasks
        ]
        values, extras = jax.tree.map(lambda *a: np.concatenate(a)[:num_tasks], *outs)
        return steps_summary(values, steps, metric), tasks, extras

    def evaluate(state):
        return {k: v for k, v in full(state)[0].items() if not k.endswith("_ci95")}

    evaluate.full = full
    return evaluate


# -- a classifier on a split -----------------------------------------------------------------


def _split_means(plan, eval_step, state, arrays, *, batch_size: int) -> dict[str, float]:
    """Exact means over a split of the sums ``eval_step`` returns with a ``count`` (padding
    masked out)."""
    totals = batch_sums(plan, eval_step, state, arrays, batch_size=batch_size)
    count = totals.pop("count")
    return {k: v / count for k, v in totals.items()}


def split_evaluator(metric: str | None):
    """A factory for `loop.register`: ``metric`` (None: all) of the classifier on a split."""

    def factory(*, split: str = "validation", eval_step, plan, data, batch_size):
        if split not in data:
            raise ValueError(f"split={split!r} is not one of {sorted(data)}")

        def run(state):
            results = _split_means(plan, eval_step, state, data[split], batch_size=batch_size)
            return {f"eval/{split}/{k}": v for k, v in results.items() if metric in (None, k)}

        return run

    return factory


# config.evals.plugins.<name> = dict(type="accuracy", split="test", every_steps=100), ...
CLASSIFICATION_PLUGINS = ("classification", "accuracy", "loss")
for _type, _metric in zip(CLASSIFICATION_PLUGINS, (None, "accuracy", "loss"), strict=True):
    loop.register(_type)(split_evaluator(_metric))


# -- a tuned decoder, scored after the zero-shot prompt (`ftlab.icl`) -------------------------

DECODER_PLUGINS = ("label_accuracy", "label_loss", "generation")


def _test_prompts(config, model, task, test, num_test):
    """The first ``num_test`` (default ``config.data.num_test``) test examples as zero-shot
    prompts: ids, mask, labels."""
    n = min(config.data.num_test if num_test is None else num_test, len(test.text))
    if n < 1:
        raise ValueError(f"num_test={num_test!r}: expected at least 1")
    ids, mask = icl.encode_prompts(
        model.tokenizer, task, test.text[:n], config.data.query_len, pad_id=model.pad_id
    )
    return ids, mask, np.asarray(test.label[:n])


@loop.register("label_accuracy")
def label_accuracy(*, num_test=None, config, model, task, test, params_of, wrap, to_plain):
    """``{"eval/accuracy"}``: the label word scored highest after the zero-shot prompt
    (`ftlab.icl.accuracy` with no demonstrations, as ICL scores), on the plain tree."""
    del wrap
    n = len(_test_prompts(config, model, task, test, num_test)[2])
    kw = dict(prefix_len=config.data.prefix_len, query_len=config.data.query_len,
              batch_size=config.data.eval_batch_size, pad_id=model.pad_id)  # fmt: skip

    def run(state):
        plain = to_plain(params_of(state))
        acc, _ = icl.accuracy(
            model.config, plain, model.tokenizer, task, [], test.text[:n], test.label[:n], **kw
        )
        return {"eval/accuracy": acc}

    return run


@loop.register("label_loss")
def label_loss(*, num_test=None, config, model, task, test, params_of, wrap, to_plain):
    """``{"eval/label_loss", "eval/label_accuracy"}``: the training loss (next-token
    cross-entropy of the label word) and its argmax accuracy, exact means over test prompts."""
    del to_plain
    ids, mask, labels = _test_prompts(config, model, task, test, num_test)
    label_ids = np.asarray(icl.label_token_ids(model.tokenizer, task))
    loss_fn = jax.jit(icl.label_word_loss(model.config, wrap))
    size = config.data.eval_batch_size

    def run(state):
        params, sums = params_of(state), np.zeros(2)
        for i in range(0, len(labels), size):
            b = labels[i : i + size]
            batch = {"input_ids": ids[i : i + size], "attention_mask": mask[i : i + size],
                     "target": label_ids[b], "label": b, "label_ids": label_ids}  # fmt: skip
            loss, aux = jax.device_get(loss_fn(params, batch, None))
            sums += len(b) * np.asarray([loss, aux["accuracy"]], np.float64)
        loss, acc = sums / len(labels)
        return {"eval/label_loss": float(loss), "eval/label_accuracy": float(acc)}

    return run


@loop.register("generation")
def generation_match(*, num_test=None, config, model, task, test, params_of, wrap, to_plain):
    """``{"eval/generation/exact_match", "eval/generation/label_word"}``: the share of greedy
    generations (`ftlab.generation`, one new token after the zero-shot prompt: every label word
    is one token) that are the true label word, and that are any label word."""
    del wrap
    ids, mask, labels = _test_prompts(config, model, task, test, num_test)
    label_ids = np.asarray(icl.label_token_ids(model.tokenizer, task))
    module, size = llama.LlamaForCausalLM(model.config), config.data.eval_batch_size

    def run(state):
        plain, new = to_plain(params_of(state)), []
        for i in range(0, len(labels), size):
            out = generation.generate(module, plain, ids[i : i + size], mask[i : i + size],
                                      max_new_tokens=1, eos_id=model.pad_id)  # fmt: skip
            new.append(np.asarray(out.tokens)[:, 0])
        new = np.concatenate(new)
        return {
            "eval/generation/exact_match": float(np.mean(new == label_ids[labels])),
            "eval/generation/label_word": float(np.mean(np.isin(new, label_ids))),
        }

    return run
