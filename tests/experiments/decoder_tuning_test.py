"""End to end: few-shot decoder tuning (prompt, prefix, LoRA, QLoRA) on the quick config."""

import json

from absl.testing import flagsaver  # noqa: F401  (absl is a dependency; keeps flags untouched)

from configs import tune_smollm2
from experiments.trainers import decoder_tuning


def test_quick_run_trains_every_method_and_resumes(tmp_path):
    config = tune_smollm2.get_config("quick,num_examples=4,methods=prompt+qlora")
    rows = decoder_tuning.train_and_evaluate(config, str(tmp_path))
    assert [r["method"] for r in rows] == ["prompt", "qlora"]
    results = json.loads((tmp_path / "results.json").read_text())
    assert {r["method"] for r in results["runs"]} == {"prompt", "qlora"}
    for r in results["runs"]:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["steps"] == 2 and r["num_test"] == 8
    by = {r["method"]: r for r in results["runs"]}
    # QLoRA holds part of the base as 4-bit blocks: fewer bytes than the float32 base prompt
    # tuning keeps frozen (the prompt itself is trainable, not part of the base)
    assert by["qlora"]["base_mib_during_training"] < by["prompt"]["base_mib_during_training"]
    assert (tmp_path / "tuning_vs_icl.png").stat().st_size > 0
    # a second invocation finds every run finished and only rewrites the report
    before = (tmp_path / "runs" / "qlora_n4_s0.json").read_text()
    decoder_tuning.train_and_evaluate(config, str(tmp_path))
    assert (tmp_path / "runs" / "qlora_n4_s0.json").read_text() == before
