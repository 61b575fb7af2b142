"""Text classification on a BERT encoder: full fine-tuning, linear probing, BitFit, ... by rules.

Every method is the same loop; ``config.partition.rules`` decides what trains.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import inspect
import json
import pathlib
import resource
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from safetensors import numpy as safetensors_numpy

from experiments import loop, models
from ftlab.core import metrics as metrics_lib
from ftlab.core import parallel, partition, report, tensorfile, train
from ftlab.data import batching, features, files, rotten_tomatoes, text
from ftlab.models import attention, bert, hooks
from ftlab.peft import lora, prefix
from ftlab.tasks import classification
from third_party import hf, minilm, peft_format


def build_data(config: ml_collections.ConfigDict) -> dict[str, dict[str, np.ndarray]]:
    """Tokenized splits: ``{split: {"input_ids", "attention_mask", "label"}}`` as numpy."""
    if config.data.dataset == "files":
        return build_file_data(config)
    if config.data.dataset != "rotten_tomatoes":
        raise ValueError(
            f"config.data.dataset={config.data.dataset!r}; expected 'rotten_tomatoes' or 'files'"
        )
    splits = rotten_tomatoes.load(
        task=config.data.task, seed=config.data.seed, limit=config.data.limit or None
    )
    tokenizer = minilm.load_tokenizer(
        minilm.model_dir() / "tokenizer.json", max_length=config.data.max_length
    )
    return {
        name: {
            **text.encode(tokenizer, s.text, max_length=config.data.max_length),
            "label": s.label,
        }
        for name, s in splits.items()
    }


def read_file_splits(config: ml_collections.ConfigDict) -> dict[str, files.TextClassification]:
    """The user's train / validation / test files; a split without a file is carved from train.

    ``config.data.holdout_fraction`` of the training file's rows goes to each missing split, by
    a permutation seeded with ``config.data.seed``. Errors name the config key and the bad row.
    """
    d, num_classes = config.data, config.model.num_classes
    names = tuple(d.label_names) or None
    if not d.train:
        raise ValueError("config.data.train is empty; pass --config.data.train=FILE.")

    def read(key):
        try:
            return files.read_classification(
                d[key],
                text_column=d.text_column,
                label_column=d.label_column,
                label_names=names,
                num_classes=num_classes if d.integer_labels else None,
            )
        except (ValueError, FileNotFoundError) as e:
            raise ValueError(f"config.data.{key}={d[key]!r}: {e}") from e

    if d.integer_labels and names:
        raise ValueError(
            f"config.data.label_names={names} cannot take effect with config.data.integer_labels"
        )
    train = read("train")
    if train.label_names is not None:
        if len(train.label_names) != num_classes:
            raise ValueError(
                f"config.model.num_classes={num_classes}, but config.data.train has "
                f"{len(train.label_names)} labels {train.label_names}; set num_classes to match "
                "or list config.data.label_names"
            )
        names = train.label_names
    missing = [k for k in ("validation", "test") if not d[k]]
    splits = {k: read(k) for k in ("validation", "test") if d[k]}
    if missing:
        f = d.holdout_fraction
        fractions = {"train": 1 - f * len(missing), **{k: f for k in missing}}
        try:
            splits.update(files.seeded_split(train, fractions, seed=d.seed))
        except ValueError as e:
            raise ValueError(f"config.data.holdout_fraction={f}: {e}") from e
    else:
        splits["train"] = train
    limit = d.limit or None
    return {
        k: files.TextClassification(s.text[:limit], s.label[:limit], s.label_names)
        for k, s in splits.items()
    }


def build_file_data(config: ml_collections.ConfigDict) -> dict[str, dict[str, np.ndarray]]:
    """`read_file_splits`, tokenised with the checkpoint folder's own tokenizer."""
    if not config.model.path:
        raise ValueError("config.model.path is empty; pass --config.model.path=DIR (a folder).")
    tokenizer_files = hf.load_tokenizer(config.model.path)
    if tokenizer_files is None:
        raise ValueError(f"config.model.path={config.model.path!r} has no tokenizer.json")
    tokenizer = tokenizer_files.build(config.data.max_length)
    splits = read_file_splits(config)
    logging.info("labels (id order): %s", splits["train"].label_names or "integers")
    return {
        name: files.encode_classification(tokenizer, s, max_length=config.data.max_length)
        for name, s in splits.items()
    }


# The classifier and its apply function are shared with the multi-task trainer.
build_model = models.encoder_classifier
make_apply = models.classifier_apply


PEFT_METHODS = models.PEFT_METHODS
# Methods that attach through the model's hook sites (`ftlab.models.hooks`).
STRUCTURAL = ("adapters", "prompt", "prefix", "reft")


def method_sites(config: ml_collections.ConfigDict, params, apply) -> tuple[hooks.Site, ...]:
    """The model's hook sites (`hooks.discover`), traced on a one-row batch of the data's length."""
    ids = np.zeros((1, config.data.max_length), np.int32)
    return hooks.discover(
        apply, params, {"input_ids": ids, "attention_mask": np.ones_like(ids)}, None
    )


def build_method(config: ml_collections.ConfigDict, params, apply, *, sites=None):
    """Applies ``config.peft``'s tree transformation (`models.add_method`); returns ``(params,
    apply)``. ``sites``: the model's hook sites (`method_sites`), traced here when needed."""
    if config.peft.method in STRUCTURAL and sites is None:
        sites = method_sites(config, params, apply)
    rng = jax.random.PRNGKey(config.seed + 1)
    params, wrap = models.add_method(config.peft, config.peft.method, params, rng, sites=sites)
    return params, wrap(apply)


def save_method(
    config: ml_collections.ConfigDict, trainable, frozen, workdir: pathlib.Path, *, sites=None
) -> dict:
    """Writes the trained leaves alone (method leaves + head), not the frozen base.

    LoRA adapters are also exported in Hugging Face PEFT's format (``adapter_peft/``). Prefix
    tuning needs the model's hook ``sites`` (`method_sites`) to lay out its prefixes.
    """
    if config.peft.method == "none":
        return {}
    trainable = jax.device_get(trainable)
    if config.peft.method == "prefix":
        # Inference needs only the prefixes: evaluate the reparametrising MLP once, drop it.
        full = prefix.finalize(partition.merge(trainable, jax.device_get(frozen)), sites)
        trainable = partition.merge(prefix.adapter(full), {"head": trainable["head"]})
    path = workdir / "adapter.safetensors"
    safetensors_numpy.save_file(
        {k: np.asarray(v) for k, v in partition.flatten(trainable).items()},
        str(path),
        metadata={"peft": json.dumps(config.peft.to_dict())},
    )
    if config.peft.method == "lora":
        peft_format.export(
            workdir / "adapter_peft",
            lora.adapter(trainable),
            rank=config.peft.rank,
            alpha=config.peft.alpha,
            lora_dropout=config.peft.dropout,
        )
    return {"adapter_bytes": path.stat().st_size}


def build_optimizer(config: ml_collections.ConfigDict, label_tree) -> optax.GradientTransformation:
    """AdamW with linear warmup and cosine decay; no weight decay on biases and norms."""
    o = config.optim
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, o.lr, warmup_steps=o.warmup_steps, decay_steps=max(o.num_steps, o.warmup_steps + 1)
    )

    def tx():
        return optax.chain(
            optax.clip_by_global_norm(o.grad_clip_norm),
            optax.adamw(
                schedule,
                weight_decay=o.weight_decay,
                mask=lambda t: jax.tree.map(lambda x: np.ndim(x) > 1, t),
            ),
        )

    groups = set(partition.flatten(partition.trainable_labels(label_tree)).values())
    return partition.optimizer({g: tx() for g in groups}, label_tree)


# The head's inputs, cached in the workdir when the layers below the head are frozen and
# deterministic (`features_blocker`); one file, recomputed when its key changes.
FEATURES_FILE = "features.safetensors"


def features_blocker(config: ml_collections.ConfigDict, model, label_tree) -> str | None:
    """Why the head's inputs cannot be computed once for the whole run; None when they can.

    They can when nothing below the head trains (every trainable leaf is under ``head/``, no PEFT
    method wraps the model) and nothing below it is random in training (no dropout on the
    encoder's activations or attention probabilities, the same rate the head's input dropout
    uses): then the head sees the same inputs at every step as a forward pass would give it.
    """
    trainable = [
        name
        for name, label in partition.flatten(label_tree).items()
        if label != partition.FROZEN and not name.startswith("head/")
    ]
    if trainable:
        return f"config.partition.rules train leaves below the head, e.g. {trainable[0]}"
    if config.peft.method != "none":
        return f"config.peft.method={config.peft.method!r} changes the forward pass"
    if model.config.dropout_rate or model.config.probs_dropout_rate:
        return (
            f"dropout (config.model.dropout_rate={model.config.dropout_rate}, on attention "
            f"probabilities {model.config.probs_dropout_rate}) makes the encoder's outputs "
            "random in training"
        )
    return None


def make_head_input_fn(model: bert.BertClassifier):
    """``fn(params, batch) -> [batch, hidden]``: what the head receives, in evaluation mode.

    It runs the classifier itself and records the input of its ``head`` module, so the cut is
    exactly the head's input whatever the pooling does.
    """

    def fn(params, batch):
        seen = []

        def record(next_fun, args, kwargs, context):
            if context.module.name == "head" and context.method_name == "__call__":
                seen.append(args[0])
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(record):
            model.apply({"params": params}, batch["input_ids"], batch["attention_mask"])
        (head_input,) = seen
        return head_input

    return fn


def make_head_apply(model: bert.BertClassifier):
    """``apply(params, batch, rng) -> logits`` from ``batch["features"]`` (the head's inputs).

    The classifier's head as it is built there (float32 Dense); no dropout, as
    `features_blocker` allows the cache only without it.
    """
    head = nn.Dense(model.num_classes, dtype=jnp.float32, param_dtype=jnp.float32)

    def apply(params, batch, rng):
        del rng
        return head.apply({"params": params["head"]}, batch["features"])

    return apply


def cached_features(
    config: ml_collections.ConfigDict,
    model: bert.BertClassifier,
    params,
    label_tree,
    data: dict[str, dict[str, np.ndarray]],
    workdir: pathlib.Path,
    *,
    is_chief: bool,
) -> dict[str, np.ndarray]:
    """``{split: head inputs}``, read from ``workdir/features.safetensors`` when its key matches.

    The key covers the frozen weights, the token ids and masks of every split, the model
    configuration, the computation settings and the code version; any change recomputes (and
    says why in the log) and overwrites the file.
    """
    batch_size = config.evals.batch_size
    _, frozen = partition.split(params, label_tree)
    inputs = {
        split: {k: arrays[k] for k in ("input_ids", "attention_mask")}
        for split, arrays in data.items()
    }
    settings = {
        "model": repr(model),
        "batch_size": batch_size,
        # The code that computes them: a change to the model's source between releases (same
        # ftlab version) must not reuse features computed by the old code.
        "source": {
            m.__name__: hashlib.sha256(inspect.getsource(m).encode()).hexdigest()
            for m in (bert, attention, hooks, features)
        },
        "cut": inspect.getsource(make_head_input_fn),
        "versions": {p: importlib.metadata.version(p) for p in ("ftlab", "jax", "jaxlib", "flax")},
        "platform": jax.devices()[0].platform,
    }
    key = features.cache_key(trunk=frozen, inputs=inputs, settings=settings)
    path = workdir / FEATURES_FILE
    try:
        cached = features.load(path, key=key)
        if set(cached) == set(data):
            logging.info("features: reusing %s", path)
            return cached
        logging.info(
            "features: %s holds splits %s, not %s; recomputing", path, sorted(cached), sorted(data)
        )
    except FileNotFoundError:
        logging.info("features: none cached in %s yet; computing them once", workdir)
    except features.StaleCacheError as e:
        logging.info("features: recomputing, the cache cannot be used: %s", e)
    except tensorfile.CorruptFileError as e:
        logging.warning("features: recomputing, the cache cannot be used: %s", e)
    # Weights placed once, not copied from host memory at every batch.
    fn = functools.partial(jax.jit(make_head_input_fn(model)), jax.device_put(params))
    start = time.perf_counter()
    computed = {
        split: features.compute(
            fn,
            arrays,
            batch_size=batch_size,
            # Padding is most of a short snippet's tokens: cut each batch after its longest row.
            lengths=arrays["attention_mask"].sum(axis=1),
            sequence_keys=("input_ids", "attention_mask"),
        )
        for split, arrays in inputs.items()
    }
    logging.info(
        "features: computed %s in %.1f s",
        {k: v.shape for k, v in computed.items()},
        time.perf_counter() - start,
    )
    if is_chief:
        features.save(path, computed, key=key)
    return computed


def evaluate(plan, eval_step, state, arrays, *, batch_size: int) -> dict[str, float]:
    """Exact means over a split (padding masked out)."""
    totals: dict[str, float] = {}
    for batch in batching.eval_batches(arrays, batch_size=batch_size):
        sums = jax.device_get(eval_step(state, plan.put_batch(batch)))
        for k, v in sums.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    count = totals.pop("count")
    return {k: v / count for k, v in totals.items()}


def _split_evaluator(metric: str | None):
    """A factory for `loop.register`: ``metric`` (None: all) of the classifier on a split."""

    def factory(*, split: str = "validation", eval_step, plan, data, batch_size):
        if split not in data:
            raise ValueError(f"split={split!r} is not one of {sorted(data)}")

        def run(state):
            results = evaluate(plan, eval_step, state, data[split], batch_size=batch_size)
            return {f"eval/{split}/{k}": v for k, v in results.items() if metric in (None, k)}

        return run

    return factory


# config.evals.plugins.<name> = dict(type="accuracy", split="test", every_steps=100), ...
for _type, _metric in (("classification", None), ("accuracy", "accuracy"), ("loss", "loss")):
    loop.register(_type)(_split_evaluator(_metric))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains, evaluates and checkpoints into ``workdir``; resumes from its latest checkpoint.

    Returns:
      The final metrics, also written to ``workdir/results.json``.
    """
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    is_chief = jax.process_index() == 0
    plan = parallel.make_plan(config.parallel.mode, num_devices=config.parallel.num_devices)
    plan.check_batch_size(config.optim.batch_size, what="config.optim.batch_size")
    plan.check_batch_size(config.evals.batch_size, what="config.evals.batch_size")
    logging.info(
        "devices: %d (%s), processes: %d",
        plan.num_devices,
        jax.devices()[0].platform,
        jax.process_count(),
    )

    # -- data -------------------------------------------------------------------------------
    data = build_data(config)
    n_train = len(data["train"]["label"])
    logging.info("data: %s", {k: len(v["label"]) for k, v in data.items()})

    # -- model, partition, optimizer --------------------------------------------------------
    model, params = build_model(config)
    n_base = partition.count(params)
    sites = None
    if config.peft.method in STRUCTURAL:
        sites = method_sites(config, params, make_apply(model))
    params, apply = build_method(config, params, make_apply(model), sites=sites)
    rules = [tuple(r) for r in config.partition.rules]
    label_tree = partition.labels(params, rules, what="config.partition.rules")
    if is_chief:
        for pattern, label, n in partition.claims(params, rules):
            logging.info("partition rule %-24r -> %-8s claims %d leaves", pattern, label, n)
        print(partition.summary(params, label_tree), flush=True)
    n_trainable = partition.count(partition.split(params, label_tree)[0])
    tx = build_optimizer(config, label_tree)
    state = train.init_state(params, label_tree, tx, seed=config.seed)

    # -- cached features --------------------------------------------------------------------
    # None: cache the head's inputs when the trunk allows it; True: require it; False: never.
    cache = config.data.get("cache_features")
    blocker = features_blocker(config, model, label_tree)
    if cache and blocker:
        raise ValueError(
            f"config.data.cache_features=True, but {blocker}; set it to False (a forward pass "
            "per step) or None (cache when possible)."
        )
    if cache is None and blocker:
        logging.info("features: computed at every step, not cached: %s", blocker)
    if cache is not False and not blocker:
        head_inputs = cached_features(
            config, model, params, label_tree, data, workdir, is_chief=is_chief
        )
        data = {
            split: {"features": head_inputs[split], "label": arrays["label"]}
            for split, arrays in data.items()
        }
        apply = make_head_apply(model)

    # -- evaluators -------------------------------------------------------------------------
    axis = parallel.DATA_AXIS if plan.mode == "pmap" else None
    eval_step = plan.compile_eval_step(
        train.make_eval_step(classification.make_eval_fn(apply), axis_name=axis)
    )

    def run_eval(state, split):
        results = evaluate(plan, eval_step, state, data[split], batch_size=config.evals.batch_size)
        return {f"eval/{split}/{k}": v for k, v in results.items()}

    evaluators = [
        loop.Evaluator(
            "validation", lambda s: run_eval(s, "validation"), every_steps=config.evals.every_steps
        ),
        *loop.from_config(
            config.evals.get("plugins"),
            eval_step=eval_step,
            plan=plan,
            data=data,
            batch_size=config.evals.batch_size,
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
        step_fn=train.make_train_step(classification.make_loss_fn(apply), tx, axis_name=axis),
        batch_at=lambda step: batching.train_batch(
            data["train"], step, batch_size=config.optim.batch_size, seed=config.data.seed
        ),
        evaluators=evaluators,
    )
    if not run.finished:
        return {"step": run.step}
    total, state = run.step, run.state

    # -- final evaluation -------------------------------------------------------------------
    results = {"step": total, **run_eval(state, "validation"), **run_eval(state, "test")}
    results["trainable_params"] = n_trainable
    rates = (
        [
            m["train/steps_per_sec"]
            for m in metrics_lib.read_jsonl(workdir / "metrics.jsonl")
            if "train/steps_per_sec" in m
        ]
        if run.is_chief
        else []
    )
    # The first window includes compilation: leave it out of the typical step time.
    if len(rates) > 1:
        results["train_step_s"] = float(1.0 / np.median(rates[1:]))
    results["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    results["total_params"] = partition.count(params)
    results["base_params"] = n_base
    # The most frequent class's share (any number of classes; a user's file may have more).
    results["majority_baseline/test"] = float(
        np.bincount(data["test"]["label"]).max() / len(data["test"]["label"])
    )
    run.checkpointer.wait_until_finished()
    if run.is_chief:
        final = plan.get_state(state)
        results.update(save_method(config, final.trainable, final.frozen, workdir, sites=sites))
        run.write({k: v for k, v in results.items() if k.startswith("eval/")})
        report.save_json(workdir / "results.json", results)
        for path in metrics_lib.plot_curves(workdir / "metrics.jsonl", workdir):
            logging.info("wrote %s", path)
        logging.info("results: %s", json.dumps(results))
    run.close()
    return results
