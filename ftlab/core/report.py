"""Tables (Markdown and JSON) and plots (PNG) of experiment results.

Every trainer reports through these few functions: cells are formatted by the caller (each
experiment knows its units), rendering and file writing happen here once.

    text = report.markdown_table(["method", "accuracy"], [["lora", "0.812"]])
    text = report.table(rows, [report.Column("method"), report.Column("accuracy", fmt="{:.3f}")])
    report.save_table(workdir / "results", markdown=text, data=results)  # .md and .json
    figure = report.line_plot([report.Line(x, y, yerr=err, label="lora")], xlabel="n", ...)
    report.save_figure(figure, workdir / "accuracy.png", dpi=110)

The module lives in `ftlab/` because it reads no flags and writes only in its `save_*` functions,
so notebooks and tests use it without the launcher. Figures are `matplotlib.figure.Figure` objects
drawn on their own Agg canvas: no `matplotlib.use` and no pyplot state, so the caller's backend (a
notebook's, say) is left alone and nothing has to be closed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "Column",
    "HLine",
    "Line",
    "Panel",
    "curves",
    "figure",
    "grouped_lines",
    "interval95",
    "line_plot",
    "markdown_table",
    "pivot",
    "panels_plot",
    "save_curves",
    "save_figure",
    "save_json",
    "save_table",
    "save_text",
    "scatter_plot",
    "table",
]

# z of the two-sided 95% normal interval.
_Z95 = 1.96


def markdown_table(
    header: Sequence[str], rows: Sequence[Sequence[str]], *, notes: Sequence[str] = ()
) -> str:
    """A Markdown table of formatted cells, then (after a blank line) one line per note.

    Args:
        header: The column titles.
        rows: One sequence of cell strings per row, each as long as ``header``.
        notes: Lines printed under the table (e.g. what the cells hold).

    Returns:
        The table, ending in a newline.

    Raises:
        ValueError: A row's length differs from the header's (names the row).
    """
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, row in enumerate(rows):
        if len(row) != len(header):
            raise ValueError(
                f"markdown_table: rows[{i}] has {len(row)} cells, header has {len(header)}"
            )
        lines.append("| " + " | ".join(row) + " |")
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


@dataclasses.dataclass(frozen=True)
class Column:
    """One column of `table`: its title, where its value comes from and how it is written.

    Attributes:
        title: The column title.
        value: A key of the row, or ``row -> value``; None: ``title`` is the key.
        fmt: ``fmt.format(value)``, or ``fmt(value) -> str``; a value that is None (or a key
            the row lacks) gives an empty cell.
    """

    title: str
    value: str | Callable[[Mapping[str, Any]], Any] | None = None
    fmt: str | Callable[[Any], str] = "{}"

    def cell(self, row: Mapping[str, Any]) -> str:
        """The formatted cell of ``row``."""
        key = self.title if self.value is None else self.value
        value = key(row) if callable(key) else row.get(key)
        if value is None:
            return ""
        return self.fmt(value) if callable(self.fmt) else self.fmt.format(value)


def table(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[Column], *, notes: Sequence[str] = ()
) -> str:
    """`markdown_table` of one row per ``rows`` entry, its cells as ``columns`` say.

    >>> print(table([{"m": "lora", "acc": 0.8125}], [Column("m"), Column("acc", fmt="{:.2f}")]))
    | m | acc |
    |---|---|
    | lora | 0.81 |
    <BLANKLINE>
    """
    return markdown_table(
        [c.title for c in columns], [[c.cell(r) for c in columns] for r in rows], notes=notes
    )


def pivot(
    rows: Sequence[Mapping[str, Any]], *, index: Sequence[str], column: str
) -> list[dict[Any, Any]]:
    """Long rows to wide ones: one per distinct ``index`` values, keyed by ``column``'s values.

    Each wide row holds the ``index`` keys and, under each value ``v`` of ``column``, the long
    row that has it (the last one, if several); order is that of first appearance.

    >>> pivot([{"m": "a", "n": 1, "acc": 0.5}, {"m": "a", "n": 2, "acc": 0.7}], index=["m"],
    ...       column="n")[0][2]["acc"]
    0.7
    """
    wide: dict[tuple, dict] = {}
    for r in rows:
        key = tuple(r[k] for k in index)
        wide.setdefault(key, dict(zip(index, key, strict=True)))[r[column]] = r
    return list(wide.values())


def interval95(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width ``1.96 std / sqrt(n)`` of its normal 95% interval.

    ``std`` is the population standard deviation (``np.std``, ddof 0), as the meta-learning and
    few-shot results have always reported it.

    Raises:
        ValueError: ``values`` is empty.
    """
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        raise ValueError("interval95: values is empty")
    return float(np.mean(array)), float(_Z95 * np.std(array) / np.sqrt(array.size))


def save_text(path: str | os.PathLike, text: str) -> pathlib.Path:
    """Writes ``text`` atomically (a temporary file, then a rename); creates the folder."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def save_json(path: str | os.PathLike, data: Any) -> pathlib.Path:
    """Writes ``data`` as indented JSON ending in a newline, atomically."""
    return save_text(path, json.dumps(data, indent=2) + "\n")


def save_table(
    path: str | os.PathLike, *, markdown: str, data: Any
) -> tuple[pathlib.Path, pathlib.Path]:
    """Writes ``<path>.md`` (the rendered table) and ``<path>.json`` (the numbers behind it).

    Args:
        path: The files' common stem, e.g. ``workdir / "results"``.
        markdown: Text from `markdown_table` (with any notes).
        data: The JSON-serialisable results the table shows.

    Returns:
        The two paths written, Markdown first.
    """
    stem = pathlib.Path(path)
    return (
        save_text(stem.with_name(stem.name + ".md"), markdown),
        save_json(stem.with_name(stem.name + ".json"), data),
    )


# -- figures -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Line:
    """One series of `line_plot`: drawn with error bars when ``yerr`` is given.

    ``style`` holds matplotlib keyword arguments (``marker``, ``linestyle``, ``color``, ...).
    """

    x: Sequence[float]
    y: Sequence[float]
    yerr: Sequence[float] | None = None
    label: str | None = None
    style: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class HLine:
    """A horizontal reference line of `line_plot` (a baseline), with matplotlib ``style``."""

    y: float
    label: str | None = None
    style: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def figure(figsize: tuple[float, float], *, layout: str | None = None):
    """A `matplotlib.figure.Figure` on its own Agg canvas (no global backend, no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 - plots only
    from matplotlib.figure import Figure  # noqa: PLC0415

    fig = Figure(figsize=figsize, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: str | os.PathLike, *, dpi: int = 100) -> pathlib.Path:
    """Writes ``fig`` as a PNG at ``dpi`` (size ``figsize * dpi`` pixels); creates the folder."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    return path


@dataclasses.dataclass(frozen=True)
class Panel:
    """One axes of `panels_plot`: lines (with error bars where given) and reference lines.

    Attributes:
        lines: The series, drawn in order.
        xlabel: The x axis label.
        ylabel: The y axis label.
        title: The axes title, if any.
        hlines: Horizontal reference lines, drawn after the series.
        xscale: ``"linear"``, ``"log"``, ... or ``(scale, kwargs)``, e.g. ``("log", {"base": 2})``.
        yscale: The y scale.
        xticks: ``(positions, labels, rotation)`` to label the x axis by name.
        ylim: ``(bottom, top)``, or None to fit the data.
        legend: Keyword arguments of the legend; None draws no legend.
        grid: The grid's alpha; None draws no grid.
    """

    lines: Sequence[Line]
    xlabel: str = ""
    ylabel: str = ""
    title: str | None = None
    hlines: Sequence[HLine] = ()
    xscale: str | tuple[str, Mapping[str, Any]] = "linear"
    yscale: str = "linear"
    xticks: tuple[Sequence[float], Sequence[str], float] | None = None
    ylim: tuple[float, float] | None = None
    legend: Mapping[str, Any] | None = None
    grid: float | None = 0.3


def panels_plot(
    panels: Sequence[Panel],
    *,
    figsize: tuple[float, float],
    suptitle: str | None = None,
    layout: str | None = None,
):
    """One row of panels (e.g. one per dataset, or per held-out task).

    Args:
        panels: The axes, left to right.
        figsize: Inches, for the whole row.
        suptitle: A title over all panels, if any.
        layout: Matplotlib's layout engine (``"constrained"``); None lays out tightly at the end.

    Returns:
        The figure (save it with `save_figure`).
    """
    fig = figure(figsize, layout=layout)
    for index, panel in enumerate(panels):
        _draw(fig.add_subplot(1, len(panels), index + 1), panel)
    if suptitle is not None:
        fig.suptitle(suptitle)
    if layout is None:
        fig.tight_layout()
    return fig


def grouped_lines(
    rows: Sequence[Mapping[str, Any]],
    *,
    by: Sequence[str],
    x: str,
    y: str,
    yerr: str | None = None,
    label: Callable[..., str] | None = None,
    style: Callable[..., Mapping[str, Any]] | Mapping[str, Any] | None = None,
) -> list[Line]:
    """One `Line` per distinct values of the ``by`` keys of ``rows``, its points sorted by ``x``.

    Args:
        rows: Long rows (one per point).
        by: The keys that tell lines apart; lines come in order of first appearance.
        x: The key of the x value.
        y: The key of the y value.
        yerr: The key of the error bar's half-height, if any.
        label: ``label(*values of by) -> str``; default: the values joined by spaces.
        style: ``style(*values of by) -> matplotlib kwargs``, or one mapping for every line.
    """
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in by), []).append(r)
    out = []
    for key, members in groups.items():
        members = sorted(members, key=lambda r: r[x])
        out.append(
            Line(
                [r[x] for r in members],
                [r[y] for r in members],
                yerr=None if yerr is None else [r[yerr] for r in members],
                label=label(*key) if label else " ".join(map(str, key)),
                style=(style(*key) if callable(style) else style) or {},
            )
        )
    return out


def line_plot(
    lines: Sequence[Line],
    *,
    figsize: tuple[float, float] = (6, 4),
    layout: str | None = None,
    **panel: Any,
):
    """`panels_plot` of the one `Panel` ``Panel(lines, **panel)``: lines on one axes."""
    return panels_plot([Panel(lines, **panel)], figsize=figsize, layout=layout)


def _draw(ax, panel: Panel) -> None:
    for line in panel.lines:
        if line.yerr is None:
            ax.plot(line.x, line.y, label=line.label, **line.style)
        else:
            ax.errorbar(line.x, line.y, yerr=line.yerr, label=line.label, **line.style)
    for h in panel.hlines:
        ax.axhline(h.y, label=h.label, **h.style)
    scale, scale_kwargs = (panel.xscale, {}) if isinstance(panel.xscale, str) else panel.xscale
    ax.set_xscale(scale, **scale_kwargs)
    ax.set_yscale(panel.yscale)
    if panel.xticks is not None:
        positions, labels, rotation = panel.xticks
        ax.set_xticks(positions, labels, rotation=rotation)
    if panel.ylim is not None:
        ax.set_ylim(*panel.ylim)
    ax.set_xlabel(panel.xlabel)
    ax.set_ylabel(panel.ylabel)
    if panel.title is not None:
        ax.set_title(panel.title)
    if panel.grid is not None:
        ax.grid(True, alpha=panel.grid)
    if panel.legend is not None:
        ax.legend(**panel.legend)


def scatter_plot(
    points: Sequence[tuple[float, float, str]],
    *,
    xlabel: str,
    ylabel: str,
    xscale: str = "linear",
    figsize: tuple[float, float] = (7, 4.5),
):
    """Points ``(x, y, name)``, each annotated with its name."""
    fig = figure(figsize)
    ax = fig.add_subplot()
    for x, y, name in points:
        ax.scatter(x, y)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale(xscale)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return fig


def curves(series: Mapping[str, tuple[Sequence[float], Sequence[float]]]):
    """One panel per named ``(steps, values)`` curve, sorted by name, at most three per row."""
    columns = min(len(series), 3)
    rows = math.ceil(len(series) / columns)
    fig = figure((4.5 * columns, 3.2 * rows), layout="constrained")
    for index, (name, (steps, values)) in enumerate(sorted(series.items())):
        axes = fig.add_subplot(rows, columns, index + 1)
        axes.plot(steps, values, marker="." if len(steps) < 50 else None, linewidth=1.2)
        axes.set_title(name, fontsize=10)
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
    return fig


def save_curves(
    records: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike
) -> list[pathlib.Path]:
    """Plots every numeric metric of ``records`` against step, one PNG per name group.

    Metrics are grouped by the first component of their name: `train/loss` and
    `train/grad_norm` become two panels of `train.png`, `eval/validation/accuracy` a panel of
    `eval.png`. Records without a numeric ``step`` and fields that are not numbers (strings,
    lists, booleans) are skipped.

    Args:
        records: Metric lines, e.g. `metrics.read_jsonl` of a `MetricWriter` file.
        out_dir: Folder for the PNG files; created if needed.

    Returns:
        The PNG paths written, sorted by name.
    """
    series: dict[str, dict[str, tuple[list, list]]] = {}
    for record in records:
        step = record.get("step")
        if not _is_number(step):
            continue
        for name, value in record.items():
            if name == "step" or not _is_number(value):
                continue
            group = name.split("/", 1)[0]
            steps, values = series.setdefault(group, {}).setdefault(name, ([], []))
            steps.append(step)
            values.append(value)
    out_dir = pathlib.Path(out_dir)
    return [
        save_figure(curves(group_series), out_dir / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', group)}.png")
        for group, group_series in sorted(series.items())
    ]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
