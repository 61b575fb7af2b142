"""End to end: the ICL experiment's quick config writes its results, table, plot and metrics,
resumes from its finished tasks and writes nothing on process 1. (On 8 devices:
tests/experiments/trainers_test.py.)"""

import json

from configs import icl_smollm2
from experiments import loop
from experiments.trainers import icl as trainer
from ftlab.core import metrics as metrics_lib


def test_quick_run_writes_results(tmp_path):
    config = icl_smollm2.get_config("quick,tasks=sentiment")
    results = trainer.train_and_evaluate(config, str(tmp_path))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["tasks"].keys() == {"sentiment"}
    shots = saved["tasks"]["sentiment"]["shots"]
    assert list(shots) == ["0", "1", "2"]
    assert len(shots["0"]["accuracy_per_draw"]) == 1 and len(shots["2"]["accuracy_per_draw"]) == 2
    for s in shots.values():
        assert 0.0 <= s["mean"] <= 1.0 and s["std"] >= 0.0
    assert saved["tasks"] == results["tasks"]
    table = (tmp_path / "results.md").read_text()
    assert table.splitlines()[0] == "| task | majority | k=0 | k=1 | k=2 |"
    assert (tmp_path / "icl.png").stat().st_size > 1000
    steps = [r["step"] for r in metrics_lib.read_jsonl(tmp_path / "metrics.jsonl")]
    assert steps == [0, 1, 2]
    # A rerun reads the finished task instead of evaluating it again, and writes the same files.
    record = tmp_path / "finished" / "sentiment.json"
    mtime = record.stat().st_mtime_ns
    again = trainer.train_and_evaluate(config, str(tmp_path))
    assert again["tasks"] == results["tasks"] and record.stat().st_mtime_ns == mtime
    assert [r["step"] for r in metrics_lib.read_jsonl(tmp_path / "metrics.jsonl")] == [0, 1, 2]


def test_process_1_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "is_chief", lambda: False)
    config = icl_smollm2.get_config("quick,tasks=sentiment")
    config.icl.shots, config.data.num_test = (0,), 4
    results = trainer.train_and_evaluate(config, str(tmp_path / "run"))
    assert list(results["tasks"]["sentiment"]["shots"]) == ["0"]
    assert not (tmp_path / "run").exists()
