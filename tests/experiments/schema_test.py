"""The config schema: every shipped config validates; each bad value is refused in one line."""

import importlib
import json
import pathlib

import ml_collections
import pytest

from experiments import schema

ROOT = pathlib.Path(__file__).resolve().parents[2]
FINETUNE_METHODS = "full linear_probe bitfit lora dora ia3 adapters prompt prefix reft".split()
# config module -> the option strings it is checked with (None: the defaults)
OPTIONS = {
    "finetune_minilm": [
        f"method={m}{x}" for m in FINETUNE_METHODS for x in ("", ",quick", ",tiny", ",steps=2")
    ]
    + ["method=lora,rank=4", "method=reft,tiny,rank=2"],
    "maml_fewshot": [
        f"dataset={d},shots={k},method={m}{x}"
        for d in ("digits", "glyphs")
        for k in (1, 5)
        for m in ("maml", "fomaml", "anil", "reptile", "finetune")
        for x in ("", ",quick")
    ]
    + ["norm=instance", "steps=7"],
    "maml_sinusoid": [
        f"method={m}{x}"
        for m in ("maml", "fomaml", "anil", "metasgd", "reptile", "pretrained")
        for x in ("", ",quick")
    ]
    + ["shots=5,inner_steps=3,remat"],
    "online_river": [
        f"stream={s},learner={a}{x}"
        for s in ("phishing", "trump", "shuttle")
        for a in ("ogd", "adagrad", "adam")
        for x in ("", ",quick")
    ]
    + ["delay=3,batch=4,decay=constant,lr=0.2"],
    "online_minilm": [None, "quick", "limit=100,lr=0.5"],
    "pretrain_digits": [None, "quick", "seeds=2"],
    "tune_smollm2": [None, "quick", "methods=lora+qlora,num_examples=8,seeds=2"],
    "icl_smollm2": [None, "quick", "tasks=sentiment,draws=1"],
    "multitask_rotten_tomatoes": [None, "quick", "tiny", "steps=40,rank=4"],
}
# every config file but the package and its shared groups (configs/common.py)
CONFIGS = sorted(
    p.stem for p in (ROOT / "configs").glob("*.py") if p.stem not in ("__init__", "common")
)


def _config(name, arg=None):
    return importlib.import_module(f"configs.{name}").get_config(arg)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_and_option_validates(name):
    for arg in OPTIONS.get(name, [None, "quick"]):
        config = _config(name, arg)
        if config.experiment == "compare":
            # experiments.compare runs its base config through experiments.main, which checks it
            with pytest.raises(schema.ConfigError, match=r"python -m experiments\.compare"):
                schema.validate(config)
            continue
        schema.validate(config)


def _with(config, **values):
    """A copy of ``config`` with ``values`` (``optim__lr=...`` for ``optim.lr``) set, any type;
    a value ``DELETE`` removes the key."""
    tree = config.to_dict()
    for key, value in values.items():
        *groups, leaf = key.split("__")
        node = tree
        for g in groups:
            node = node.setdefault(g, {})
        if value is DELETE:
            del node[leaf]
        else:
            node[leaf] = value
    return ml_collections.ConfigDict(tree)


DELETE = object()
PROBE = ("linear_probe_minilm", "tiny")
ONLINE = ("online_river", "quick")

# (config, overrides, the one-line message); the first group is the list (#18)
CASES = [
    (
        PROBE,
        dict(optim__lr=-0.1),
        r"^config\.optim\.lr=-0\.1: must be a number > 0 \(e\.g\. 1e-3\)$",
    ),
    (PROBE, dict(optim__lr=0.0), r"^config\.optim\.lr=0\.0: must be a number > 0"),
    (PROBE, dict(optim__num_steps=0), r"^config\.optim\.num_steps=0: must be an integer >= 1$"),
    (PROBE, dict(optim__num_steps=-5), r"^config\.optim\.num_steps=-5: must be an integer >= 1"),
    (PROBE, dict(optim__warmup_steps=-1), r"^config\.optim\.warmup_steps=-1: .* >= 0"),
    (PROBE, dict(optim__grad_clip_norm=-1.0), r"^config\.optim\.grad_clip_norm=-1\.0: .* > 0"),
    (PROBE, dict(max_steps_per_run=-1), r"^config\.max_steps_per_run=-1: .* >= 0 \(0: run to"),
    (PROBE, dict(model__num_classes=1), r"^config\.model\.num_classes=1: must be an integer >= 2"),
    (PROBE, dict(model__num_classes=0), r"^config\.model\.num_classes=0: must be an integer >= 2"),
    (
        PROBE,
        dict(partition__rules=(("head/.*", "train"), (".*", "freeze"))),
        r"^config\.partition\.rules=.*: item 1: label 'freeze' is not a partition label; the "
        r"label that freezes is 'frozen'",
    ),
    (ONLINE, dict(learner__lr=-0.5), r"^config\.learner\.lr=-0\.5: must be a number > 0"),
    (ONLINE, dict(sweep__learning_rates=(0.1, -1.0)), r"^config\.sweep\.learning_rates=.*item 1"),
    (PROBE, dict(log_every_steps=0), r"^config\.log_every_steps=0: must be an integer >= 1"),
    (PROBE, dict(evals__every_steps=0), r"^config\.evals\.every_steps=0: must be an integer >= 1"),
    (ONLINE, dict(data__limit=-1), r"^config\.data\.limit=-1: .* >= 0 \(0: the whole stream\)"),
    (
        ONLINE,
        dict(learner__batch_size=3),
        r"^config\.data\.chunk_size=64: must be a multiple of config\.learner\.batch_size=3",
    ),
    (ONLINE, dict(data__chunk_size=0), r"^config\.data\.chunk_size=0: must be an integer >= 1"),
    # types, unknown and missing keys
    (PROBE, dict(optim__num_steps=2.5), r"^config\.optim\.num_steps=2\.5: must be an integer"),
    (PROBE, dict(optim__num_steps=True), r"^config\.optim\.num_steps=True: must be an integer"),
    (PROBE, dict(optim__lr="1e-3"), r"^config\.optim\.lr='1e-3': must be a number"),
    (PROBE, dict(optim__lr=float("nan")), r"^config\.optim\.lr=nan: must be a number > 0"),
    (PROBE, dict(model__pretrained="yes"), r"^config\.model\.pretrained='yes': must be True or"),
    (
        PROBE,
        dict(model__pooling="max"),
        r"^config\.model\.pooling='max': must be one of 'mean', 'cls'$",
    ),
    (
        PROBE,
        dict(optim__lrr=1.0),
        r"^config\.optim\.lrr: not a key of a 'classification' config, so it could not take "
        r"effect; the keys of config\.optim are: batch_size, grad_clip_norm, lr, ",
    ),
    (PROBE, dict(optim__lr=DELETE), r"^config\.optim\.lr: missing; a 'classification' config"),
    (PROBE, dict(experiment="resume"), r"^config\.experiment='resume': must be one of 'class"),
    (PROBE, dict(peft__targets=("(",)), r"^config\.peft\.targets=.*item 0 \('\('\) is not a valid"),
    # cross-field checks
    (
        ("multitask_yeast", "quick"),
        dict(log_every_steps=3),
        r"^config\.optim\.num_steps=4: must be a multiple of config\.log_every_steps=3",
    ),
    (
        ("tune_smollm2", "quick"),
        dict(optim__lr={"prompt": 1e-2}),
        r"^config\.optim\.lr: has no learning rate for 'prefix', 'lora', 'qlora'$",
    ),
    (
        ("tune_smollm2", "quick"),
        dict(optim__lr={"prompt": -1.0, "prefix": 1.0, "lora": 1.0, "qlora": 1.0}),
        r"^config\.optim\.lr=.*\['prompt'\]=-1\.0 must be a number > 0",
    ),
    (
        ("reft_minilm", "tiny"),
        dict(peft__reft_first_n=0, peft__reft_last_n=0),
        r"^config\.peft\.reft_first_n=0: and config\.peft\.reft_last_n are both 0",
    ),
    (
        ("maml_fewshot", "quick"),
        dict(data__ways=6),
        r"^config\.data\.num_train_classes=5: leaves fewer than config\.data\.ways=6",
    ),
    (
        ("maml_fewshot", "quick"),
        dict(meta__method="metasgd"),
        r"^config\.meta\.method='metasgd': must be one of 'maml', 'fomaml', 'anil', 'reptile',",
    ),
    (
        ("maml_fewshot", "quick"),
        dict(experiment="fewshot"),
        r"^config\.experiment='fewshot': must be one of .*; few-shot image episodes are "
        r"experiment 'meta' with a data\.dataset$",
    ),
    (
        ("maml_sinusoid", "quick"),
        dict(meta__metasgd_lr_init=(0.1, 0.01)),
        r"^config\.meta\.metasgd_lr_init=\(0\.1, 0\.01\): must be a pair \(low, high\)",
    ),
    (
        ("maml_sinusoid", "quick"),
        dict(evals__finetune_lr=0.1),  # a meta-learner fine-tunes with its inner rate
        r"^config\.evals\.finetune_lr=0\.1: takes effect only with a baseline .* 'maml' ",
    ),
    (
        ("maml_fewshot", "quick,method=finetune"),
        dict(evals__finetune_rules=DELETE),
        r"^config\.evals\.finetune_rules: is missing: the baseline fine-tunes with it$",
    ),
    (
        ("multitask_nlschools", "quick"),
        dict(multitask__lambdas=(((0.0, 1.0),),)),
        r"^config\.multitask\.lambdas=.*item 0 .* square \[T, T\]",
    ),
]


@pytest.mark.parametrize("where, values, message", CASES, ids=[str(c[2])[:40] for c in CASES])
def test_bad_value_is_refused_in_one_line_naming_the_key(where, values, message):
    config = _with(_config(*where), **values)
    with pytest.raises(schema.ConfigError, match=message) as caught:
        schema.validate(config)
    assert "\n" not in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_schema_choices_are_the_trainers_own():
    """The tables repeat the trainers' and library's names (so that validating imports no
    trainer); this keeps the copies equal."""
    from experiments import models  # noqa: PLC0415
    from experiments.trainers import decoder_tuning, meta, multitask, pretrain  # noqa: PLC0415
    from ftlab.data import images, streams  # noqa: PLC0415
    from ftlab.data import multitask as multitask_data  # noqa: PLC0415
    from ftlab.models import attention  # noqa: PLC0415

    def allowed(table, key, probe):
        return {v for v in probe if table[key].check(v) is None}

    def members(table, key, probe):
        return {v for v in probe if table[key].check((v,)) is None}

    k = schema.KINDS
    words = {"none", "lora", "maml", "fomaml", "anil", "reptile", "finetune", "metasgd", "x"}
    assert allowed(k["classification"][""], "peft.method", {*models.PEFT_METHODS, *words}) == set(
        models.PEFT_METHODS
    )
    for family, methods in meta.METHODS.items():
        assert allowed(k["meta"][family], "meta.method", {*methods, *words}) == set(methods)
    assert set(k["meta"]) == set(meta.FAMILIES)
    from ftlab import meta as meta_lib  # noqa: PLC0415

    # the baselines, whose config.evals.finetune_* the schema requires: the non-meta-learners
    baselines = {m for ms in meta.METHODS.values() for m in ms if m not in meta_lib.METHODS}
    assert set(schema.META_BASELINES) == baselines
    tab, text = k["multitask"]["tabular"], k["multitask"]["text"]
    assert members(tab, "methods", {*multitask.METHODS, "x"}) == set(multitask.METHODS)
    assert members(text, "methods", {*multitask.LORA_METHODS, "x"}) == set(multitask.LORA_METHODS)
    assert allowed(tab, "data.dataset", {*multitask_data.DATASETS, "x"}) == set(
        multitask_data.DATASETS
    )
    assert members(k["pretrain"][""], "methods", {*pretrain.METHODS, "x"}) == set(pretrain.METHODS)
    assert allowed(k["pretrain"][""], "data.dataset", {*images.DATASETS, "x"}) == set(
        images.DATASETS
    )
    dec = k["decoder_tuning"][""]
    assert members(dec, "methods", {*decoder_tuning.METHODS, "x"}) == set(decoder_tuning.METHODS)
    tasks = models.DECODER_TASKS  # ICL's and decoder tuning's
    assert members(k["icl"][""], "data.tasks", {*tasks, "x"}) == set(tasks)
    assert allowed(dec, "data.task", {*tasks, "x"}) == set(tasks)
    river = k["online"]["river"]
    assert allowed(river, "data.stream", {*streams.STREAMS, "x"}) == set(streams.STREAMS)
    enc = k["classification"][""]
    assert allowed(enc, "model.attention", {*attention.IMPLEMENTATIONS, "x"}) == set(
        attention.IMPLEMENTATIONS
    )
    from ftlab.core import train  # noqa: PLC0415

    assert allowed(enc, "step.remat_policy", {*train.REMAT_POLICIES, "", "x"}) == {
        "",
        *train.REMAT_POLICIES,
    }


def _saved(config):
    return json.loads(config.to_json_best_effort())


def test_changes_split_structural_from_other():
    old = _config(*PROBE)
    new = _with(old, optim__lr=0.01, optim__num_steps=9, model__num_classes=3, peft__rank=4)
    structural, other = schema.changes(_saved(old), new)
    assert structural == [("model.num_classes", 2, 3), ("peft.rank", 8, 4)]
    assert other == [("optim.lr", 0.003, 0.01), ("optim.num_steps", 6, 9)]
    assert schema.changes(_saved(old), old) == ([], [])


def test_changes_of_a_sweep_are_all_structural():
    # a finished run's result is only valid under the config it was recorded with
    old = _config("multitask_yeast", "quick")
    structural, other = schema.changes(_saved(old), _with(old, optim__lr=0.5))
    assert structural == [("optim.lr", 1e-3, 0.5)] and other == []


def test_an_online_run_resumes_from_checkpoints_of_its_learners():
    # the step sizes and the chunking make the saved state; logging and river's scores do not
    old = _config(*ONLINE)
    new = _with(old, sweep__learning_rates=(0.1,), data__chunk_size=32, evals__river=False)
    structural, other = schema.changes(_saved(old), new)
    assert [k for k, _, _ in structural] == ["data.chunk_size", "sweep.learning_rates"]
    assert other == [("evals.river", True, False)]
    assert schema.SAVED_STATE["online"] == "checkpoints"


def test_check_resume(tmp_path):
    old = _config(*PROBE)
    (tmp_path / schema.CONFIG_FILE).write_text(old.to_json_best_effort())
    changed = _with(old, optim__lr=0.01, model__num_classes=3)
    # nothing saved yet (a run that stopped before its first checkpoint): no comparison
    assert schema.check_resume(changed, tmp_path) == []
    (tmp_path / "checkpoints" / "3").mkdir(parents=True)
    with pytest.raises(
        schema.ConfigError,
        match=r"^config\.model\.num_classes: changed since the run in .* started, and its saved "
        r"checkpoints hold the old shapes: config\.model\.num_classes: 2 -> 3; use a new "
        r"--workdir, or the old values$",
    ):
        schema.check_resume(changed, tmp_path)
    assert schema.check_resume(_with(old, optim__lr=0.01), tmp_path) == [("optim.lr", 0.003, 0.01)]
