"""``config.step`` through the classification trainer (tiny random encoder, in-process): gradient
accumulation with per-layer rematerialisation gives the run of the plain step, a bfloat16 policy
stays close to it, and settings that could not take effect are refused naming the key."""

import pytest

from configs import finetune_minilm
from experiments import loop, schema
from experiments.trainers import classification as trainer
from ftlab.core import metrics as metrics_lib

STEPS = 4


def _config(**step):
    config = finetune_minilm.get_config("tiny")
    config.model.dropout_rate = 0.0  # micro-batches draw their own dropout masks
    config.optim.num_steps = STEPS
    config.log_every_steps = 1
    for key, value in step.items():
        config.step[key] = value
    schema.validate(config)
    return config


def _losses(workdir):
    lines = metrics_lib.read_jsonl(workdir / "metrics.jsonl")
    return [r["train/loss"] for r in lines if "train/loss" in r]


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("plain")
    return trainer.train_and_evaluate(_config(), str(workdir)), _losses(workdir)


def test_accumulated_rematerialised_step_equals_the_plain_step(plain, tmp_path):
    # 2 micro-batches of 4 (of the batch of 8), each encoder layer recomputed in the backward pass
    config = _config(
        accumulate=2, remat_policy="nothing_saveable", remat_modules=r"encoder/layer_\d+"
    )
    results = trainer.train_and_evaluate(config, str(tmp_path))
    assert _losses(tmp_path) == pytest.approx(plain[1], rel=1e-5)
    assert results["eval/test/loss"] == pytest.approx(plain[0]["eval/test/loss"], rel=1e-5)


def test_bfloat16_policy_trains_close_to_float32(plain, tmp_path):
    config = _config(compute_dtype="bfloat16", frozen_dtype="bfloat16")
    trainer.train_and_evaluate(config, str(tmp_path))
    losses = _losses(tmp_path)
    assert losses != plain[1]  # the policy took effect
    assert losses == pytest.approx(plain[1], rel=2e-2)


@pytest.mark.parametrize(
    ("step", "message"),
    [
        ({"accumulate": 3}, r"config.optim.batch_size=8: must be a multiple of config.step"),
        ({"remat_modules": "encoder"}, r"config.step.remat_modules='encoder': takes effect only"),
        ({"remat_policy": "save_all"}, r"config.step.remat_policy='save_all'"),
    ],
)
def test_settings_that_cannot_take_effect_name_the_key(step, message):
    with pytest.raises(schema.ConfigError, match=message):
        _config(**step)


def test_step_policy_refuses_remat_modules_without_a_policy():
    config = finetune_minilm.get_config("tiny")
    config.step.remat_modules = "encoder"
    with pytest.raises(ValueError, match=r"config.step.remat_modules='encoder' takes effect"):
        loop.step_policy(config)
