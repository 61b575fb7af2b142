"""The experiment loop on a toy regression: its schedule, writers on process 0 only, the stop on a
non-finite loss naming the step, a profiler trace of a chosen step, evaluators chosen by name, the
plan chosen by the config. (Every trainer on 8 devices: tests/experiments/trainers_test.py.)"""

import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from experiments import loop
from ftlab.core import metrics as metrics_lib
from ftlab.core import parallel, partition, train


def _config(**overrides):
    c = ml_collections.ConfigDict()
    c.optim = {"num_steps": 5}
    c.log_every_steps = 2
    c.max_steps_per_run = 0
    c.checkpoint = {"every_steps": 2, "keep": 5}
    for key, value in overrides.items():
        group, _, name = key.rpartition(".")
        if group and group not in c:
            c[group] = ml_collections.ConfigDict()
        (c[group] if group else c)[name] = value
    return c


def _loss_fn(params, batch, rng):
    del rng
    return jnp.mean((batch["x"] * params["w"] - batch["y"]) ** 2), {}


def _batch_at(step, bad_step=None):
    x = np.full((4,), 1.0 + step, np.float32)
    y = 2.0 * x
    if step == bad_step:
        y = y * np.nan
    return {"x": x, "y": y}


def _run(workdir, config=None, *, bad_step=None, evaluators=()):
    params = {"w": np.zeros((), np.float32)}
    tx = optax.sgd(1e-3)
    state = train.init_state(params, partition.labels(params, [(".*", "train")]), tx, seed=0)
    run = loop.train(
        config or _config(),
        workdir,
        plan=parallel.make_plan("mesh", num_devices=1),
        state=state,
        step_fn=train.make_train_step(_loss_fn, tx),
        batch_at=lambda step: _batch_at(step, bad_step),
        evaluators=evaluators,
    )
    run.close()
    return run


def _lines(workdir):
    return metrics_lib.read_jsonl(workdir / "metrics.jsonl")


def test_itstime_every_listed_and_last():
    due = [s for s in range(1, 13) if loop.itstime(s, 5, steps=(3,), total_steps=12, last=True)]
    assert due == [3, 5, 10, 12]
    assert not any(loop.itstime(s, 0) for s in range(1, 5))


def test_schedule_logs_evaluates_and_saves_on_their_steps(tmp_path):
    calls = []

    def evaluate(state):
        calls.append(int(state.step))
        return {"eval/w": state.trainable["w"]}

    run = _run(tmp_path, evaluators=[loop.Evaluator("w", evaluate, every_steps=3)])
    assert run.finished and run.step == 5
    # log every 2 and at the last step; evaluate every 3, never at the last step
    assert [r["step"] for r in _lines(tmp_path)] == [2, 3, 4, 5]
    assert calls == [3]
    assert "eval/w" in _lines(tmp_path)[1]
    assert sorted(
        int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()
    ) == [
        2,
        4,
        5,
    ]


def test_writers_run_on_process_zero_only(tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "is_chief", lambda: False)
    run = _run(tmp_path)
    assert run.finished and not run.is_chief
    assert not (tmp_path / "metrics.jsonl").exists()
    assert not (tmp_path / "tensorboard").exists()


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    # batch_at(2) is the batch of step 3 (steps count from 1 when done)
    with pytest.raises(metrics_lib.NonFiniteMetricError, match=r"train/loss=nan at step 3"):
        _run(tmp_path, bad_step=2)
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [2]
    # the rerun resumes from step 2 and goes bad at step 3 again, naming it
    with pytest.raises(metrics_lib.NonFiniteMetricError, match=r"steps \(2, 3\]"):
        _run(tmp_path, bad_step=2)


def test_non_finite_evaluation_metric_stops_naming_the_step(tmp_path):
    bad = loop.Evaluator("bad", lambda state: {"eval/x": float("inf")}, every_steps=2)
    with pytest.raises(metrics_lib.NonFiniteMetricError, match=r"eval/x=inf at step 2"):
        _run(tmp_path, evaluators=[bad])


def test_profile_trace_written_for_a_chosen_step(tmp_path):
    _run(tmp_path, _config(**{"profile.steps": (2,), "optim.num_steps": 2}))
    traces = list((tmp_path / loop.PROFILE_DIR).rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    with pytest.raises(ValueError, match=r"config.profile.steps=\(2, 9\): step\(s\) \[9\]"):
        _run(tmp_path / "late", _config(**{"profile.steps": (2, 9)}))


def test_evaluator_chosen_by_name(tmp_path):
    @loop.register("test_weight")
    def _weight(*, scale, offset=0.0):
        return lambda state: {"eval/scaled_w": scale * float(state.trainable["w"]) + offset}

    plugins = {"w3": {"type": "test_weight", "every_steps": 2, "scale": 3.0}}
    evaluators = loop.from_config(plugins)
    assert [e.name for e in evaluators] == ["w3"] and evaluators[0].every_steps == 2
    _run(tmp_path, evaluators=evaluators)
    logged = [r for r in _lines(tmp_path) if "eval/scaled_w" in r]
    assert [r["step"] for r in logged] == [2, 4] and logged[0]["eval/scaled_w"] > 0
    with pytest.raises(ValueError, match=r"config.evals.plugins.x.type='nope'; expected one of"):
        loop.from_config({"x": {"type": "nope"}})
    with pytest.raises(ValueError, match=r"config.evals.plugins.w3: .*unexpected keyword"):
        loop.from_config({"w3": {"type": "test_weight", "scale": 1.0, "typo": 1}})
    # a trainer offers its own types only; a type name has one factory
    with pytest.raises(ValueError, match=r"plugins.w3.type='test_weight'; expected one of loss$"):
        loop.from_config(plugins, types=("loss",))
    with pytest.raises(ValueError, match=r"type 'test_weight' is registered already, by .*_weight"):
        loop.register("test_weight")(lambda: None)


def test_classification_evaluator_chosen_by_name_in_the_config(tmp_path):
    from configs import finetune_minilm
    from experiments import schema
    from experiments.trainers import classification

    config = finetune_minilm.get_config("tiny,method=linear_probe,steps=4")
    config.evals.every_steps = 4  # the built-in validation evaluator: never before the end
    config.evals.plugins = {"test_acc": {"type": "accuracy", "split": "test", "every_steps": 2}}
    config.profile = {"steps": (3,)}
    schema.validate(config)
    classification.train_and_evaluate(config, str(tmp_path))
    evaluated = [r for r in _lines(tmp_path) if any(k.startswith("eval/") for k in r)]
    assert [r["step"] for r in evaluated] == [2, 4]
    assert [k for k in evaluated[0] if k.startswith("eval/")] == ["eval/test/accuracy"]
    assert list((tmp_path / loop.PROFILE_DIR).rglob("*.xplane.pb"))
    config.profile.steps = (3, 5)
    with pytest.raises(schema.ConfigError, match=r"config.profile.steps=\(3, 5\): names step"):
        schema.validate(config)
    config.profile.steps = (3,)
    config.evals.plugins = {"val": {"type": "loss", "split": "dev"}}
    with pytest.raises(ValueError, match=r"plugins.val: split='dev' is not one of"):
        classification.train_and_evaluate(config, str(tmp_path / "dev"))
    config.evals.plugins = {"x": {"every_steps": 2}}
    with pytest.raises(schema.ConfigError, match=r"config.evals.plugins=.*must map names"):
        schema.validate(config)


def test_plan_from_shards_parameters_by_rules_and_refuses_a_mesh_without_rules(tmp_path):
    config = _config(**{"parallel.mode": "mesh", "parallel.num_devices": 0, "parallel.mesh": ""})
    config.parallel.sharding_rules = ()
    assert type(loop.plan_from(config)) is parallel.Plan
    config.parallel.sharding_rules = ((".*", "fsdp"),)
    plan = loop.plan_from(config)
    assert isinstance(plan, parallel.ShardedPlan) and plan.mesh.axis_names == (
        "data",
        "fsdp",
        "tensor",
    )
    # the loop runs on it as on the data-parallel plan: same numbers, saved and resumed
    params = {"w": np.zeros((), np.float32)}
    tx = optax.sgd(1e-3)
    state = train.init_state(params, partition.labels(params, [(".*", "train")]), tx, seed=0)
    run = loop.train(
        _config(),
        tmp_path,
        plan=plan,
        state=state,
        step_fn=train.make_train_step(_loss_fn, tx),
        batch_at=_batch_at,
    )
    run.close()
    _run(tmp_path / "plain")

    def computed(workdir):
        return [{k: v for k, v in r.items() if k != "train/steps_per_sec"} for r in _lines(workdir)]

    assert computed(tmp_path) == computed(tmp_path / "plain")
    config.parallel.mode = "pmap"
    with pytest.raises(ValueError, match=r"config.parallel.mode='pmap': sharded parameters"):
        loop.plan_from(config)
    config.parallel.mode, config.parallel.sharding_rules = "mesh", ()
    config.parallel.mesh = "fsdp=2"
    with pytest.raises(ValueError, match=r"config.parallel.mesh='fsdp=2' takes effect only with"):
        loop.plan_from(config)
    config.parallel.mesh, config.parallel.fsdp_min_bytes = "", 128
    with pytest.raises(ValueError, match=r"config.parallel.fsdp_min_bytes=128 takes effect only"):
        loop.plan_from(config)
    with pytest.raises(ValueError, match=r"mesh='dat=2': 'dat=2' is not 'axis=size'"):
        loop.parse_mesh("dat=2")


def test_refuse_pmap_names_why_and_the_way_out_only_for_several_devices():
    import types  # noqa: PLC0415

    loop.refuse_pmap(types.SimpleNamespace(mode="pmap", num_devices=1), "splits it")
    loop.refuse_pmap(types.SimpleNamespace(mode="mesh", num_devices=8), "splits it")
    with pytest.raises(ValueError) as e:
        loop.refuse_pmap(types.SimpleNamespace(mode="pmap", num_devices=8), "splits it",
                         otherwise=" or a batch size")  # fmt: skip
    assert str(e.value) == "config.parallel.mode='pmap' splits it; use mode 'mesh' or a batch size"
