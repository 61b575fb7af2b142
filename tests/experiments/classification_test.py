"""End to end: the classification trainer writes what it promises, resumes exactly, and keeps
its last good checkpoint when a run goes bad. Runs in-process on the tiny random encoder."""

import json
import logging
import pathlib
import re
import shutil

import chex
import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from safetensors import numpy as safetensors_numpy

from configs import finetune_minilm, linear_probe_minilm
from experiments import features as feature_cache
from experiments import loop, models
from experiments.trainers import classification as trainer
from ftlab.core import metrics as metrics_lib
from ftlab.core import parallel, partition, train
from ftlab.data import features
from ftlab.peft import adapters, dora, ia3, lora, prefix, prompt, reft
from ftlab.tasks import classification
from third_party import peft_format


def _config(**overrides):
    config = finetune_minilm.get_config("tiny")
    for key, value in overrides.items():
        node = config
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    return config


def _trainable_at(workdir, step):
    with ocp.StandardCheckpointer() as ckptr:
        path = (pathlib.Path(workdir) / "checkpoints" / str(step) / "default").resolve()
        return ckptr.restore(path)["trainable"]


def _lines(workdir):
    return metrics_lib.read_jsonl(pathlib.Path(workdir) / "metrics.jsonl")


def _measured(results):
    """Results without the timing and memory figures, which differ from run to run."""
    return {k: v for k, v in results.items() if k not in loop.MEASURED}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    results = trainer.train_and_evaluate(_config(), str(workdir))
    return workdir, results


def test_run_writes_metrics_plots_checkpoints_and_results(uninterrupted):
    workdir, results = uninterrupted
    assert {"eval/test/accuracy", "eval/validation/accuracy", "trainable_params"} <= set(results)
    assert json.loads((workdir / "results.json").read_text()) == results
    assert results["peak_rss_mib"] > 100 and results["train_step_s"] > 0
    steps = [x["step"] for x in _lines(workdir) if "train/loss" in x]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    for png in ("train.png", "eval.png"):
        assert (workdir / png).stat().st_size > 1000
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [
        3,
        6,
    ]


def test_interrupted_and_resumed_run_equals_uninterrupted(uninterrupted, tmp_path):
    ref_dir, ref_results = uninterrupted
    config = _config(max_steps_per_run=3)
    assert trainer.train_and_evaluate(config, str(tmp_path)) == {"step": 3}
    results = trainer.train_and_evaluate(config, str(tmp_path))
    assert _measured(results) == _measured(ref_results)
    chex.assert_trees_all_equal(_trainable_at(tmp_path, 6), _trainable_at(ref_dir, 6))

    def timeless(lines):
        return [{k: v for k, v in x.items() if "steps_per_sec" not in k} for x in lines]

    assert timeless(_lines(tmp_path)) == timeless(_lines(ref_dir))


def test_corrupt_latest_checkpoint_falls_back_to_previous(uninterrupted, tmp_path):
    ref_dir, ref_results = uninterrupted
    shutil.copytree(ref_dir / "checkpoints", tmp_path / "checkpoints")
    # Damage step 6: empty its tree metadata.
    for meta in (tmp_path / "checkpoints" / "6").rglob("_METADATA"):
        meta.write_bytes(b"")
    results = trainer.train_and_evaluate(_config(), str(tmp_path))
    assert (tmp_path / "checkpoints" / "quarantine").exists()
    # Resumed from step 3 and trained 4..6 again: the same result as never failing.
    assert _measured(results) == _measured(ref_results)


def test_nan_loss_stops_naming_the_step_and_keeps_last_good_checkpoint(tmp_path):
    trainer.train_and_evaluate(_config(max_steps_per_run=3), str(tmp_path))
    good = _trainable_at(tmp_path, 3)
    # Adam moves every weight by about lr per step: 1e38 overflows the next forward pass.
    with pytest.raises(FloatingPointError, match=r"step"):
        trainer.train_and_evaluate(_config(**{"optim.lr": 1e38}), str(tmp_path))
    ckpts = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert ckpts == [3]
    chex.assert_trees_all_equal(_trainable_at(tmp_path, 3), good)


@pytest.mark.parametrize("method", sorted(finetune_minilm.PEFT))
def test_peft_configs_train_exactly_the_method_leaves_and_the_head(method):
    """The config's own rules pick the method's leaves (its `adapter`) plus the head, nothing else.

    Training each method and checking frozen leaves bit for bit is done per method in
    tests/peft/*_test.py; here the configs' regexes are checked against the methods' leaves.
    """
    config = finetune_minilm.get_config(f"tiny,method={method}")
    model, params = models.encoder_classifier(config)
    params, _ = models.encoder_method(config, params, models.classifier_apply(model))
    labels = partition.labels(params, [tuple(r) for r in config.partition.rules])
    trainable, _ = partition.split(params, labels)
    module = {"lora": lora, "dora": dora, "ia3": ia3, "adapters": adapters}.get(method)
    module = module or {"prompt": prompt, "prefix": prefix, "reft": reft}[method]
    expected = set(partition.flatten(module.adapter(params))) | {"head/kernel", "head/bias"}
    assert set(partition.flatten(trainable)) == expected


@pytest.mark.parametrize("method", ["full", "linear_probe", "bitfit", "lora"])
def test_method_configs_freeze_what_they_say(method):
    config = finetune_minilm.get_config(f"tiny,method={method}")
    model, params = models.encoder_classifier(config)
    params, apply = models.encoder_method(config, params, models.classifier_apply(model))
    labels = partition.labels(params, [tuple(r) for r in config.partition.rules])
    tx = models.adamw(config, labels)
    trainable, frozen = partition.split(params, labels)
    state = train.init_state(jax.tree.map(np.array, params), labels, tx, seed=0)
    opt_size = sum(np.size(x) for x in jax.tree.leaves(state.opt_state))
    counts = sum(np.size(x) for x in jax.tree.leaves(optax.tree.zeros_like(trainable)))
    assert 2 * counts <= opt_size <= 2 * counts + 4  # adam's mu, nu (+ counters), nothing frozen
    plan = parallel.make_plan("mesh")

    loss_fn = classification.make_loss_fn(apply)
    step = plan.compile_train_step(train.make_train_step(loss_fn, tx))
    state = plan.put_state(state)
    rng = np.random.default_rng(0)
    for _ in range(2):
        batch = {
            "input_ids": rng.integers(0, 30522, (8, 16)).astype(np.int32),
            "attention_mask": np.ones((8, 16), np.int32),
            "label": rng.integers(0, 2, (8,)).astype(np.int32),
        }
        state, _ = step(state, plan.put_batch(batch))
    chex.assert_trees_all_equal(state.frozen, frozen)
    if method == "linear_probe":
        assert set(partition.flatten(trainable)) == {"head/kernel", "head/bias"}
    if method == "bitfit":
        assert all(
            n.endswith("bias") or n.startswith("head/") for n in partition.flatten(trainable)
        )
    if method == "full":
        assert frozen == {}
    if method == "lora":
        names = set(partition.flatten(trainable))
        assert names and all(
            n.startswith("head/") or n.endswith(("lora_a", "lora_b")) for n in names
        )


def test_lora_run_saves_the_adapter_alone(tmp_path):
    config = finetune_minilm.get_config("tiny,method=lora,steps=2")
    results = trainer.train_and_evaluate(config, str(tmp_path))
    saved = safetensors_numpy.load_file(str(tmp_path / "adapter.safetensors"))
    adapter = lora.adapter(partition.unflatten(saved))
    assert set(saved) - set(partition.flatten(adapter)) == {"head/kernel", "head/bias"}
    assert set(partition.flatten(adapter)) == {
        f"encoder/layer_{i}/attention/{m}/lora_{ab}"
        for i in range(2)
        for m in ("query", "value")
        for ab in "ab"
    }
    assert results["adapter_bytes"] < 100_000
    imported, _ = peft_format.import_(tmp_path / "adapter_peft", prefix="encoder/")
    chex.assert_trees_all_equal(partition.flatten(imported), partition.flatten(adapter))


def test_bf16_compute_with_a_fused_attention_kernel_gives_float32_gradients():
    """config.model.dtype/attention/attention_dropout_rate reach the encoder; params stay f32."""
    config = _config(
        **{
            "model.dtype": "bfloat16",
            "model.attention": "xla",  # the fused path; cuDNN takes the same one on a GPU
            "model.attention_dropout_rate": 0.0,
            "model.dropout_rate": 0.1,  # hidden dropout stays on
        }
    )
    model, params = models.encoder_classifier(config)
    assert model.config.dtype == jax.numpy.bfloat16 and model.config.attention == "xla"
    assert model.config.probs_dropout_rate == 0.0 and model.config.dropout_rate == 0.1
    apply = models.classifier_apply(model)
    ids = np.array([[101, 7, 9, 102, 0], [101, 5, 6, 8, 102]], np.int32)
    batch = {"input_ids": ids, "attention_mask": (ids > 0).astype(np.int32)}

    def loss(p):
        logits = apply(p, batch, jax.random.key(0))
        return optax.softmax_cross_entropy_with_integer_labels(logits, np.array([0, 1])).mean()

    grads = jax.jit(jax.grad(loss))(params)
    for leaf in jax.tree.leaves(grads):
        assert leaf.dtype == np.float32 and np.all(np.isfinite(leaf))


@pytest.mark.parametrize(
    "key, value",
    [("model.dtype", "float16"), ("model.attention", "flash")],
)
def test_bad_model_settings_name_the_config_key(key, value):
    with pytest.raises(ValueError, match=f"config.{key}={value!r}"):
        models.encoder_classifier(_config(**{key: value}))


def test_random_minilm_has_the_pretrained_tree(minilm):
    """model.pretrained=False: MiniLM's architecture without its package (GPU benchmarks)."""
    config = finetune_minilm.get_config("quick")
    config.model.pretrained = False
    model, params = models.encoder_classifier(config)
    assert model.config == minilm.config
    want = jax.tree.map(np.shape, minilm.params)
    assert jax.tree.map(np.shape, params["encoder"]) == want


def test_quick_config_on_real_minilm(tmp_path):
    config = finetune_minilm.get_config("quick,method=linear_probe,steps=2")
    results = trainer.train_and_evaluate(config, str(tmp_path))
    assert results["trainable_params"] == 384 * 2 + 2  # the head alone
    assert results["total_params"] == 22_565_376 + 770
    assert 0.0 <= results["eval/test/accuracy"] <= 1.0


def test_no_recompilation_inside_the_loop(tmp_path):
    lowered = []

    def listener(event, duration_secs, **kwargs):
        if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
            lowered.append(kwargs.get("fun_name", "?"))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        # 5 steps with an evaluation every 2: several steps and evaluations in one run
        config = _config(**{"optim.num_steps": 5, "evals.every_steps": 2})
        trainer.train_and_evaluate(config, str(tmp_path))
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    # One train step and one eval step per run, however many steps and evaluations.
    assert lowered.count("jit(step)") == 1, lowered
    assert lowered.count("jit(eval_step)") == 1, lowered


def _probe(**overrides):
    config = linear_probe_minilm.get_config("tiny,steps=3")
    for key, value in overrides.items():
        node = config
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    return config


def test_cached_feature_probe_equals_uncached_reuses_and_recomputes(tmp_path, monkeypatch, caplog):
    """The probe on cached head inputs is the probe: same results to the last digit; the cache
    is read instead of running the encoder again, and a changed key recomputes it, saying so."""
    calls = []
    compute = features.compute
    monkeypatch.setattr(features, "compute", lambda *a, **k: calls.append(1) or compute(*a, **k))
    caplog.set_level(logging.INFO)
    uncached = trainer.train_and_evaluate(_probe(**{"data.cache_features": False}), tmp_path / "a")
    assert calls == [] and not (tmp_path / "a" / feature_cache.FILE).exists()

    cached = trainer.train_and_evaluate(_probe(), tmp_path / "b")
    assert len(calls) == 3  # train, validation, test: one pass each
    assert _measured(cached) == _measured(uncached)
    chex.assert_trees_all_close(_trainable_at(tmp_path / "b", 3), _trainable_at(tmp_path / "a", 3))

    # A new run with the cache in its workdir runs no encoder forward pass.
    (tmp_path / "c").mkdir()
    shutil.copy(tmp_path / "b" / feature_cache.FILE, tmp_path / "c")
    calls.clear()
    assert _measured(trainer.train_and_evaluate(_probe(), tmp_path / "c")) == _measured(cached)
    assert calls == []

    # Other inputs (a shorter max_length): the stale cache is recomputed, and the log says why.
    shutil.rmtree(tmp_path / "c" / "checkpoints")
    caplog.clear()
    trainer.train_and_evaluate(_probe(**{"data.max_length": 16}), tmp_path / "c")
    assert len(calls) == 3
    assert "recomputing, the cache cannot be used" in caplog.text
    assert "computed for a different inputs" in caplog.text


@pytest.mark.parametrize(
    "method, overrides, reason",
    [
        ("full", {}, r"config.partition.rules train leaves below the head, e.g. encoder/"),
        ("linear_probe", {"model.dropout_rate": 0.1}, r"dropout \(config.model.dropout_rate=0.1"),
        ("lora", {}, r"config.partition.rules train leaves below the head"),
    ],
)
def test_cache_features_refuses_a_trunk_that_trains_or_is_random(
    method, overrides, reason, tmp_path
):
    config = finetune_minilm.get_config(f"tiny,method={method}")
    config.data.cache_features = True
    for key, value in overrides.items():
        section, name = key.split(".")
        config[section][name] = value
    model, params = models.encoder_classifier(config)
    params, _ = models.encoder_method(config, params, models.classifier_apply(model))
    labels = partition.labels(params, [tuple(r) for r in config.partition.rules])
    assert re.search(reason, feature_cache.blocker(config, model, labels))
    # The run refuses before training, naming the key and the cause.
    with pytest.raises(ValueError, match=r"config.data.cache_features=True, but " + reason):
        trainer.train_and_evaluate(config, str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()
