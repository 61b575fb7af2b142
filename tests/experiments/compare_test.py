"""The comparison report: every method runs, the best lr per method is kept, files are written."""

import json

from configs import compare_rotten_tomatoes
from experiments import compare


def test_compare_writes_table_json_and_plot(tmp_path):
    config = compare_rotten_tomatoes.get_config("tiny")
    config.methods = ("linear_probe", "lora")
    config.lrs.lora = (1e-3, 3e-2)
    rows = compare.compare(config, str(tmp_path))
    assert [r["method"] for r in rows] == ["linear_probe", "lora"]
    report = json.loads((tmp_path / "compare.json").read_text())
    assert len(report["runs"]) == 3
    lora_runs = [r for r in report["runs"] if r["method"] == "lora"]
    best = max(lora_runs, key=lambda r: (r["eval/validation/accuracy"], -r["lr"]))
    assert rows[1]["lr"] == best["lr"]
    assert rows[0]["trainable_params"] == 2 * 16 + 2  # the tiny model's head
    assert 0 < rows[1]["trainable_percent"] < 100
    table = (tmp_path / "compare.md").read_text()
    assert "| lora |" in table and "test acc" in table
    assert (tmp_path / "compare.png").stat().st_size > 1000
    # A second call reads the finished runs instead of training again.
    before = (tmp_path / "lora" / "lr_0.001" / "results.json").stat().st_mtime
    compare.compare(config, str(tmp_path))
    assert (tmp_path / "lora" / "lr_0.001" / "results.json").stat().st_mtime == before
