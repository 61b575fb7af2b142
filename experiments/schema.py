"""What each experiment kind's config may hold: every field's type and range, checked up front.

    schema.validate(config)                    # raises ConfigError naming the first bad key
    allowed = schema.check_resume(config, workdir)   # refuses a structural change, lists others

A kind's schema is a table ``{dotted key: Field}``. A key of the config that is not in its kind's
table is an error (it could not take effect), as is a required key that is missing; a few keys are
optional (trainers read them with ``.get``). Checks that relate two fields (``num_steps`` a
multiple of ``log_every_steps``, a learning rate for every method, ...) follow the table.

Fields marked structural (``.fixed()``) fix the saved state's shape or meaning (model size,
method, rank, number of classes, partition rules): a run may not resume under a changed one.
Kinds that resume by reusing finished runs' results (sweeps) treat every field as structural,
because a result recorded under one config is not a result of another. Any other change
(learning rate, ``num_steps``, ``max_steps_per_run``, logging, ...) is allowed on resume and
listed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections

__all__ = [
    "CONFIG_FILE",
    "ConfigError",
    "Field",
    "KINDS",
    "SAVED_STATE",
    "changes",
    "check_resume",
    "flatten",
    "kind_of",
    "schema_of",
    "show",
    "validate",
]

_MISSING = object()
# the run's config in its workdir, written at every start; a rerun is compared with it
CONFIG_FILE = "config.json"
# a ConfigDict is not a collections.abc.Mapping
_GROUP = (Mapping, ml_collections.ConfigDict)


class ConfigError(ValueError):
    """A config value the user can fix; its message is one line naming the key.

    Attributes:
        key: The dotted key under ``config`` (``optim.lr``).
    """

    def __init__(self, key: str, message: str, value: Any = _MISSING):
        self.key = key
        if isinstance(value, ml_collections.ConfigDict):
            value = value.to_dict()  # its repr is multi-line YAML
        shown = "" if value is _MISSING else f"={value!r}"
        super().__init__(" ".join(f"config.{key}{shown}: {message}".split()))


@dataclasses.dataclass(frozen=True)
class Field:
    """One config field: ``check(value)`` returns None when valid, else what is allowed.

    Attributes:
        check: ``value -> None | str``; the string says what the value must be.
        structural: A change of this field alters the saved state's shape or meaning.
        optional: The key may be absent (the trainer has a default).
    """

    check: Callable[[Any], str | None]
    structural: bool = False
    optional: bool = False

    def fixed(self) -> Field:
        """This field, marked structural: fixed for the life of a run."""
        return dataclasses.replace(self, structural=True)

    def opt(self) -> Field:
        """This field, allowed to be absent."""
        return dataclasses.replace(self, optional=True)


# -- field constructors ---------------------------------------------------------------------------


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _range_text(ge, gt, le, lt) -> str:
    parts = [f">= {ge}" if ge is not None else "", f"> {gt}" if gt is not None else ""]
    parts += [f"<= {le}" if le is not None else "", f"< {lt}" if lt is not None else ""]
    return " and ".join(p for p in parts if p)


def _in_range(v, ge, gt, le, lt) -> bool:
    return not (
        (ge is not None and v < ge)
        or (gt is not None and v <= gt)
        or (le is not None and v > le)
        or (lt is not None and v >= lt)
    )


def integer(ge=None, *, le=None, note: str = "") -> Field:
    """An int (not a bool) in ``[ge, le]``; ``note`` explains a special value (``0: never``)."""
    want = f"must be an integer {_range_text(ge, None, le, None)}".rstrip() + (
        f" ({note})" if note else ""
    )
    return Field(lambda v: None if _is_int(v) and _in_range(v, ge, None, le, None) else want)


def real(*, ge=None, gt=None, le=None, lt=None, example: str = "") -> Field:
    """A finite int or float in the given range."""
    want = f"must be a number {_range_text(ge, gt, le, lt)}" + (
        f" (e.g. {example})" if example else ""
    )
    return Field(lambda v: None if _is_num(v) and _in_range(v, ge, gt, le, lt) else want)


def boolean() -> Field:
    """True or False (not 0 or 1)."""
    return Field(lambda v: None if isinstance(v, bool) else "must be True or False")


def choice(*values: str) -> Field:
    """One of ``values``."""
    want = f"must be one of {', '.join(repr(x) for x in values)}"
    return Field(lambda v: None if isinstance(v, str) and v in values else want)


def string(*, nonempty: bool = False) -> Field:
    """Any string (a path, a name), or any but ``""``."""

    def check(v):
        if not isinstance(v, str) or (nonempty and not v):
            return "must be a non-empty string" if nonempty else "must be a string"
        return None

    return Field(check)


def _seq(item: Callable[[Any], str | None], what: str, *, nonempty: bool, unique: bool) -> Field:
    def check(v):
        if isinstance(v, str) or not isinstance(v, Sequence):
            return f"must be a tuple of {what}"
        if nonempty and not v:
            return f"must be a non-empty tuple of {what}"
        for i, x in enumerate(v):
            if (bad := item(x)) is not None:
                return f"item {i} ({x!r}) {bad}"
        if unique and len(set(v)) != len(v):
            return f"must not repeat an item (a tuple of {what})"
        return None

    return Field(check)


def integers(ge=None, *, nonempty: bool = True) -> Field:
    """A tuple of ints ``>= ge``."""
    return _seq(
        integer(ge).check,
        f"integers {_range_text(ge, None, None, None)}",
        nonempty=nonempty,
        unique=False,
    )


def reals(*, ge=None, gt=None, le=None, nonempty: bool = True) -> Field:
    """A tuple of finite numbers in range."""
    return _seq(
        real(ge=ge, gt=gt, le=le).check,
        f"numbers {_range_text(ge, gt, le, None)}",
        nonempty=nonempty,
        unique=False,
    )


def choices(*values: str) -> Field:
    """A non-empty tuple of distinct members of ``values``."""
    return _seq(
        choice(*values).check, f"some of {', '.join(map(repr, values))}", nonempty=True, unique=True
    )


def _regex(v) -> str | None:
    if not isinstance(v, str):
        return "must be a regex string"
    try:
        re.compile(v)
    except re.error as e:
        return f"is not a valid regex: {e}"
    return None


def regexes(*, nonempty: bool = True) -> Field:
    """A tuple of regexes (matched with ``re.fullmatch`` over slash paths)."""
    return _seq(_regex, "regex strings", nonempty=nonempty, unique=False)


def rules() -> Field:
    """Partition rules: ``((regex, label), ...)``; ``"frozen"`` freezes, any other label trains."""

    def check(v):
        # imported here: it brings JAX, which a launcher that refuses a bad flag does not need
        from ftlab.core import partition  # noqa: PLC0415

        if isinstance(v, str) or not isinstance(v, Sequence) or not v:
            return "must be a non-empty tuple of (regex, label) pairs, e.g. (('.*', 'train'),)"
        for i, rule in enumerate(v):
            if isinstance(rule, str) or not isinstance(rule, Sequence) or len(rule) != 2:
                return f"item {i} ({rule!r}) must be a (regex, label) pair"
            if (bad := _regex(rule[0])) is not None:
                return f"item {i}: regex {rule[0]!r} {bad}"
            # partition.labels on a one-leaf tree runs the library's own label check, so the
            # words it refuses ("freeze", "fixed", ...) are refused here before anything runs.
            try:
                partition.labels({"leaf": 0}, [(".*", rule[1])], what="rule")
            except ValueError as e:
                return f"item {i}: {str(e).partition(': ')[2]}"
        return None

    return Field(check)


def sharding_rules() -> Field:
    """Sharding rules: ``((regex, tactic), ...)``, possibly empty (no sharding)."""

    def check(v):
        from ftlab.core import sharding  # noqa: PLC0415 - brings JAX

        if isinstance(v, str) or not isinstance(v, Sequence):
            return "must be a tuple of (regex, tactic) pairs, e.g. (('.*', 'fsdp'),)"
        for i, rule in enumerate(v):
            if isinstance(rule, str) or not isinstance(rule, Sequence) or len(rule) != 2:
                return f"item {i} ({rule!r}) must be a (regex, tactic) pair"
            if (bad := _regex(rule[0])) is not None:
                return f"item {i}: regex {rule[0]!r} {bad}"
            if rule[1] not in sharding.TACTICS:
                return f"item {i}: tactic {rule[1]!r} is not one of {', '.join(sharding.TACTICS)}"
        return None

    return Field(check)


def nullable(field: Field) -> Field:
    """``field`` or None."""

    def check(v):
        bad = None if v is None else field.check(v)
        return None if bad is None else f"{bad}, or None"

    return Field(check)


def pair_low_high(*, ge=0.0) -> Field:
    """``(low, high)`` with ``ge <= low < high``."""

    def check(v):
        if isinstance(v, str) or not isinstance(v, Sequence) or len(v) != 2:
            return f"must be a pair (low, high) with {ge} <= low < high"
        lo, hi = v
        if not (_is_num(lo) and _is_num(hi) and ge <= lo < hi):
            return f"must be a pair (low, high) with {ge} <= low < high"
        return None

    return Field(check)


def mapping(keys: Sequence[str], value: Field) -> Field:
    """A group ``{key: value}`` whose keys are among ``keys`` (e.g. a learning rate per method)."""

    def check(v):
        if not isinstance(v, _GROUP):
            return f"must be a group {{key: value}} with keys among {', '.join(keys)}"
        for k, x in v.items():
            if k not in keys:
                return f"key {k!r} is not one of {', '.join(keys)}"
            if (bad := value.check(x)) is not None:
                return f"[{k!r}]={x!r} {bad}"
        return None

    return Field(check)


def lambdas() -> Field:
    """Soft sharing's penalties: a tuple of entries, each ``>= 0`` or a square ``[T, T]`` matrix."""

    def entry(x):
        if _is_num(x):
            return None if x >= 0 else "must be >= 0"
        rows = list(x) if isinstance(x, Sequence) and not isinstance(x, str) else None
        ok = rows and all(
            isinstance(r, Sequence)
            and len(r) == len(rows)
            and all(_is_num(a) and a >= 0 for a in r)
            for r in rows
        )
        return None if ok else "must be a number >= 0 or a square [T, T] nested tuple of them"

    return _seq(entry, "numbers >= 0 or [T, T] matrices", nonempty=True, unique=False)


# -- the shared groups ----------------------------------------------------------------------------

POSITIVE_LR = real(gt=0, example="1e-3")
STEPS = integer(1)
SEED = integer(0)

LOOP = {
    "log_every_steps": STEPS,
    "max_steps_per_run": integer(0, note="0: run to the end"),
    "checkpoint.every_steps": STEPS,
    "checkpoint.keep": integer(1),
}
PARALLEL = {
    "parallel.mode": choice("mesh", "pmap"),
    "parallel.num_devices": integer(0, note="0: all devices"),
    "parallel.multihost": boolean().opt(),
    "parallel.coordinator_address": string().opt(),
    "parallel.num_processes": integer(0, note="0: auto-detect").opt(),
    "parallel.process_id": integer(-1, note="-1: auto-detect").opt(),
    "parallel.mesh": string().opt(),
    "parallel.sharding_rules": sharding_rules().opt(),
    "parallel.fsdp_min_bytes": integer(0).opt(),
}
STEP = {
    "step.accumulate": integer(1),
    "step.remat_policy": choice(
        "",
        "nothing_saveable",
        "everything_saveable",
        "dots_saveable",
        "dots_with_no_batch_dims_saveable",
        "checkpoint_dots",
        "checkpoint_dots_with_no_batch_dims",
    ),
    "step.remat_modules": string(),
    "step.compute_dtype": choice("", "float32", "bfloat16", "float16"),
    "step.frozen_dtype": choice("", "float32", "bfloat16", "float16"),
}
# For the sweeps of short runs whose configs predate the group: mesh over all devices by default.
PARALLEL_OPTIONAL = {key: field.opt() for key, field in PARALLEL.items()}


def plugins() -> Field:
    """``{name: {"type": str, ...}}``: evaluators chosen by name (`experiments.loop`)."""

    def check(v):
        v = v.to_dict() if isinstance(v, ml_collections.ConfigDict) else v
        if not isinstance(v, Mapping) or not all(
            isinstance(s, Mapping) and isinstance(s.get("type"), str) for s in v.values()
        ):
            return 'must map names to dicts with a "type", e.g. {"val": {"type": "accuracy"}}'
        return None

    return Field(check)


# keys of the trainers that run on `experiments.loop` (classification, meta)
STEP_LOOP = {
    # trace these steps with jax.profiler into <workdir>/profile
    "profile.steps": integers(1).opt(),
}
# The keys of `experiments.models.adamw` (warmup-cosine AdamW with clipping), and the batch size:
# the classifier, the reward model, SFT and RLHF train with them.
ADAMW = {
    "optim.batch_size": integer(1),
    "optim.num_steps": STEPS,
    "optim.lr": POSITIVE_LR,
    "optim.warmup_steps": integer(0),
    "optim.weight_decay": real(ge=0),
    "optim.grad_clip_norm": real(gt=0, example="1.0"),
}

ROTTEN_TOMATOES_TASKS = ("sentiment", "subjectivity")
# the BERT classifier built by experiments/models.py `encoder_classifier`
ENCODER = {
    "model.encoder": choice("minilm", "tiny").fixed(),
    "model.num_classes": integer(2, note="a classifier needs two classes or more").fixed(),
    # the head was trained on these features
    "model.pooling": choice("mean", "cls").fixed(),
    "model.dropout_rate": real(ge=0, lt=1),
    "model.attention_dropout_rate": nullable(real(ge=0, lt=1)).opt(),
    "model.attention": choice("auto", "einsum", "xla", "cudnn").opt(),
    "model.dtype": choice("float32", "bfloat16").opt(),
    # frozen leaves are not checkpointed but rebuilt at every start: from these (and the seed)
    "model.pretrained": boolean().fixed().opt(),
    "model.dont_load": regexes(nonempty=False).fixed(),
    "data.max_length": integer(2, le=512),
}
PEFT_METHODS = ("none", "lora", "dora", "ia3", "adapters", "prompt", "prefix", "reft")

CLASSIFICATION = {
    "method": string(nonempty=True),
    # initialises the leaves that are frozen, and so rebuilt (not restored) on resume
    "seed": SEED.fixed(),
    "data.dataset": choice("rotten_tomatoes"),
    "data.task": choice(*ROTTEN_TOMATOES_TASKS),
    "data.seed": SEED,
    "data.limit": integer(0, note="0: all examples"),
    # None: cache the head's inputs when nothing below the head trains or draws dropout.
    "data.cache_features": nullable(boolean()).opt(),
    **ENCODER,
    "partition.rules": rules().fixed(),
    "peft.method": choice(*PEFT_METHODS).fixed(),
    "peft.targets": regexes().fixed(),
    "peft.rank": integer(1).fixed(),
    "peft.alpha": real(gt=0),
    "peft.dropout": real(ge=0, lt=1),
    "peft.ia3_targets_out": regexes(nonempty=False).fixed(),
    "peft.ia3_targets_in": regexes(nonempty=False).fixed(),
    "peft.bottleneck": integer(1).fixed(),
    "peft.length": integer(1).fixed(),
    "peft.prefix_hidden_mlp": integer(1).fixed(),
    "peft.reft_layers": integers(0).fixed(),
    "peft.reft_first_n": integer(0),
    "peft.reft_last_n": integer(0),
    **ADAMW,
    "evals.every_steps": STEPS,
    "evals.batch_size": integer(1),
    # the evaluator types classification registers: classification, accuracy, loss
    "evals.plugins": plugins().opt(),
    **LOOP,
    **STEP_LOOP,
    **PARALLEL,
    **STEP,
}

# classification on a user's files (config.data.dataset == "files") with a Hugging Face encoder
# folder (configs/finetune.py): the same trainer, other data and model keys.
CLASSIFICATION_FILES = {
    **{k: v for k, v in CLASSIFICATION.items() if k not in ("data.task", "model.encoder")},
    "data.dataset": choice("files"),
    # required, but "" in configs/finetune.py (given on the command line; the trainer says so)
    "data.train": string(),
    # "": carve config.data.holdout_fraction of the training file's rows for this split
    "data.validation": string(),
    "data.test": string(),
    "data.holdout_fraction": real(gt=0, lt=0.5),
    "data.text_column": string(nonempty=True),
    "data.label_column": string(nonempty=True),
    # (): string labels, named in sorted order; else the label set in id order
    "data.label_names": _seq(string(nonempty=True).check, "strings", nonempty=False, unique=True),
    # integer labels in [0, config.model.num_classes) instead of strings
    "data.integer_labels": boolean(),
    "model.encoder": choice("hf").fixed(),
    # a Hugging Face encoder folder: config.json, safetensors weights, tokenizer.json
    "model.path": string().fixed(),
}

# Meta-learning (experiments/trainers/meta.py): the keys of both task families.
META = {
    "seed": SEED,
    "data.seed": SEED,
    "data.shots": integer(1),
    "meta.inner_lr": POSITIVE_LR,
    "meta.inner_steps": integer(1),
    # jax.checkpoint each inner step (memory for many inner steps)
    "meta.remat": boolean(),
    "optim.meta_batch_size": integer(1),
    "optim.lr": POSITIVE_LR,
    "optim.num_steps": STEPS,
    "evals.seed": SEED,
    "evals.num_tasks": integer(1),
    "evals.num_steps": integers(0),
    # the baseline's fine-tuning at test time (the baseline's keys only: see META_BASELINES)
    "evals.finetune_lr": POSITIVE_LR.opt(),
    "evals.finetune_rules": rules().opt(),
    "evals.every_steps": integer(0, note="0: only the final evaluation"),
    # the evaluator type each family offers: finetune_mse (sinusoid), finetune_accuracy (images)
    "evals.plugins": plugins().opt(),
    "plot_metrics": boolean(),
    **LOOP,
    **STEP_LOOP,
    **PARALLEL,
}

# Each task family's baseline (trained jointly, then fine-tuned with config.evals.finetune_*);
# the meta-learners fine-tune with their own inner rules and rate.
META_BASELINES = ("pretrained", "finetune")

META_SINUSOID = {
    **META,
    "data.task": choice("sinusoid"),
    "data.query_shots": integer(1),
    "model.hidden": integers(1, nonempty=False).fixed(),
    "meta.method": choice("maml", "fomaml", "anil", "metasgd", "reptile", "pretrained").fixed(),
    "meta.metasgd_lr_init": pair_low_high(),
    "evals.shots": integer(1),
    "evals.query_shots": integer(1),
}

META_IMAGES = {
    **META,
    "data.dataset": choice("digits", "glyphs").fixed(),
    # which classes are meta-train and which held out
    "data.split_seed": SEED.fixed(),
    "data.num_train_classes": integer(1).fixed(),
    "data.ways": integer(2).fixed(),
    "data.query": integer(1),
    "data.glyph_size": integer(4).fixed(),
    "data.glyph_classes": integer(2).fixed(),
    "data.glyph_instances": integer(2),
    "model.filters": integer(1).fixed(),
    "model.blocks": integer(1).fixed(),
    "model.norm": choice("batch", "instance").fixed(),
    "meta.method": choice("maml", "fomaml", "anil", "reptile", "finetune").fixed(),
    "optim.pretrain_batch_size": integer(1),
    "evals.chunk": integer(1),
    "evals.query": integer(1),
}

MULTITASK_TABULAR = {
    "seed": SEED,
    "methods": choices("independent", "pooled", "hard_uniform", "hard_uncertainty", "soft"),
    "data.dataset": choice("yeast", "nlschools"),
    "data.seed": SEED,
    "data.test_fraction": real(gt=0, lt=1),
    "data.max_tasks": integer(0, note="0: all tasks"),
    "model.hidden": integers(1, nonempty=False),
    "multitask.lambdas": lambdas(),
    "optim.batch_size": integer(0, note="0: every training row each step"),
    "optim.num_steps": STEPS,
    "optim.lr": POSITIVE_LR,
    "optim.weight_decay": real(ge=0),
    "log_every_steps": STEPS,
    **PARALLEL_OPTIONAL,
}

MULTITASK_TEXT = {
    "seed": SEED,
    "methods": choices("lora_per_task", "lora_shared"),
    "data.dataset": choice("rotten_tomatoes"),
    "data.tasks": choices(*ROTTEN_TOMATOES_TASKS),
    "data.seed": SEED,
    "data.limit": integer(0, note="0: all examples"),
    **ENCODER,
    "peft.targets": regexes(),
    "peft.rank": integer(1),
    "peft.alpha": real(gt=0),
    "optim.batch_size": integer(1),
    "optim.num_steps": STEPS,
    "optim.lr": POSITIVE_LR,
    "optim.weight_decay": real(ge=0),
    "evals.batch_size": integer(1),
    "log_every_steps": STEPS,
    **PARALLEL_OPTIONAL,
}

PRETRAIN = {
    "seeds": integers(0),
    "methods": choices("none", "layerwise", "rotation", "contrastive"),
    "data.dataset": choice("digits"),
    "data.test_fraction": real(gt=0, lt=1),
    "data.seed": SEED,
    "data.label_fractions": reals(gt=0, le=1),
    "model.features": integers(1),
    "pretrain.lr": POSITIVE_LR,
    "pretrain.batch_size": integer(1),
    "pretrain.layerwise_steps_per_stage": STEPS,
    "pretrain.layerwise_noise_std": real(ge=0),
    "pretrain.rotation_steps": STEPS,
    "pretrain.contrastive_steps": STEPS,
    "pretrain.temperature": real(gt=0),
    "pretrain.projector": integers(1),
    "pretrain.max_shift": integer(0),
    "pretrain.augment_noise_std": real(ge=0),
    "transfer.num_steps": STEPS,
    "transfer.batch_size": integer(1),
    "transfer.probe_lr": POSITIVE_LR,
    "transfer.finetune_lr": POSITIVE_LR,
    "transfer.weight_decay": real(ge=0),
    "log_every_steps": STEPS,
    **PARALLEL_OPTIONAL,
}

DECODER_METHODS = ("prompt", "prefix", "lora", "qlora")
DECODER_MODEL = {
    "model.name": choice("smollm2", "tiny"),
    "model.vocab_size": integer(16),
}
# the computation dtype (the weights and the saved state stay float32); absent: float32
DECODER_DTYPE = {"model.dtype": choice("float32", "bfloat16").opt()}
DECODER_TUNING = {
    "seed": SEED,
    "seeds": integer(1, note="the number of seeds"),
    "methods": choices(*DECODER_METHODS),
    **DECODER_MODEL,
    **DECODER_DTYPE,
    "data.task": choice(*ROTTEN_TOMATOES_TASKS),
    "data.split_seed": SEED,
    "data.num_examples": integers(1),
    "data.num_test": integer(1),
    "data.query_len": integer(1),
    "data.prefix_len": integer(1),
    "data.eval_batch_size": integer(1),
    "peft.length": integer(1),
    "peft.prefix_hidden_mlp": integer(1),
    "peft.targets": regexes(),
    "peft.rank": integer(1),
    "peft.alpha": real(gt=0),
    "peft.qlora_targets": regexes(),
    "optim.batch_size": integer(1),
    "optim.epochs": real(gt=0),
    "optim.min_steps": STEPS,
    "optim.max_steps": STEPS,
    "optim.lr": mapping(DECODER_METHODS, POSITIVE_LR),
    "icl_results": string(),
    # the evaluator types decoder tuning registers: label_accuracy, label_loss, generation
    "evals.plugins": plugins().opt(),
    **PARALLEL_OPTIONAL,
    **STEP,
}

ICL = {
    "seed": SEED,
    **DECODER_MODEL,
    **DECODER_DTYPE,
    "data.tasks": choices(*ROTTEN_TOMATOES_TASKS),
    "data.split_seed": SEED,
    "data.num_test": integer(1),
    "data.demo_pool": integer(1),
    "data.max_demo_tokens": integer(1),
    "icl.shots": integers(0),
    "icl.draws": integer(1),
    "icl.prefix_len": integer(1),
    "icl.query_len": integer(1),
    # queries scored at once, split over the devices (a multiple of them)
    "icl.batch_size": integer(1),
    **PARALLEL,
}

ONLINE_COMMON = {
    "seed": SEED,
    # a negative limit would leave no example at all (0 means the whole stream)
    "data.limit": integer(0, note="0: the whole stream").fixed(),
    "data.standardize": boolean().fixed(),
    "data.on_error": choice("raise", "skip").fixed(),
    # examples per loop step: the steps of the saved checkpoints
    "data.chunk_size": integer(1).fixed(),
    # the learners, their step sizes and the comparator make the saved state (the carry of each
    # learner, its running sums against the comparator)
    "learner.name": choice("ogd", "adagrad", "adam").fixed(),
    "learner.lr": POSITIVE_LR.fixed(),
    "learner.decay": choice("sqrt", "constant").fixed(),
    "learner.delay": integer(0).fixed(),
    "learner.batch_size": integer(1).fixed(),
    "learner.param_dtype": choice("", "float32", "bfloat16", "float16").fixed(),
    "regret.tol": real(gt=0).fixed(),
    "regret.method": choice("newton", "lbfgs").fixed(),
    "regret.max_iterations": integer(1).fixed(),
    "regret.l2": real(ge=0).fixed(),
    "regret.points": integer(1),
    "sweep.learning_rates": reals(gt=0).fixed(),
    "evals.river": boolean(),
    **LOOP,
    **PARALLEL,
}
ONLINE_RIVER = {
    **ONLINE_COMMON,
    "data.source": choice("river").opt().fixed(),
    "data.stream": choice("phishing", "trump", "shuttle").fixed(),
}
ONLINE_MINILM = {
    **ONLINE_COMMON,
    "data.source": choice("minilm_rotten_tomatoes").fixed(),
    # only a name for the results here
    "data.stream": string(nonempty=True),
    "data.seed": SEED.fixed(),
    "data.max_length": integer(2, le=512).fixed(),
    "data.embed_batch_size": integer(1),
}

RNN_TRANSFER_METHODS = ("scratch", "full", "lora", "head")
RNN_TRANSFER = {
    "seed": SEED,
    "methods": choices(*RNN_TRANSFER_METHODS),
    "data.source": choice("sharegpt", "rt_reviews", "rt_plot"),
    "data.target": choice("sharegpt", "rt_reviews", "rt_plot"),
    "data.seed": SEED,
    "data.source_train_chars": integer(1),
    "data.target_train_chars": integer(1),
    "data.test_chars": integer(2),
    "data.seq_len": integer(1),
    "model.cell": choice("gru", "lstm"),
    "model.embed_dim": integer(1),
    "model.hidden": integer(1),
    "model.num_layers": integer(1),
    "peft.targets": regexes(),
    "peft.rank": integer(1),
    "peft.alpha": real(gt=0),
    "optim.batch_size": integer(1),
    "optim.pretrain_steps": STEPS,
    "optim.pretrain_lr": POSITIVE_LR,
    "optim.num_steps": STEPS,
    "optim.lr": mapping(RNN_TRANSFER_METHODS, POSITIVE_LR),
    "eval_batch_size": integer(1),
    "sample.prompt_len": integer(1),
    "sample.length": integer(1),
    "sample.temperature": real(gt=0),
    "sample.seed": SEED,
    "log_every_steps": STEPS,
    **PARALLEL_OPTIONAL,
}

GCN_TRANSFER_METHODS = ("scratch", "probe", "finetune", "lora")
GCN_TRANSFER = {
    "seeds": integers(0),
    "methods": choices(*GCN_TRANSFER_METHODS),
    "data.dataset": choice("drosophila_left", "drosophila_right"),
    "data.labels_per_class": integers(1),
    "data.propagation": choice("dense", "sparse"),
    "model.features": integers(1),
    "model.dropout_rate": real(ge=0, lt=1),
    "pretrain.steps": STEPS,
    "pretrain.lr": POSITIVE_LR,
    "pretrain.negatives": integer(1),
    "peft.targets": regexes(),
    "peft.rank": integer(1),
    "peft.alpha": real(gt=0),
    "optim.num_steps": STEPS,
    "optim.lr": mapping(GCN_TRANSFER_METHODS, POSITIVE_LR),
    "optim.weight_decay": real(ge=0),
    "log_every_steps": STEPS,
}

DIFFUSION_TRANSFER_METHODS = ("scratch", "full", "lora", "embed")
DIFFUSION_TRANSFER = {
    "seed": SEED,
    "methods": choices(*DIFFUSION_TRANSFER_METHODS),
    "data.dataset": choice("digits"),
    "data.seed": SEED,
    "data.test_fraction": real(gt=0, lt=1),
    "data.source_classes": integers(0),
    "data.target_classes": integers(0),
    "data.shots": integers(1),
    "model.features": integers(1),
    "model.embed_dim": integer(2),
    "pretrain.steps": STEPS,
    "pretrain.lr": POSITIVE_LR,
    "peft.targets": regexes(),
    "peft.train": regexes(nonempty=False),
    "peft.rank": integer(1),
    "peft.alpha": real(gt=0),
    "optim.batch_size": integer(1),
    "optim.num_steps": STEPS,
    "optim.lr": mapping(DIFFUSION_TRANSFER_METHODS, POSITIVE_LR),
    "judge.features": integer(1),
    "judge.steps": STEPS,
    "judge.lr": POSITIVE_LR,
    "judge.batch_size": integer(1),
    "eval.samples_per_class": integer(2),
    "eval.sample_steps": STEPS,
    "eval.loss_repeats": integer(1),
    "eval.grid_per_class": integer(1),
    "eval.batch_size": integer(1),
    "eval.seed": SEED,
    "log_every_steps": STEPS,
    **PARALLEL_OPTIONAL,
}

# the reward model of experiments/trainers/reward.py (configs/reward_*.py)
REWARD = {
    # the method's name in the report (its leaves come from peft.method, its partition from rules)
    "method": string(nonempty=True),
    # initialises the head and the method's leaves (frozen leaves are rebuilt on resume)
    "seed": SEED.fixed(),
    "data.split_seed": SEED.fixed(),
    "data.limit": integer(0, note="0: every snippet").fixed(),
    "data.max_length": integer(2, le=512).fixed(),
    "data.pairing": choice("in_batch", "sampled"),
    "data.min_difference": real(gt=0),
    "data.seed": SEED,
    "model.backbone": choice("minilm", "tiny", "smollm2", "tiny_llama").fixed(),
    "model.pooling": choice("mean", "cls", "last").fixed(),
    "model.dropout_rate": real(ge=0, lt=1),
    "model.vocab_size": integer(16).fixed(),
    "partition.rules": rules().fixed(),
    "peft.method": choice("none", "lora", "dora", "prompt").fixed(),
    "peft.targets": regexes().fixed(),
    "peft.rank": integer(1).fixed(),
    "peft.alpha": real(gt=0),
    "peft.dropout": real(ge=0, lt=1),
    "peft.length": integer(1).fixed(),
    "loss.margin_scale": real(ge=0),
    **ADAMW,
    "evals.every_steps": STEPS,
    "evals.batch_size": integer(1),
    "evals.min_difference": real(gt=0),
    "evals.rater_seed": SEED,
    "plot_metrics": boolean(),
    **LOOP,
    **STEP_LOOP,
    **PARALLEL,
}

# instruction tuning of experiments/trainers/sft.py (configs/sft_*.py)
SFT = {
    # the method's leaves and partition (full, lora, qlora, prompt)
    "method": choice("full", "lora", "qlora", "prompt").fixed(),
    # initialises the method's leaves (frozen leaves are rebuilt on resume)
    "seed": SEED.fixed(),
    **{k: v.fixed() for k, v in DECODER_MODEL.items()},
    **DECODER_DTYPE,
    "model.logits_chunk": integer(1),
    "data.split_seed": SEED.fixed(),
    "data.test_fraction": real(gt=0, lt=1).fixed(),
    "data.num_train": integer(0, note="0: every training conversation").fixed(),
    "data.num_test": integer(0, note="0: every test conversation").fixed(),
    "data.max_messages": integer(0, note="0: every message").fixed(),
    # the packed rows the batches index
    "data.seq_len": integer(2).fixed(),
    "data.seed": SEED,
    "peft.targets": regexes().fixed(),
    "peft.rank": integer(1).fixed(),
    "peft.alpha": real(gt=0),
    "peft.dropout": real(ge=0, lt=1),
    "peft.qlora_targets": regexes().fixed(),
    "peft.length": integer(1).fixed(),
    **ADAMW,
    "evals.every_steps": STEPS,
    "evals.batch_size": integer(1),
    "plot_metrics": boolean(),
    **LOOP,
    **STEP_LOOP,
    **PARALLEL,
}

# sentiment-controlled generation of experiments/trainers/rlhf.py (configs/rlhf_*.py); only the
# group of config.algorithm may be present (the trainer refuses the others)
RLHF = {
    "algorithm": choice("ppo", "grpo", "dpo").fixed(),
    # initialises the LoRA leaves (frozen leaves are rebuilt on resume)
    "seed": SEED.fixed(),
    **{k: v.fixed() for k, v in DECODER_MODEL.items()},
    **DECODER_DTYPE,
    "reward.workdir": string(),
    "data.split_seed": SEED.fixed(),
    "data.prompt_tokens": integer(1).fixed(),
    "data.num_train": integer(0, note="0: every training snippet").fixed(),
    "data.seed": SEED,
    "peft.targets": regexes().fixed(),
    "peft.rank": integer(1).fixed(),
    "peft.alpha": real(gt=0),
    "peft.dropout": real(ge=0, lt=1),
    "sampling.max_new_tokens": integer(1),
    "sampling.temperature": real(gt=0),
    "sampling.top_p": real(gt=0, le=1),
    "ppo.kl_coef": real(ge=0).opt(),
    "ppo.kl_target": real(ge=0).opt(),
    "ppo.kl_horizon": real(gt=0).opt(),
    "ppo.clip_eps": real(gt=0).opt(),
    "ppo.vf_coef": real(ge=0).opt(),
    "ppo.gamma": real(ge=0, le=1).opt(),
    "ppo.lam": real(ge=0, le=1).opt(),
    "ppo.epochs": integer(1).opt(),
    "ppo.minibatches": integer(1).opt(),
    "grpo.num_samples": integer(2).opt(),
    "grpo.kl_coef": real(ge=0).opt(),
    "grpo.clip_eps": real(gt=0).opt(),
    "grpo.epochs": integer(1).opt(),
    "dpo.beta": real(gt=0).opt(),
    **ADAMW,
    "evals.num_prompts": integer(1),
    "evals.seed": SEED,
    "evals.every_steps": STEPS,
    "evals.kl_budgets": reals(gt=0),
    "evals.samples_shown": integer(0),
    "plot_metrics": boolean(),
    **LOOP,
    **STEP_LOOP,
    **PARALLEL,
}

# experiment kind (config.experiment) -> its variants' tables
KINDS: dict[str, dict[str, dict[str, Field]]] = {
    "classification": {"": CLASSIFICATION, "files": CLASSIFICATION_FILES},
    "meta": {"sinusoid": META_SINUSOID, "images": META_IMAGES},
    "multitask": {"tabular": MULTITASK_TABULAR, "text": MULTITASK_TEXT},
    "pretrain": {"": PRETRAIN},
    "decoder_tuning": {"": DECODER_TUNING},
    "icl": {"": ICL},
    "online": {"river": ONLINE_RIVER, "minilm": ONLINE_MINILM},
    "rnn_transfer": {"": RNN_TRANSFER},
    "gcn_transfer": {"": GCN_TRANSFER},
    "diffusion_transfer": {"": DIFFUSION_TRANSFER},
    "reward": {"": REWARD},
    "sft": {"": SFT},
    "rlhf": {"": RLHF},
}

# Where a kind keeps what a rerun resumes from (a folder of the workdir); None: a rerun starts
# over. "finished" and "runs" hold results of finished runs, valid only under their own config,
# so for those kinds every field counts as structural.
SAVED_STATE: dict[str, str | None] = {
    "classification": "checkpoints",
    "meta": "checkpoints",
    "multitask": "finished",
    "pretrain": "finished",
    "decoder_tuning": "finished",
    "icl": "finished",
    "online": "checkpoints",
    "rnn_transfer": "finished",
    "gcn_transfer": "finished",
    "diffusion_transfer": "finished",
    "reward": "checkpoints",
    "sft": "checkpoints",
    "rlhf": "checkpoints",
}


def kind_of(config: ml_collections.ConfigDict) -> tuple[str, str]:
    """``(kind, variant)`` of a config; the variant picks the table within the kind."""
    kind = config.get("experiment")
    if kind not in KINDS:
        hint = {
            "compare": "; run it with python -m experiments.compare",
            "fewshot": "; few-shot image episodes are experiment 'meta' with a data.dataset",
        }.get(kind, "")
        raise ConfigError("experiment", f"must be one of {', '.join(map(repr, KINDS))}{hint}", kind)
    data = config.get("data") or {}
    if kind == "classification":
        return kind, "files" if data.get("dataset") == "files" else ""
    if kind == "multitask":
        return kind, "text" if data.get("dataset") == "rotten_tomatoes" else "tabular"
    if kind == "online":
        return kind, "minilm" if data.get("source") == "minilm_rotten_tomatoes" else "river"
    if kind == "meta":
        return kind, "images" if "dataset" in data else "sinusoid"
    return kind, ""


def schema_of(config: ml_collections.ConfigDict) -> dict[str, Field]:
    """The table of ``config``'s kind (``experiment`` included)."""
    kind, variant = kind_of(config)
    return {"experiment": choice(*KINDS), **KINDS[kind][variant]}


def flatten(tree: Mapping, table: Mapping[str, Field] = (), prefix: str = "") -> dict[str, Any]:
    """``{dotted key: value}`` of a config (or its JSON); a key of ``table`` stays one leaf."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, _GROUP) and key not in table:
            out.update(flatten(v, table, f"{key}."))
        else:
            out[key] = v
    return out


def _cross_checks(kind: str, variant: str, c: ml_collections.ConfigDict) -> None:
    """Checks relating two or more fields of a valid-by-field config."""
    if kind == "multitask" and c.optim.num_steps % c.log_every_steps:
        raise ConfigError(
            "optim.num_steps",
            f"must be a multiple of config.log_every_steps={c.log_every_steps} "
            "(the steps run in compiled chunks of that length)",
            c.optim.num_steps,
        )
    step = c.get("step") or {}
    if step.get("accumulate", 1) > 1 and c.optim.batch_size % step.accumulate:
        raise ConfigError(
            "optim.batch_size",
            f"must be a multiple of config.step.accumulate={step.accumulate} (equal micro-batches)",
            c.optim.batch_size,
        )
    if step.get("remat_modules") and not step.get("remat_policy"):
        raise ConfigError(
            "step.remat_modules",
            "takes effect only with config.step.remat_policy",
            step.remat_modules,
        )
    if kind == "meta":
        baseline = c.meta.method in META_BASELINES
        for key in ("finetune_lr", "finetune_rules"):
            if key in c.evals and not baseline:
                raise ConfigError(
                    f"evals.{key}",
                    f"takes effect only with a baseline (config.meta.method one of "
                    f"{META_BASELINES}); {c.meta.method!r} fine-tunes held-out tasks with its "
                    "own inner rules and rate",
                    c.evals[key],
                )
            if key not in c.evals and baseline:
                raise ConfigError(f"evals.{key}", "is missing: the baseline fine-tunes with it")
    profile = c.get("profile") or {}
    if late := [s for s in profile.get("steps", ()) if s > c.optim.num_steps]:
        raise ConfigError(
            "profile.steps",
            f"names step(s) {late} after the last, config.optim.num_steps={c.optim.num_steps}",
            tuple(profile.steps),
        )
    if kind == "classification" and c.peft.method == "reft":
        if not c.peft.reft_first_n and not c.peft.reft_last_n:
            raise ConfigError(
                "peft.reft_first_n",
                "and config.peft.reft_last_n are both 0, so ReFT would intervene nowhere",
                0,
            )
    if kind == "decoder_tuning":
        missing = [m for m in c.methods if m not in c.optim.lr]
        if missing:
            raise ConfigError(
                "optim.lr", f"has no learning rate for {', '.join(map(repr, missing))}"
            )
        if c.optim.min_steps > c.optim.max_steps:
            raise ConfigError(
                "optim.min_steps",
                f"must be <= config.optim.max_steps={c.optim.max_steps}",
                c.optim.min_steps,
            )
    if (kind, variant) == ("meta", "images"):
        d, e = c.data, c.evals
        total, instances = (
            (10, 174) if d.dataset == "digits" else (d.glyph_classes, d.glyph_instances)
        )
        if d.num_train_classes > total - d.ways:
            raise ConfigError(
                "data.num_train_classes",
                f"leaves fewer than config.data.ways={d.ways} of the {total} {d.dataset} classes "
                "for meta-testing",
                d.num_train_classes,
            )
        if c.meta.method != "finetune" and d.ways > d.num_train_classes:
            raise ConfigError(
                "data.ways",
                f"must be <= config.data.num_train_classes={d.num_train_classes}",
                d.ways,
            )
        for key, query in (("data.query", d.query), ("evals.query", e.query)):
            if d.shots + query > instances:
                raise ConfigError(
                    key,
                    f"plus config.data.shots={d.shots} must be <= the {instances} instances "
                    f"of a {d.dataset} class",
                    query,
                )
    if kind == "online" and c.data.chunk_size % c.learner.batch_size:
        raise ConfigError(
            "data.chunk_size",
            f"must be a multiple of config.learner.batch_size={c.learner.batch_size} (a "
            "minibatch may not straddle two loop steps)",
            c.data.chunk_size,
        )
    if kind == "icl" and max(c.icl.shots) > c.data.demo_pool:
        raise ConfigError(
            "icl.shots", f"must be <= config.data.demo_pool={c.data.demo_pool}", tuple(c.icl.shots)
        )


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks every field of ``config`` against its kind's table, then the cross-field checks.

    Raises:
        ConfigError: The first bad, unknown or missing key, in one line that names it and says
            what is allowed, e.g. ``config.optim.lr=-0.1: must be a number > 0 (e.g. 1e-3)``.
    """
    table = schema_of(config)
    flat = flatten(config, table)
    unknown = [k for k in flat if k not in table]
    if unknown:
        group = unknown[0].rpartition(".")[0]
        known = sorted(k.rpartition(".")[2] for k in table if k.rpartition(".")[0] == group)
        where = f"config.{group}" if group else "config"
        raise ConfigError(
            unknown[0],
            f"not a key of a {config.experiment!r} config, so it could not take effect; the "
            f"keys of {where} are: {', '.join(known) or '(none)'}",
        )
    for key, field in table.items():
        if key not in flat:
            if not field.optional:
                raise ConfigError(key, f"missing; a {config.experiment!r} config needs it")
            continue
        if (bad := field.check(flat[key])) is not None:
            raise ConfigError(key, bad, flat[key])
    _cross_checks(*kind_of(config), config)


def changes(
    saved: Mapping, config: ml_collections.ConfigDict
) -> tuple[list[tuple[str, Any, Any]], list[tuple[str, Any, Any]]]:
    """Fields that differ between a run's saved config (its ``config.json``) and ``config``.

    Args:
        saved: The saved config as JSON (nested dicts).
        config: The new, valid config.

    Returns:
        ``(structural, other)``: ``(key, old, new)`` triples, sorted by key; a key absent on one
        side has the value ``"(absent)"``. Structural changes alter the saved state (every
        change does for kinds that resume from finished results, see `SAVED_STATE`).
    """
    table = schema_of(config)
    new = flatten(json.loads(config.to_json_best_effort()), table)
    old = flatten(saved, table)
    every = SAVED_STATE[kind_of(config)[0]] in ("finished", "runs")
    structural, other = [], []
    for key in sorted(set(new) | set(old)):
        a, b = old.get(key, "(absent)"), new.get(key, "(absent)")
        if a != b:
            field = table.get(key)
            is_structural = every or (field is not None and field.structural)
            (structural if is_structural else other).append((key, a, b))
    return structural, other


def show(triples: Sequence[tuple[str, Any, Any]]) -> str:
    """``config.key: old -> new; ...`` of `changes`' triples."""
    return "; ".join(f"config.{k}: {a!r} -> {b!r}" for k, a, b in triples)


def check_resume(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> list:
    """Compares ``config`` with the config of the run saved in ``workdir`` (`CONFIG_FILE`).

    Nothing is compared when there is nothing to resume: a new workdir, a kind that starts
    over (`SAVED_STATE` None), or a run that stopped before it saved anything.

    Returns:
        The allowed changes, ``(key, old, new)`` triples (`changes`), for the caller to log.

    Raises:
        ConfigError: A structural field changed; names every such field, old and new value.
    """
    workdir = pathlib.Path(workdir)
    folder = SAVED_STATE[kind_of(config)[0]]
    saved = workdir / CONFIG_FILE
    state = workdir / folder if folder else None
    if state is None or not saved.is_file() or not state.is_dir() or not any(state.iterdir()):
        return []
    structural, other = changes(json.loads(saved.read_text()), config)
    if structural:
        what = "shapes" if folder == "checkpoints" else "config"
        raise ConfigError(
            structural[0][0],
            f"changed since the run in {workdir} started, and its saved {folder} hold the old "
            f"{what}: {show(structural)}; use a new --workdir, or the old values",
        )
    return other
