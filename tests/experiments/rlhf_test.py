"""The RLHF trainer end to end (quick config: a tiny random Llama with LoRA against a tiny BERT
reward model saved as experiments/trainers/reward.py saves one): PPO, GRPO and DPO each log a
finite reward and KL, leave the base bit-identical and move the LoRA leaves, and write their
results, samples and plot; a GRPO run stopped by ``max_steps_per_run`` and rerun ends as an
uninterrupted one does; a missing reward run is a one-line error naming the key; the schema and
the trainer refuse another algorithm's options."""

import json
import math

import jax
import jax.numpy as jnp
import pytest

from configs import reward_minilm, rlhf_smollm2
from experiments import loop, models, resume, schema, scorers
from experiments.trainers import rlhf as trainer
from ftlab.core import checkpoint, partition, report, train
from ftlab.core import metrics as metrics_lib


def _computed(results):
    return {k: v for k, v in results.items() if k not in loop.MEASURED}


@pytest.fixture(scope="module")
def reward_workdir(tmp_path_factory):
    """A finished reward run's workdir, as reward.py leaves it (its untrained tiny BERT scorer
    at step 1: the trainer only reads config.json, the checkpoint and results.json)."""
    workdir = tmp_path_factory.mktemp("reward")
    config = reward_minilm.get_config("quick")
    scorer = scorers.build_scorer(config, [])
    labels = partition.labels(scorer.params, [tuple(r) for r in config.partition.rules])
    state = train.init_state(scorer.params, labels, models.adamw(config, labels), seed=0)
    with checkpoint.Checkpointer(workdir / "checkpoints", save_every_steps=1) as ckpt:
        ckpt.save(1, resume.saved_part(state))
    report.save_text(workdir / "config.json", config.to_json_best_effort())
    report.save_json(workdir / "results.json", {"step": 1})
    return str(workdir)


def _config(algorithm, reward_workdir):
    config = rlhf_smollm2.get_config(f"algorithm={algorithm},quick")
    config.reward.workdir = reward_workdir
    schema.validate(config)
    return config


@pytest.fixture(scope="module")
def runs(reward_workdir, tmp_path_factory):
    out = {}
    for algorithm in trainer.ALGORITHMS:
        workdir = tmp_path_factory.mktemp(algorithm)
        config = _config(algorithm, reward_workdir)
        out[algorithm] = workdir, config, trainer.train_and_evaluate(config, str(workdir))
    return out


@pytest.mark.parametrize("algorithm", trainer.ALGORITHMS)
def test_quick_run_logs_reward_and_kl_and_trains_only_lora(runs, algorithm):
    workdir, config, results = runs[algorithm]
    assert json.loads((workdir / "results.json").read_text()) == results
    assert results["step"] == config.optim.num_steps
    assert results["base_unchanged"] and results["trainable_changed"]
    for key in ("eval/reward_before", "eval/reward", "eval/kl", "eval/completion_length"):
        assert math.isfinite(results[key]), key
    lines = metrics_lib.read_jsonl(workdir / "metrics.jsonl")
    evals = [r for r in lines if "eval/reward" in r]
    assert [r["step"] for r in evals] == [2, 3]  # every_steps=2, and the final evaluation
    if algorithm != "dpo":  # PPO and GRPO also log their own rollouts per step
        steps = [r for r in lines if "train/reward" in r]
        assert [r["step"] for r in steps] == [1, 2, 3]
        assert all(math.isfinite(r["train/reward"]) and math.isfinite(r["train/kl"]) for r in steps)
    if algorithm == "ppo":  # the adaptive KL coefficient moved
        assert {r["train/kl_coef"] for r in lines if "train/kl_coef" in r} != {0.1}
    # the points of "reward at KL": before, every evaluation, after
    assert [p["step"] for p in results["points"]] == [0, 2, 3]
    assert results["row"]["reward_at_kl"][f"{max(config.evals.kl_budgets):g}"] is not None
    samples = (workdir / "samples.md").read_text()
    rows = [line for line in samples.splitlines() if line.startswith("| ")][1:]
    assert len(rows) == config.evals.samples_shown
    assert (workdir / "rewards.png").stat().st_size > 0
    assert "reward at KL ≤ 2" in (workdir / "results.md").read_text()


def test_rerun_after_max_steps_per_run_equals_an_uninterrupted_run(runs, tmp_path):
    _, config, results = runs["grpo"]
    config = config.copy_and_resolve_references()
    config.max_steps_per_run = 1
    assert trainer.train_and_evaluate(config, str(tmp_path)) == {"step": 1}
    config.max_steps_per_run = 0
    resumed = trainer.train_and_evaluate(config, str(tmp_path))
    assert _computed(resumed) == _computed(results)


def test_the_schedule_counts_every_update_of_a_step(reward_workdir):
    config = _config("ppo", reward_workdir)
    config.ppo.epochs, config.ppo.minibatches = 2, 2
    assert trainer.updates_per_step(config) == 4
    state = {"w": jnp.zeros(3)}
    tx = trainer.optimizer(config, {"w": "train"})
    opt, update = tx.init(state), jax.jit(tx.update)
    for _ in range(4 * config.optim.num_steps - 1):  # all but the last update of the run
        _, opt = update({"w": jnp.ones(3)}, opt, state)
    updates, _ = update({"w": jnp.ones(3)}, opt, state)
    assert float(jnp.abs(updates["w"]).max()) > 0  # the learning rate is not 0 yet


def test_compare_tables_the_runs(runs):
    markdown, _ = trainer.compare([str(w) for w, _, _ in runs.values()], budgets=(1.0,))
    for algorithm in trainer.ALGORITHMS:
        assert f"| {algorithm} |" in markdown


def test_missing_reward_run_is_one_line_naming_the_key(tmp_path):
    config = rlhf_smollm2.get_config("quick")
    config.reward.workdir = str(tmp_path / "nothing")
    with pytest.raises(
        ValueError, match=r"^config\.reward\.workdir='.*nothing': no finished reward run there"
    ):
        trainer.train_and_evaluate(config, str(tmp_path / "run"))


def test_options_of_another_algorithm_are_refused(reward_workdir):
    config = _config("grpo", reward_workdir)
    config.dpo = {"beta": 0.1}
    schema.validate(config)  # the table allows each group; the trainer wants config.algorithm's
    with pytest.raises(ValueError, match=r"config\.dpo is set but config\.algorithm='grpo'"):
        trainer.train_and_evaluate(config, "/nonexistent")
    config.bogus = 1
    with pytest.raises(schema.ConfigError, match=r"config\.bogus: not a key of a 'rlhf' config"):
        schema.validate(config)
