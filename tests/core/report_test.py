"""The report module: exact Markdown, JSON round trip, the 95% interval, PNG files."""

import json
import struct

import matplotlib
import numpy as np
import pytest

from ftlab.core import report


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_markdown_table_renders_exactly():
    text = report.markdown_table(
        ["method", "acc"], [["lora", "0.812"], ["probe", ""]], notes=["(test accuracy)"]
    )
    assert text == (
        "| method | acc |\n|---|---|\n| lora | 0.812 |\n| probe |  |\n\n(test accuracy)\n"
    )
    assert report.markdown_table(["a"], []) == "| a |\n|---|\n"


def test_markdown_table_refuses_a_short_row():
    with pytest.raises(ValueError, match=r"rows\[1\] has 1 cells, header has 2"):
        report.markdown_table(["a", "b"], [["1", "2"], ["3"]])


def test_save_table_round_trips_json_and_leaves_no_temporary(tmp_path):
    data = {"rows": [{"method": "lora", "accuracy": 0.8125, "seeds": [0, 1]}], "n": None}
    text = report.markdown_table(["method"], [["lora"]])
    md, js = report.save_table(tmp_path / "sub" / "results", markdown=text, data=data)
    assert (md.name, js.name) == ("results.md", "results.json")
    assert md.read_text() == text
    assert json.loads(js.read_text()) == data
    assert js.read_text().endswith("}\n")
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["results.json", "results.md"]


def test_interval95_matches_the_closed_form():
    # values 1..4: mean 2.5, population std sqrt(1.25), n 4 -> 1.96 * 1.1180 / 2 = 1.0957
    mean, half = report.interval95([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5
    assert half == pytest.approx(1.96 * np.sqrt(1.25) / 2, rel=1e-12)
    assert half == pytest.approx(1.095673, abs=1e-6)
    assert report.interval95([3.0]) == (3.0, 0.0)
    with pytest.raises(ValueError, match="values is empty"):
        report.interval95([])


def test_line_plot_saves_a_png_of_the_expected_size_without_switching_backend(tmp_path):
    backend = matplotlib.get_backend()
    fig = report.line_plot(
        [
            report.Line([1, 2, 4], [0.5, 0.6, 0.7], yerr=[0.1, 0.1, 0.05], label="a"),
            report.Line([1, 2, 4], [0.4, 0.5, 0.5], label="b", style={"linestyle": "--"}),
        ],
        hlines=[report.HLine(0.5, label="majority", style={"color": "grey"})],
        xlabel="n",
        ylabel="accuracy",
        title="t",
        xscale=("log", {"base": 2}),
        legend={"fontsize": 8},
        figsize=(5, 3.5),
    )
    path = report.save_figure(fig, tmp_path / "plots" / "a.png", dpi=100)
    assert _png_size(path) == (500, 350)
    assert matplotlib.get_backend() == backend
    fig = report.scatter_plot([(10, 80.0, "lora"), (1000, 85.0, "full")], xlabel="x", ylabel="y")
    assert _png_size(report.save_figure(fig, tmp_path / "s.png", dpi=50)) == (350, 225)


def test_panels_plot_draws_one_axes_per_panel(tmp_path):
    panels = [
        report.Panel(
            [
                report.Line(
                    [0, 1], [0, 1], label="K=2", style={"color": "k", "marker": "^", "ls": "none"}
                )
            ],
            title=f"task {i}",
            ylim=(-6.0, 6.0),
            legend={"fontsize": 7} if i == 0 else None,
        )
        for i in range(3)
    ]
    fig = report.panels_plot(panels, figsize=(3, 2), suptitle="adapted")
    assert [ax.get_title() for ax in fig.axes] == ["task 0", "task 1", "task 2"]
    assert fig.axes[2].get_ylim() == (-6.0, 6.0) and fig.axes[1].get_legend() is None
    assert _png_size(report.save_figure(fig, tmp_path / "p.png", dpi=90)) == (270, 180)


def test_save_curves_writes_one_png_per_group(tmp_path):
    records = [
        {"step": 1, "train/loss": 1.0, "train/lr": 0.1, "note": "x"},
        {"step": 2, "train/loss": 0.5, "eval/acc": 0.7, "flag": True},
        {"train/loss": 9.0},  # no step: skipped
    ]
    written = report.save_curves(records, tmp_path)
    assert [p.name for p in written] == ["eval.png", "train.png"]
    assert _png_size(written[1]) == (900, 320)  # two panels of 4.5 x 3.2 inches at 100 dpi


def test_table_formats_each_column_and_leaves_a_missing_value_blank():
    rows = [{"m": "lora", "acc": 0.8125, "n": 1200}, {"m": "probe", "acc": None}]
    columns = [
        report.Column("m"),
        report.Column("test acc", "acc", "{:.1%}"),
        report.Column("n", fmt="{:,}"),
        report.Column("tag", lambda r: r["m"].upper(), lambda v: f"<{v}>"),
    ]
    assert report.table(rows, columns, notes=["(n)"]) == (
        "| m | test acc | n | tag |\n|---|---|---|---|\n"
        "| lora | 81.2% | 1,200 | <LORA> |\n| probe |  |  | <PROBE> |\n\n(n)\n"
    )


def test_pivot_and_grouped_lines_follow_first_appearance():
    rows = [
        {"m": "b", "n": 4, "acc": 0.7, "std": 0.1},
        {"m": "a", "n": 1, "acc": 0.5, "std": 0.0},
        {"m": "b", "n": 1, "acc": 0.6, "std": 0.2},
    ]
    wide = report.pivot(rows, index=["m"], column="n")
    assert [sorted(w, key=str) for w in wide] == [[1, 4, "m"], [1, "m"]]
    assert wide[0]["m"] == "b" and wide[0][4] is rows[0] and wide[0][1] is rows[2]
    lines = report.grouped_lines(
        rows, by=["m"], x="n", y="acc", yerr="std", label=lambda m: f"method {m}", style={"c": "k"}
    )
    assert [(ln.label, ln.x, ln.y, ln.yerr, ln.style) for ln in lines] == [
        ("method b", [1, 4], [0.6, 0.7], [0.2, 0.1], {"c": "k"}),
        ("method a", [1], [0.5], [0.0], {"c": "k"}),
    ]
