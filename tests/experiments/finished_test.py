"""experiments/finished.py: records of finished runs, and the metric lines kept."""

import json

import ml_collections
import pytest

from experiments import finished
from ftlab.core import metrics as metrics_lib


def _runs(tmp_path, lr=0.1):
    config = ml_collections.ConfigDict({"lr": lr})
    return finished.Runs(tmp_path, metric_prefix=lambda n: f"train/{n}/", config=config)


def test_put_get_and_the_lines_kept(tmp_path):
    runs = _runs(tmp_path)
    assert runs.get("a") is None and runs.names() == []
    with runs.open_writer() as w:
        w.write(1, {"train/a/loss": 1.0})
        w.write(1, {"train/b/loss": 2.0})
    runs.put("a", {"acc": 0.5})
    assert runs.get("a") == {"acc": 0.5} and runs.names() == ["a"]
    # b did not finish: its line goes, a's stays; new lines append
    with runs.open_writer() as w:
        w.write(2, {"train/b/loss": 3.0})
    lines = metrics_lib.read_jsonl(tmp_path / "metrics.jsonl")
    assert lines == [{"step": 1, "train/a/loss": 1.0}, {"step": 2, "train/b/loss": 3.0}]
    assert json.loads((tmp_path / "finished" / "a.json").read_text())["config"] == {"lr": 0.1}


def test_nothing_finished_starts_the_metrics_afresh(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train/a/loss": 1.0}\n')
    _runs(tmp_path).open_writer().close()
    assert metrics_lib.read_jsonl(tmp_path / "metrics.jsonl") == []


def test_errors_name_the_run_or_the_file(tmp_path):
    _runs(tmp_path).put("a", {})
    with pytest.raises(ValueError, match=r"a\.json was run with a different config"):
        _runs(tmp_path, lr=0.2).get("a")
    with pytest.raises(ValueError, match="cannot name a file"):
        _runs(tmp_path).put("x/y", {})


def test_a_line_cut_off_by_a_crash_does_not_stop_the_rerun(tmp_path):
    runs = _runs(tmp_path)
    runs.put("a", {})
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train/a/loss": 1.0}\n{"step": 2, "tr')
    runs.open_writer().close()
    assert metrics_lib.read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 1, "train/a/loss": 1.0}]
