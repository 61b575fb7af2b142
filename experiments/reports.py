"""The tables (Markdown) and plots (PNG) of the experiments' results, one function per figure.

Each takes the results a trainer computed (the dicts it also writes to results.json) and draws
them with `ftlab.core.report` (Column/table/pivot for tables, Line/Panel/line_plot for plots);
trainers only call these and save what they return.
"""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from ftlab.core import metrics as metrics_lib
from ftlab.core import report
from ftlab.data import sinusoid
from ftlab.posttrain import metrics as agreement_lib

__all__ = [
    "publish",
    "decoder_plot",
    "decoder_summary",
    "decoder_table",
    "diffusion_pretrain_plot",
    "diffusion_samples_plot",
    "diffusion_table",
    "diffusion_transfer_plot",
    "fewshot_plot",
    "fewshot_table",
    "gcn_transfer_plot",
    "gcn_transfer_table",
    "icl_plot",
    "icl_points",
    "icl_table",
    "mean_rows",
    "meta_adapted_plot",
    "multitask_plot",
    "multitask_table",
    "online_regret_plot",
    "online_table",
    "pretrain_plot",
    "pretrain_table",
    "reward_plot",
    "reward_table",
    "reward_training_plot",
    "rlhf_kl_frontier_plot",
    "rlhf_rewards_plot",
    "rlhf_samples_table",
    "rlhf_table",
    "rnn_transfer_plot",
    "rnn_transfer_table",
    "sft_losses_plot",
    "sft_table",
]


def publish(
    workdir: pathlib.Path,
    results: Any,
    *,
    table: str | None = None,
    figures: Mapping[str, Callable[[], Any]] | None = None,
    curves: str | None = None,
    dpi: int = 100,
) -> bool:
    """Writes an experiment's results into ``workdir``, on process 0 only; returns whether it did.

    ``results.json`` (``results``), ``results.md`` (``table``, when given), every figure of
    ``figures`` (``{file name: () -> matplotlib figure}``: built only by the process that writes)
    and, with ``curves`` (a folder under ``workdir``, ``""`` for the workdir itself), every
    metric of ``metrics.jsonl`` drawn by `ftlab.core.metrics.plot_curves`.
    """
    from experiments import loop  # noqa: PLC0415 - loop imports this module

    if not loop.is_chief():  # one writer in a multi-process job
        return False
    if table is None:
        report.save_json(workdir / "results.json", results)
    else:
        report.save_table(workdir / "results", markdown=table, data=results)
    for name, draw in (figures or {}).items():
        report.save_figure(draw(), workdir / name, dpi=dpi)
    jsonl = workdir / metrics_lib.JSONL_NAME
    if curves is not None and jsonl.exists() and jsonl.stat().st_size:
        metrics_lib.plot_curves(jsonl, workdir / curves)
    return True


def mean_rows(records: Iterable[Sequence], keys: Sequence[str], name: str = "accuracy") -> list:
    """One row per setting: ``{<keys>..., <name>_mean, <name>_std, <name>: [values]}``.

    ``records``: ``(*setting, value)`` each (e.g. every seed's score of one setting), the
    settings named by ``keys``; rows in the order each setting first appears.
    """
    groups: dict[tuple, list] = {}
    for *setting, value in records:
        groups.setdefault(tuple(setting), []).append(value)
    return [
        {**dict(zip(keys, setting, strict=True)), f"{name}_mean": float(np.mean(values)),
         f"{name}_std": float(np.std(values)), name: values}
        for setting, values in groups.items()
    ]  # fmt: skip


def _smooth(curve: Sequence[float], width: int) -> np.ndarray:
    """Trailing mean over the last ``width`` steps (fewer at the start)."""
    c = np.cumsum(np.insert(np.asarray(curve, np.float64), 0, 0.0))
    lo = np.maximum(np.arange(1, len(curve) + 1) - width, 0)
    return (c[1:] - c[lo]) / (np.arange(1, len(curve) + 1) - lo)


# -- online learning (experiments/trainers/online.py) ------------------------------------------


def online_regret_plot(steps, regret, slope: float, intercept: float, title: str):
    """Log-log R(t) against t with the fitted line (and a slope-0.5 line through its end)."""
    steps, regret = np.asarray(steps, float), np.asarray(regret, float)
    keep = regret > 0
    lines = [
        report.Line(
            steps[keep], regret[keep], label="R(t) (prefix comparators)", style={"marker": "o"}
        )
    ]
    if math.isfinite(slope):
        lines.append(
            report.Line(
                steps,
                np.exp(intercept) * steps**slope,
                label=f"fit: slope {slope:.3f}",
                style={"ls": "--"},
            )
        )
        lines.append(
            report.Line(
                steps,
                np.exp(intercept) * steps[-1] ** (slope - 0.5) * steps**0.5,
                label="slope 0.5",
                style={"ls": ":"},
            )
        )
    return report.line_plot(
        lines,
        xscale="log",
        yscale="log",
        xlabel="t (examples)",
        ylabel="regret R(t)",
        title=title,
        legend={},
        grid=None,
        figsize=(5, 4),
    )


def online_table(results: dict, metric_names: tuple[str, ...]) -> str:
    """The learner, each step size of the sweep and river's learners: metrics and regret."""
    learner = results["learner"]
    rows = [
        [
            f"ftlab {learner['name']} lr={learner['lr']} ({learner['decay']})",
            *(f"{results[f'progressive/{k}']:.4f}" for k in metric_names),
            f"{results['regret']:.2f} (slope {results['regret/slope']:.3f})",
        ]
    ]
    for lr, row in results["sweep"].items():
        rows.append(
            [
                f"ftlab sweep lr={lr}",
                *(f"{row[k]:.4f}" for k in metric_names),
                f"{row['regret_vs_final_comparator']:.2f} (vs u*_T)",
            ]
        )
    for key in ("river/same_features", "river/pipeline"):
        if key in results:
            rows.append([key, *(f"{results[key][k]:.4f}" for k in metric_names), ""])
    return report.markdown_table(["learner", *metric_names, "regret R(T)"], rows)


# -- multi-task learning (experiments/trainers/multitask.py) -----------------------------------


def multitask_table(results: dict, task_names: Sequence[str], *, max_task_columns: int = 16) -> str:
    """Methods as rows; per-task columns (if at most ``max_task_columns`` tasks) then means."""
    first = next(iter(results.values()))
    metric = next(iter(first["per_task"]))
    show_tasks = len(task_names) <= max_task_columns
    header = ["method", *(task_names if show_tasks else []), *(f"mean {k}" for k in first["mean"])]
    rows = []
    for name, r in results.items():
        cells = [name] + ([f"{v:.3f}" for v in r["per_task"][metric]] if show_tasks else [])
        rows.append(cells + [f"{v:.4f}" for v in r["mean"].values()])
    note = f"per-task cells: test {metric}" if show_tasks else "per-task values: results.json"
    return report.markdown_table(header, rows, notes=[f"({note})"])


def multitask_plot(results: dict, task_names: Sequence[str]):
    """The first metric per task and method (tasks sorted by the first method's value)."""
    first = next(iter(results.values()))
    metric = next(iter(first["per_task"]))
    order = np.argsort(first["per_task"][metric])
    lines = [
        report.Line(
            np.arange(len(order)),
            np.asarray(r["per_task"][metric])[order],
            label=f"{name} ({r['mean'][metric]:.3f})",
            style={"marker": "o", "ms": 3, "lw": 1},
        )
        for name, r in results.items()
    ]
    xticks = None
    if len(task_names) <= 20:
        xticks = (np.arange(len(task_names)), [task_names[i] for i in order], 60)
    return report.line_plot(
        lines,
        xticks=xticks,
        xlabel=f"task (sorted by {next(iter(results))})",
        ylabel=f"test {metric}",
        # a few small classes have errors 100x the typical one
        yscale="log" if metric == "mse" else "linear",
        legend={"fontsize": 7, "title": "method (mean)"},
        grid=None,
        figsize=(max(6.0, 0.1 * len(task_names) + 4), 4),
    )


# -- decoder tuning against ICL (experiments/trainers/decoder_tuning.py) ----------------------


def decoder_summary(runs: list[dict], methods: Sequence[str]) -> list[dict]:
    """Mean and std of accuracy over seeds, per (method, n), methods in the order ``methods``."""
    rows = {}
    for r in runs:
        rows.setdefault((r["method"], r["n"]), []).append(r)
    out = []
    for (method, n), rs in sorted(rows.items(), key=lambda kv: (methods.index(kv[0][0]), kv[0][1])):
        accs = [r["accuracy"] for r in rs]
        out.append(
            {
                "method": method,
                "n": n,
                "seeds": len(rs),
                "accuracy_mean": float(np.mean(accs)),
                "accuracy_std": float(np.std(accs)),
                "trainable_params": rs[0]["trainable_params"],
                "base_mib_during_training": rs[0]["base_mib_during_training"],
                "train_seconds": float(np.mean([r["train_seconds"] for r in rs])),
            }
        )
    return out


def icl_points(path: str, task: str) -> dict[int, tuple[float, float]]:
    """``{k: (mean, std)}`` accuracy of ``task`` in an ICL results.json (none: ``{}``)."""
    if not path or not pathlib.Path(path).exists():
        return {}
    r = json.loads(pathlib.Path(path).read_text())["tasks"].get(task)
    return {} if r is None else {int(k): (s["mean"], s["std"]) for k, s in r["shots"].items()}


def decoder_table(rows: list[dict], icl_points: dict) -> str:
    """One row per method: trainable parameters, base memory, accuracy (± std over seeds) per n."""

    def accuracy(r):
        spread = f" ± {r['accuracy_std']:.3f}" if r["seeds"] > 1 else ""
        return f"{r['accuracy_mean']:.3f}{spread}"

    first = lambda key: lambda w: next(v for k, v in w.items() if k != "method")[key]  # noqa: E731
    columns = [
        report.Column("method"),
        report.Column("trainable", first("trainable_params"), "{:,}"),
        report.Column("base held (MiB)", first("base_mib_during_training"), "{:.0f}"),
        *(
            report.Column(f"n={n}", lambda w, n=n: w.get(n), accuracy)
            for n in sorted({r["n"] for r in rows})
        ),
    ]
    notes = []
    if icl_points:
        shots = ", ".join(f"k={k}: {m:.3f} ± {s:.3f}" for k, (m, s) in sorted(icl_points.items()))
        notes.append(f"ICL on the same test examples (k demonstrations, no training): {shots}")
    wide = report.pivot(rows, index=("method",), column="n")
    return report.table(wide, columns, notes=notes)


def decoder_plot(rows: list[dict], icl_points: dict, majority: float):
    """Accuracy against n (log2 x) per method, the ICL points at n = k, and the baselines."""
    lines = report.grouped_lines(
        rows, by=("method",), x="n", y="accuracy_mean", yerr="accuracy_std",
        style={"marker": "o", "capsize": 3},
    )  # fmt: skip
    hlines = []
    if icl_points:
        ks = sorted(k for k in icl_points if k > 0)
        lines.append(
            report.Line(
                ks,
                [icl_points[k][0] for k in ks],
                yerr=[icl_points[k][1] for k in ks],
                label="ICL (k demonstrations)",
                style={"marker": "s", "ls": "--", "color": "k", "capsize": 3},
            )
        )
        if 0 in icl_points:
            style = {"color": "k", "ls": ":", "lw": 1}
            hlines.append(report.HLine(icl_points[0][0], label="zero-shot", style=style))
    style = {"color": "grey", "ls": "-.", "lw": 1}
    hlines.append(report.HLine(majority, label="majority class", style=style))
    return report.line_plot(
        lines,
        hlines=hlines,
        xscale=("log", {"base": 2}),
        xlabel="labelled examples (tuning) / demonstrations (ICL)",
        ylabel="test accuracy",
        legend={"fontsize": 8},
        figsize=(6, 4),
    )


# -- in-context learning (experiments/trainers/icl.py) -----------------------------------------


def icl_table(results: dict) -> str:
    """One row per task: the majority baseline, then mean (± std over draws) accuracy per k."""
    shots = sorted({int(k) for r in results["tasks"].values() for k in r["shots"]})
    rows = []
    for name, r in results["tasks"].items():
        cells = [name, f"{r['majority_baseline']:.3f}"]
        for k in shots:
            s = r["shots"].get(str(k))
            if s is None:
                cells.append("")
            elif len(s["accuracy_per_draw"]) == 1:
                cells.append(f"{s['mean']:.3f}")
            else:
                cells.append(f"{s['mean']:.3f} ± {s['std']:.3f}")
        rows.append(cells)
    return report.markdown_table(["task", "majority", *(f"k={k}" for k in shots)], rows)


def icl_plot(results: dict):
    """Accuracy against k per task (error bars: std over draws), dotted: its majority class."""
    lines, baselines = [], []
    for i, (name, r) in enumerate(results["tasks"].items()):
        ks = sorted(int(k) for k in r["shots"])
        lines.append(
            report.Line(
                ks,
                [r["shots"][str(k)]["mean"] for k in ks],
                yerr=[r["shots"][str(k)]["std"] for k in ks],
                label=name,
                style={"marker": "o", "capsize": 3, "color": f"C{i}"},
            )
        )
        style = {"ls": ":", "lw": 1, "color": f"C{i}"}
        baselines.append(report.HLine(r["majority_baseline"], style=style))
    return report.line_plot(
        lines,
        hlines=baselines,
        xlabel="demonstrations k",
        ylabel="accuracy",
        title=f"ICL, {results['model']} (dotted: majority class)",
        legend={},
        grid=None,
        figsize=(5, 3.5),
    )


# -- pretraining for transfer (experiments/trainers/pretrain.py) -------------------------------


def pretrain_table(rows: list[dict], fractions) -> str:
    """One row per (method, mode), one column per label fraction: mean ± std test accuracy."""
    cell = lambda r: f"{100 * r['accuracy_mean']:.1f} ± {100 * r['accuracy_std']:.1f}"  # noqa: E731
    columns = [report.Column("method"), report.Column("mode")]
    columns += [report.Column(f"{100 * f:g}% labels", lambda w, f=f: w[f], cell) for f in fractions]
    return report.table(report.pivot(rows, index=("method", "mode"), column="fraction"), columns)


def pretrain_plot(rows: list[dict], *, title: str, modes: Sequence[str]):
    """Test accuracy against label fraction (log x): colour = method, line style = mode."""
    colors = {m: f"C{i}" for i, m in enumerate(dict.fromkeys(r["method"] for r in rows))}
    lines = report.grouped_lines(
        sorted(rows, key=lambda r: (list(colors).index(r["method"]), modes.index(r["mode"]))),
        by=("method", "mode"),
        x="fraction",
        y="accuracy_mean",
        yerr="accuracy_std",
        label=lambda method, mode: f"{method} ({mode})",
        style=lambda method, mode: {
            "color": colors[method],
            "linestyle": {"probe": "-", "finetune": "--"}[mode],
            "marker": "o",
            "capsize": 3,
        },
    )
    return report.line_plot(
        lines,
        xscale="log",
        xlabel="fraction of train labels",
        ylabel="test accuracy",
        title=title,
        legend={"fontsize": 8, "ncol": 2},
        figsize=(7, 4.5),
        layout="constrained",
    )


# -- few-shot image classification (experiments/trainers/meta.py, images) ----------------------


def _fewshot_steps(rows: list[dict]) -> list[int]:
    """The step counts of the runs' ``eval/acc_step_<k>`` results, sorted."""
    keys = (k for r in rows for k in r if k.startswith("eval/acc_step_") and "_ci" not in k)
    return sorted({int(k[len("eval/acc_step_") :]) for k in keys})


def fewshot_table(rows: list[dict], *, methods: Sequence[str]) -> str:
    """A markdown table: one row per run, accuracy (%) +- 95% interval after each step count."""

    def accuracy(k):
        def cell(r):
            a, ci = r.get(f"eval/acc_step_{k}"), r.get(f"eval/acc_step_{k}_ci95")
            return "-" if a is None else f"{100 * a:.1f} +- {100 * ci:.1f}"

        return report.Column(f"{k} steps", cell)

    columns = [
        report.Column(
            "dataset", lambda r: r["dataset"] + (" (synthetic)" if r["synthetic"] else "")
        ),
        report.Column("shots", "shots", "5-way {}-shot"),
        report.Column("method"),
        report.Column("iters", "meta_iterations"),
        *(accuracy(k) for k in _fewshot_steps(rows)),
    ]
    order = lambda r: (r["dataset"], r["shots"], methods.index(r["method"]))  # noqa: E731
    return report.table(sorted(rows, key=order), columns)


def fewshot_plot(rows: list[dict]):
    """Accuracy against fine-tuning steps, one panel per (dataset, shots), 95% error bars."""
    panels = []
    for ds, shots in sorted({(r["dataset"], r["shots"]) for r in rows}):
        lines = []
        for r in rows:
            if (r["dataset"], r["shots"]) == (ds, shots):
                ks = _fewshot_steps([r])
                acc = [100 * r[f"eval/acc_step_{k}"] for k in ks]
                ci = [100 * r[f"eval/acc_step_{k}_ci95"] for k in ks]
                style = {"marker": "o", "capsize": 3}
                lines.append(report.Line(ks, acc, yerr=ci, label=r["method"], style=style))
        synth = " (synthetic)" if ds == "glyphs" else ""
        panels.append(
            report.Panel(
                lines,
                title=f"{ds}{synth}, 5-way {shots}-shot",
                xlabel="fine-tuning steps",
                ylabel="query accuracy (%)",
                legend={"fontsize": 7},
                grid=None,
            )
        )
    return report.panels_plot(panels, figsize=(4.0 * len(panels), 3.4))


# -- meta-learning on sinusoids (experiments/trainers/meta.py, sinusoid) -----------------------


def meta_adapted_plot(method: str, tasks, curves, *, grid, steps, num_tasks: int):
    """True sine, the K support points, and the curves after each of ``steps`` (0, 1, 10)
    on ``grid`` (``curves``: ``[num_tasks, len(steps), grid]``)."""
    x, panels = grid[:, 0], []
    for i in range(num_tasks):
        amp, phase = tasks["task"]["amplitude"][i], tasks["task"]["phase"][i]
        sx, sy = tasks["support"]["x"][i, :, 0], tasks["support"]["y"][i, :, 0]
        lines = [
            report.Line(x, sinusoid.curve(amp, phase, x), label="true", style={"color": "k"}),
            report.Line(
                sx, sy, label=f"K={len(sx)}", style={"color": "k", "marker": "^", "ls": ""}
            ),
        ]
        for j, (k, ls) in enumerate(zip(steps, (":", "--", "-"), strict=True)):
            label = "pre-update" if k == 0 else f"{k} steps"
            lines.append(report.Line(x, curves[i, j], label=label, style={"ls": ls}))
        panels.append(
            report.Panel(
                lines,
                title=f"A={amp:.2f}, phase={phase:.2f}",
                # Amplitudes are at most 5; a diverged fine-tune (Meta-SGD's rates are tuned
                # for one step) would otherwise squash every other curve.
                ylim=(-6.0, 6.0),
                legend={"fontsize": 7} if i == 0 else None,
                grid=None,
            )
        )
    return report.panels_plot(
        panels,
        figsize=(4.2 * num_tasks, 3.4),
        suptitle=f"{method}: adapted curves on held-out tasks",
    )


# -- reward model from human ratings (experiments/trainers/reward.py) --------------------------


def reward_table(rows: list[dict], *, n_test: int, min_difference: float) -> str:
    """The Markdown table: one row per scorer on the test snippets."""
    return report.table(
        rows,
        (
            report.Column("scorer"),
            report.Column("Pearson r", "pearson", "{:.3f}"),
            report.Column("Spearman ρ", "spearman", "{:.3f}"),
            report.Column("pairwise accuracy", "pairwise_accuracy", "{:.3f}"),
            report.Column("pairs", "pairs", "{:,.0f}"),
        ),
        notes=[
            f"{n_test} held-out movie snippets (test split). Pearson and Spearman against the "
            "mean human rating; pairwise accuracy over every pair whose means differ by at least "
            f"{min_difference:g} (ties count 1/2). The human rater is one random rater per "
            "snippet against the mean of the other raters.",
        ],
    )


def reward_training_plot(records):
    """The training loss and the validation Pearson r against the step, side by side."""
    panels = []
    for key, label in (
        ("train/loss", "Bradley-Terry loss (train)"),
        ("eval/validation/pearson", "Pearson r (validation)"),
    ):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            x, y = zip(*points, strict=True)
            panels.append(
                report.Panel(
                    [report.Line(x, y, style={"marker": "."})], xlabel="step", ylabel=label
                )
            )
    return report.panels_plot(panels, figsize=(4.5 * len(panels), 3.2))


def reward_plot(model_scores, vader, mean, *, title: str):
    """Test rewards and VADER's scores against the mean human rating, side by side."""
    fig = report.figure((9, 3.8), layout="constrained")
    for i, (name, s) in enumerate((("reward model", model_scores), ("VADER compound", vader))):
        ax = fig.add_subplot(1, 2, i + 1)
        ax.scatter(mean, s, s=4, alpha=0.35)
        r = agreement_lib.pearson(s, mean)
        ax.set_title(f"{name} (r = {r:.3f})", fontsize=10)
        ax.set_xlabel("mean human rating (-4..4)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    return fig


# -- sentiment-controlled generation (experiments/trainers/rlhf.py) ----------------------------


def _rlhf_reward_cell(x) -> str:
    return "–" if x is None else f"{x:.3f}"


def rlhf_table(rows: Sequence[dict], budgets: Sequence[float], *, notes=()) -> str:
    """One row per run: reward before and after, KL after, reward within each KL budget."""
    columns = [
        report.Column("algorithm"),
        report.Column("steps", "steps"),
        report.Column("reward before", "reward_before", "{:.3f}"),
        report.Column("reward after", "reward_after", "{:.3f}"),
        report.Column("KL after (nats)", "kl_after", "{:.2f}"),
        report.Column("length after", "length_after", "{:.1f}"),
        *[
            report.Column(
                f"reward at KL ≤ {b:g}",
                (lambda r, b=b: r["reward_at_kl"][f"{b:g}"]),
                _rlhf_reward_cell,
            )
            for b in budgets
        ],
    ]
    return report.table(rows, columns, notes=notes)


def rlhf_rewards_plot(records, points: Sequence[dict], title: str):
    """Mean reward and KL to the reference against the step: the held-out evaluations
    (``points``: before, during and after training) and, for PPO and GRPO, each step's own
    rollouts (``records``: metrics.jsonl)."""
    panels = []
    for key, label in (("reward", "mean reward"), ("kl", "KL to reference (nats/completion)")):
        lines = []
        train_pts = [(r["step"], r[f"train/{key}"]) for r in records if f"train/{key}" in r]
        if train_pts:
            lines.append(report.Line(*zip(*train_pts, strict=True), label="training rollouts"))
        lines.append(
            report.Line(
                [p["step"] for p in points],
                [p[key] for p in points],
                label="held-out prompts",
                style={"marker": "o"},
            )
        )
        panels.append(report.Panel(lines, xlabel="step", ylabel=label, legend={"fontsize": 8}))
    return report.panels_plot(panels, figsize=(10, 3.6), suptitle=title)


def rlhf_samples_table(before: dict, after: dict, *, steps: int, limit: int) -> str:
    """The held-out continuations before and after training (same prompts, same rng)."""
    lines = [
        f"# Held-out continuations before and after {steps} steps (same prompts, same rng)",
        "",
        "| prompt | before | reward | after | reward |",
        "|---|---|---|---|---|",
    ]
    esc = lambda s: s.replace("|", "\\|").replace("\n", " ")  # noqa: E731
    b, a = before["samples"], after["samples"]
    for i in range(min(limit, len(b["prompt"]))):
        lines.append(
            f"| {esc(b['prompt'][i])} | {esc(b['completion'][i])} | {b['scores'][i]:.2f} "
            f"| {esc(a['completion'][i])} | {a['scores'][i]:.2f} |"
        )
    return "\n".join(lines) + "\n"


def rlhf_kl_frontier_plot(runs: Sequence[tuple[str, Sequence[dict]]]):
    """Held-out mean reward against KL to the reference: one line per ``(label, points)`` of
    ``runs`` (``points``: a run's evaluations, dicts with ``kl`` and ``reward``)."""
    lines = [
        report.Line(
            [p["kl"] for p in points],
            [p["reward"] for p in points],
            label=label,
            style={"marker": "o"},
        )
        for label, points in runs
    ]
    return report.line_plot(
        lines,
        xlabel="KL to reference (nats per completion)",
        ylabel="mean reward (held-out prompts)",
        legend={},
        figsize=(5.5, 3.8),
    )


# -- instruction tuning (experiments/trainers/sft.py) ------------------------------------------


def sft_table(rows: list[dict], *, notes) -> str:
    """One row per run: trainable parameters, held-out loss and perplexity before and after."""
    return report.table(
        rows,
        (
            report.Column("model"),
            report.Column("method"),
            report.Column("trainable", "trainable_params", "{:,}"),
            report.Column("steps", "steps"),
            report.Column("held-out loss before", "loss_before", "{:.4f}"),
            report.Column("after", "loss_after", "{:.4f}"),
            report.Column("perplexity before", "ppl_before", "{:.2f}"),
            report.Column("after", "ppl_after", "{:.2f}"),
        ),
        notes=notes,
    )


def sft_losses_plot(records, before: float):
    """Train loss and held-out loss (the value before training at step 0) against the step."""
    train_points = [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]
    held = [(0, before)] + [
        (r["step"], r["eval/test/loss"]) for r in records if "eval/test/loss" in r
    ]
    lines = [
        report.Line(*zip(*pts, strict=True), label=label, style={"marker": "."})
        for pts, label in ((train_points, "train (batch)"), (held, "held-out"))
        if pts
    ]
    return report.line_plot(
        lines, xlabel="step", ylabel="NLL per assistant token", legend={}, figsize=(5.5, 3.6)
    )


# -- recurrent language model transfer (experiments/trainers/rnn_transfer.py) ------------------


def rnn_transfer_table(rows: list[dict], *, source: str, target: str) -> str:
    """One row per method (and the pretrained model): test bits per byte on both corpora."""
    columns = [
        report.Column("method"),
        report.Column("trainable", fmt="{:,}"),
        report.Column(f"{target} test bits/byte", "target_bpc", "{:.3f}"),
        report.Column(f"{source} test bits/byte", "source_bpc", "{:.3f}"),
        report.Column("train s", "seconds", "{:.0f}"),
    ]
    return report.table(rows, columns)


def rnn_transfer_plot(
    results_by: Mapping[str, dict], *, pretrained_bpc: float, source: str, target: str, cell: str
):
    """Train bits per byte against the step per method (smoothed over 10 steps, the test
    number in the legend), dotted: the pretrained model's test bits per byte, not adapted."""
    lines = [
        report.Line(
            np.arange(1, len(r["curve"]) + 1),
            _smooth(r["curve"], 10),
            label=f"{m} (test {r['target_bpc']:.2f})",
        )
        for m, r in results_by.items()
    ]
    return report.line_plot(
        lines,
        xlabel="step on the target",
        ylabel="train bits per byte",
        title=f"{source} -> {target}: byte-level {cell.upper()}",
        hlines=[
            report.HLine(
                pretrained_bpc,
                "pretrained, not adapted (test)",
                {"color": "k", "linestyle": ":"},
            )
        ],
        legend={"fontsize": 8},
    )


# -- GCN transfer (experiments/trainers/gcn_transfer.py) ---------------------------------------


def gcn_transfer_table(rows: list[dict], labels_per_class: Sequence[int]) -> str:
    """One row per method, one column per labels per class: mean ± std test accuracy (%)."""
    cell = lambda r: f"{100 * r['accuracy_mean']:.1f} ± {100 * r['accuracy_std']:.1f}"  # noqa: E731
    columns = [report.Column("method")]
    columns += [report.Column(f"{k}/class", lambda w, k=k: w[k], cell) for k in labels_per_class]
    return report.table(report.pivot(rows, index=("method",), column="labels_per_class"), columns)


def gcn_transfer_plot(rows: list[dict], *, dataset: str, num_seeds: int):
    """Test accuracy (± std over seeds) against labelled nodes per class (log x), per method."""
    lines = report.grouped_lines(
        rows, by=("method",), x="labels_per_class", y="accuracy_mean", yerr="accuracy_std",
        style={"marker": "o", "capsize": 3},
    )  # fmt: skip
    return report.line_plot(
        lines, xscale="log", xlabel="labelled nodes per class", ylabel="test accuracy",
        title=f"GCN on {dataset} ({num_seeds} seeds)", legend={"fontsize": 8},
    )  # fmt: skip


# -- diffusion transfer (experiments/trainers/diffusion_transfer.py) ---------------------------


def _tile(x: np.ndarray, rows: int) -> np.ndarray:
    """``[rows * cols, h, w]`` -> one ``[rows * h, cols * w]`` image (row-major)."""
    n, h, w = x.shape
    cols = n // rows
    return x.reshape(rows, cols, h, w).transpose(0, 2, 1, 3).reshape(rows * h, cols * w)


def _diffusion_caption(r: dict) -> str:
    return f"acc {100 * r['judge_accuracy']:.0f}%  FD {r['frechet']:.1f}"


def diffusion_table(rows: list[dict], test_nearest: Mapping[str, float]) -> str:
    """One row per (method, shots) and the reference rows: the judge's accuracy on the samples,
    the Frechet distance, the nearest shot, the test loss; the note gives ``test_nearest``
    (``{shots: the held-out test images' nearest-shot distance}``)."""
    columns = [
        report.Column("method"),
        report.Column("shots/class", "shots"),
        report.Column("trainable", fmt="{:,}"),
        report.Column("judge accuracy %", "judge_accuracy", lambda v: f"{100 * v:.1f}"),
        report.Column("Frechet distance", "frechet", "{:.2f}"),
        report.Column("nearest shot", "nearest", "{:.2f}"),
        report.Column("test FM loss", "test_loss", "{:.4f}"),
        report.Column("train s", "seconds", "{:.0f}"),
    ]
    notes = [
        "nearest shot: mean pixel L2 distance of a sample to the closest training image of its "
        "method (0: a copy); held-out test images score "
        + ", ".join(f"{v:.2f} ({k} shots)" for k, v in test_nearest.items())
    ]
    return report.table(rows, columns, notes=notes)


def diffusion_samples_plot(
    real_grid: np.ndarray,
    pretrained: dict,
    adapted: Mapping[str, dict],
    *,
    targets: Sequence[int],
    shots: int,
):
    """Side by side: test images, the pretrained model's samples, then each method's
    (``adapted``: ``{method: its result}`` at ``shots``), one row per class of ``targets``."""
    panels = [("test images", real_grid, "")]
    panels.append(("pretrained", np.asarray(pretrained["grid"]), _diffusion_caption(pretrained)))
    panels += [(m, np.asarray(r["grid"]), _diffusion_caption(r)) for m, r in adapted.items()]
    fig = report.figure((2.3 * len(panels), 2.1), layout="constrained")
    for ax, (title, x, caption) in zip(fig.subplots(1, len(panels)), panels, strict=True):
        ax.imshow(_tile(x, len(targets)), cmap="gray_r", vmin=0, vmax=1)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(caption, fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"digits {','.join(map(str, targets))} from {shots} images each", fontsize=10)
    return fig


def diffusion_pretrain_plot(source_grid: np.ndarray, source_classes: Sequence[int]):
    """The pretrained model's samples of its source classes, one row per class."""
    fig = report.figure((3, 3.2), layout="constrained")
    ax = fig.subplots()
    ax.imshow(_tile(np.asarray(source_grid), len(source_classes)), cmap="gray_r")
    ax.set_title(f"pretrained, classes {list(source_classes)}", fontsize=9)
    ax.set_axis_off()
    return fig


def diffusion_transfer_plot(results_by: Mapping[tuple[str, int], dict]):
    """Train flow-matching loss (smoothed over 50 steps) against the step per (method, shots)."""
    lines = [
        report.Line(np.arange(1, len(r["curve"]) + 1), _smooth(r["curve"], 50), label=f"{m} {k}")
        for (m, k), r in results_by.items()
    ]
    return report.line_plot(
        lines, xlabel="step on the target images", ylabel="train flow-matching loss",
        title="flow matching on few digits", legend={"fontsize": 8},
    )  # fmt: skip
