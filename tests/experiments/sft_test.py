"""The SFT trainer end to end (quick config: a tiny random Llama, a stand-in tokenizer, 24
ShareGPT conversations): it reports the held-out assistant-token loss before and after, that loss
is the plain unpacked computation's, a run stopped by ``max_steps_per_run`` and rerun ends as an
uninterrupted run does, every method builds its partition from the same config, and the schema
refuses a bad key."""

import json
import re

import ml_collections
import numpy as np
import pytest

from configs import sft_smollm2
from experiments import loop, models, schema
from experiments.trainers import sft as trainer
from ftlab.core import metrics as metrics_lib
from ftlab.core import partition
from ftlab.data import files
from ftlab.models import llama
from ftlab.posttrain import sft
from third_party import smollm2


def _computed(results):
    return {k: v for k, v in results.items() if k not in loop.MEASURED}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sft")
    config = sft_smollm2.get_config("quick")
    return workdir, config, trainer.train_and_evaluate(config, str(workdir))


def _tiny(config):
    convs = trainer.conversations(config)
    texts = [m["content"] for c in convs["train"][:200] for m in c]
    sub = ml_collections.ConfigDict(
        {"seed": config.seed, "model": {"name": "tiny", "vocab_size": config.model.vocab_size}}
    )
    return convs, models.decoder(sub, texts)


def test_quick_run_reports_the_held_out_loss_before_and_after(run):
    workdir, config, results = run
    assert json.loads((workdir / "results.json").read_text()) == results
    assert results["step"] == config.optim.num_steps
    assert "held-out loss before" in (workdir / "results.md").read_text()
    assert (workdir / "losses.png").stat().st_size > 0
    assert (
        json.loads((workdir / "before.json").read_text())["loss"]
        == (results["eval/test/loss_before"])
    )
    assert results["eval/test/loss"] < results["eval/test/loss_before"]
    lines = metrics_lib.read_jsonl(workdir / "metrics.jsonl")
    assert [r["step"] for r in lines if "train/loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in lines if "eval/test/loss" in r][0] == 2
    assert results["data"]["test"]["scored_tokens"] == results["eval/test/tokens"]


def test_held_out_loss_is_the_unpacked_assistant_token_nll(run):
    _, config, results = run
    convs, model = _tiny(config)
    encoded = sft.encode(
        model.tokenizer, convs["test"], render=files.chat_renderer(smollm2.CHAT_TEMPLATE)
    )
    seq_len = config.data.seq_len
    kept = [e for e in encoded if e.assistant_mask[1:seq_len].any()]
    rows = sft.pack(kept, seq_len=seq_len, pad_id=model.pad_id, max_segments=1)
    logits = np.asarray(
        llama.forward(model.config, model.params, rows.input_ids, rows.attention_mask),
        np.float64,
    )
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp, rows.targets[..., None], axis=-1)[..., 0]
    want = -(picked * rows.loss_mask).sum() / rows.loss_mask.sum()
    # LoRA starts at B = 0: the state before training is the base model
    np.testing.assert_allclose(results["eval/test/loss_before"], want, rtol=1e-5)


def test_rerun_after_max_steps_per_run_equals_an_uninterrupted_run(run, tmp_path):
    _, config, results = run
    config = config.copy_and_resolve_references()
    config.max_steps_per_run = 2
    assert trainer.train_and_evaluate(config, str(tmp_path)) == {"step": 2}
    assert _computed(trainer.train_and_evaluate(config, str(tmp_path))) == _computed(results)


@pytest.mark.parametrize(
    ("method", "trained"),
    [
        ("full", r".*"),
        ("lora", r".*/lora_(a|b)"),
        ("qlora", r".*/lora_(a|b)"),
        ("prompt", r"(.*/)?prompt"),
    ],
)
def test_every_method_from_the_same_config(run, method, trained):
    _, quick, _ = run
    config = sft_smollm2.get_config(f"quick,method={method}")
    schema.validate(config)
    _, model = _tiny(quick)
    params, rules, _ = trainer.add_method(config, model.params, model.config)
    labels = partition.flatten(partition.labels(params, rules))
    train = sorted(k for k, v in labels.items() if v != partition.FROZEN)
    assert train and all(re.fullmatch(trained, k) for k in train)
    if method == "qlora":  # the targeted kernels are held as 4-bit blocks
        flat = partition.flatten(params)
        assert any("down" in k and np.asarray(v).dtype == np.uint8 for k, v in flat.items())


def test_schema_refuses_a_bad_key():
    config = sft_smollm2.get_config("quick")
    config.method = "dpo"
    with pytest.raises(schema.ConfigError, match=r"config\.method='dpo': must be one of 'full'"):
        schema.validate(config)
    config = sft_smollm2.get_config("quick")
    config.optim.momentum = 0.9
    with pytest.raises(schema.ConfigError, match=r"config\.optim\.momentum: not a key of a 'sft'"):
        schema.validate(config)
