"""The launcher: config flags with overrides, and one-line errors that name the bad key."""

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _run(*args, tmp_path):
    return subprocess.run(
        [sys.executable, "-m", "experiments.main", f"--workdir={tmp_path}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    "args, expected",
    [
        (
            ["--config=configs/full_ft_minilm.py:tiny", "--config.optim.lrr=1"],
            r"--config.optim.lrr=1: unknown config key lrr Did you mean \"lr\"",
        ),
        (
            ["--config=configs/full_ft_minilm.py:tiny", "--config.optim.batch_size=abc"],
            r"--config.optim.batch_size=abc.*invalid literal for int",
        ),
        (["--config=configs/full_ft_minilm.py:tiyn"], r"unknown config option 'tiyn'"),
        (
            [
                "--config=configs/full_ft_minilm.py:tiny",
                "--config.partition.rules=(('encodr/.*','train'),('.*','frozen'))",
            ],
            r"config.partition.rules: pattern 'encodr/\.\*' matched no leaf; "
            r"top-level names are: encoder, head",
        ),
    ],
    ids=["unknown-key", "wrong-type", "unknown-option", "rule-matches-nothing"],
)
def test_bad_config_is_a_clear_error(args, expected, tmp_path):
    proc = _run(*args, tmp_path=tmp_path)
    assert proc.returncode != 0
    assert __import__("re").search(expected, proc.stderr), proc.stderr[-2000:]


def test_override_reaches_the_run(tmp_path):
    proc = _run(
        "--config=configs/linear_probe_minilm.py:tiny",
        "--config.optim.num_steps=2",
        "--config.checkpoint.every_steps=1",
        tmp_path=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "checkpoints" / "2").is_dir()
    assert '"num_steps": 2' in (tmp_path / "config.json").read_text()
