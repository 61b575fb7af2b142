"""MAML meta-training steps/s on sinusoid regression: ftlab against `higher` and `torch.func`.

Run from the repository root, on a quiet machine (each variant runs in its own subprocess, one
after another; the torch children never import JAX):

  python -m experiments.bench.maml_sinusoid           # -> experiments/bench/maml_sinusoid.jsonl
  python -m experiments.bench.maml_sinusoid --quick   # smoke test

One meta-training step, identical in all three: Finn et al.'s regressor (1 -> 40 -> 40 -> 1, ReLU),
meta-batch 25 tasks with K = 10 support and 10 query points, ``--inner_steps`` SGD steps of lr
0.01 per task with second-order gradients through them, mean query MSE, one Adam (lr 1e-3) update.

- ``ftlab``: the trainer's own step (`experiments/trainers/meta.py` with
  `configs/maml_sinusoid.py`): `ftlab.meta.make_meta_step` (inner `lax.scan`, tasks `vmap`),
  jitted with the state donated.
- ``ftlab_xla_defaults``: the same step compiled with XLA's default options instead of
  `ftlab.meta.compiler_options()` (what the option buys, in the same run).
- ``higher``: the library's MAML recipe: a Python loop over tasks, each in
  ``higher.innerloop_ctx(model, SGD, copy_initial_weights=False)``, ``diffopt.step(loss)`` per
  inner step, ``(query_loss / tasks).backward()``, then ``Adam.step()``.
- ``torchfunc``: ``torch.func.vmap`` over tasks of an inner loop of ``torch.func.grad`` on
  ``torch.func.functional_call``; ``.backward()`` on the mean query loss; ``Adam.step()``.

All start from the same initial weights (ftlab's, transposed into torch) and the same fixed task
batch, so ``first_step_loss`` must agree across implementations (a check that all three compute
the same thing). Fields: ``median_step_s`` over ``--steps`` (torch) or ``--ftlab_steps``
timed steps after ``--warmup`` untimed ones, ``load_avg_1min`` (the machine's load when the variant
ended), ``steps_per_s``, ``round``, ``speedup_vs_ftlab_xla_defaults``, ``speedup_vs_higher`` and
``speedup_vs_torchfunc`` (the peer's median step time in the same round over this line's; the
peers' own lines hold their ratio too). With ``--rounds`` > 1 every variant runs that many times,
interleaved, and a ``"summary": "over_rounds"`` line per variant gives the median of its rounds'
medians and the median, ``_min`` and ``_max`` of its rounds' ratios.

Measured 2026-11-23 on the 2-core CPU VM (jax 0.10.2, torch 2.13.0+cpu, higher 0.2.1), with
``python -m experiments.bench.maml_sinusoid --steps=20 --warmup=3 --torch_threads=1`` (torch
with 2 threads on this shared machine was 8-10x slower than with 1). Median ms per meta-step:

  quiet (04:03 UTC)      ftlab   higher   torch.func   vs higher   vs torch.func
  1 inner step           1.12    72.7     5.54         65x         5.0x
  5 inner steps          3.82    177.3    18.3         46x         4.8x
  load ~4 (02:08 UTC)
  1 inner step           1.58    113.1    8.80         72x         5.6x
  5 inner steps          5.49    314.4    36.0         57x         6.6x
  load ~17-20 (01:37)
  1 inner step           2.6     835      42.6         326x        16.6x
  5 inner steps          6.4     1335     71.0         209x        11.1x

``first_step_loss`` agreed to 6 digits across the three (5.644067 and 5.444162). The 10x target
holds against higher; against torch.func it holds only on the busy machine (on the quiet one
ftlab is 4.8-5.0x faster). Unrolling the inner `lax.scan` or single-threaded Eigen did not help.
With `ftlab.meta.compiler_options()` (17:28-17:35 UTC, three runs): 1 inner step 0.55-0.84 ms
against torch.func's 4.3-4.8 ms (5.4-7.8x), 0.78-1.22x the XLA-defaults compile of the same step.
``--rounds=5`` (19:43 UTC; each line compared with its peers of the same round; summary lines hold
the median and range of the rounds' ratios): 1 inner step 0.586 ms against torch.func's 4.63 ms,
7.9x (5.9-14.5x over the rounds), 103x higher; 5 inner steps 6.2x (5.3-10.5x), 64x higher.
A second run (20:14 UTC): 9.4x (7.4-9.5x) and 6.7x (5.2-11.2x). The 10x target is not met here.
experiments/bench/RESULTS.md has the tables.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags, logging

from experiments.bench import common

_REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
IMPLS = ("ftlab", "ftlab_xla_defaults", "higher", "torchfunc")
_INNER = flags.DEFINE_list("inner_steps", ["1", "5"], "Inner-loop step counts to measure.")
_IMPLS = flags.DEFINE_list("impls", list(IMPLS), f"Subset of {IMPLS}.")
_STEPS = flags.DEFINE_integer("steps", 50, "Timed meta-steps per variant (median reported).")
_FTLAB_STEPS = flags.DEFINE_integer(
    "ftlab_steps", 300, "Timed meta-steps for ftlab (its steps are short, so more of them)."
)
_WARMUP = flags.DEFINE_integer("warmup", 5, "Untimed meta-steps after compilation.")
_ROUNDS = flags.DEFINE_integer(
    "rounds", 1, "Times to run every variant, interleaved; >1 adds median-over-rounds lines."
)
_QUICK = flags.DEFINE_bool("quick", False, "Smoke test: 3 timed steps, 1 warm-up.")
_TORCH_THREADS = flags.DEFINE_integer("torch_threads", 0, "torch threads; 0: the cores available.")
_OUT = flags.DEFINE_string("out", "", "JSON-lines output (default maml_sinusoid[_quick].jsonl).")
# Child-only flags.
_VARIANT = flags.DEFINE_string("variant", "", "Internal: run one variant impl:inner_steps.")
_DATA = flags.DEFINE_string("data", "", "Internal: npz with the initial weights and tasks.")

META_BATCH, SHOTS, INNER_LR, META_LR = 25, 10, 0.01, 1e-3


def _cores() -> int:
    return len(os.sched_getaffinity(0))


def _time(step, *, steps: int, warmup: int, sync=lambda out: None) -> dict:
    times = common.time_calls(lambda: sync(step()), warmup=warmup, reps=steps)
    return {**common.timing_fields(times), "warmup_steps": warmup}


# -- ftlab --------------------------------------------------------------------------------------
def _write_data(data_path: str) -> None:
    """Writes the initial weights and the task batch every variant starts from."""
    import jax

    from configs import maml_sinusoid
    from experiments.trainers import meta as trainer
    from ftlab.core import partition

    config = maml_sinusoid.get_config("method=maml")
    family = trainer.FAMILIES["sinusoid"](config, None)
    flat = {f"param/{k}": v for k, v in partition.flatten(jax.device_get(family.params)).items()}
    tasks = family.batch_at(0)
    flat.update({f"task/{k}": v for k, v in partition.flatten(tasks).items()})
    np.savez(data_path, **flat)


def _run_ftlab(
    inner_steps: int, data_path: str, steps: int, warmup: int, *, xla_defaults: bool = False
) -> dict:
    import jax
    import optax

    from configs import maml_sinusoid
    from experiments.trainers import meta as trainer
    from ftlab import meta
    from ftlab.core import partition

    config = maml_sinusoid.get_config(f"method=maml,inner_steps={inner_steps}")
    data = np.load(data_path)
    params = partition.unflatten({k[6:]: data[k] for k in data.files if k.startswith("param/")})
    tasks = partition.unflatten({k[5:]: data[k] for k in data.files if k.startswith("task/")})
    loss_fn = trainer.FAMILIES["sinusoid"](config, None).loss_fn
    tx = optax.adam(config.optim.lr)
    state = trainer.init_state(config, params, tx)
    options = {} if xla_defaults else meta.compiler_options()
    step_fn = jax.jit(
        trainer.build_step(config, loss_fn, tx), donate_argnums=0, compiler_options=options
    )
    tasks = jax.device_put(tasks)
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, tasks).compile()
    compile_s = time.perf_counter() - t0
    holder = {"state": state}

    def step():
        holder["state"], metrics = compiled(holder["state"], tasks)
        return metrics

    first = float(step()["train/loss"])
    out = _time(step, steps=steps, warmup=warmup, sync=jax.block_until_ready)
    dev = jax.devices()[0]
    return {
        **out,
        "first_step_loss": first,
        "compiler_options": options,
        "compile_s": compile_s,
        "platform": dev.platform,
        "device_kind": dev.device_kind,
        "version": f"jax {jax.__version__}",
    }


# -- torch --------------------------------------------------------------------------------------
def _torch_setup(data_path: str):
    import torch

    torch.set_num_threads(_TORCH_THREADS.value or _cores())
    data = np.load(data_path)
    model = torch.nn.Sequential(
        torch.nn.Linear(1, 40),
        torch.nn.ReLU(),
        torch.nn.Linear(40, 40),
        torch.nn.ReLU(),
        torch.nn.Linear(40, 1),
    )
    with torch.no_grad():
        for i, name in enumerate(("hidden_0", "hidden_1", "head")):
            layer = model[2 * i]
            layer.weight.copy_(torch.from_numpy(data[f"param/{name}/kernel"].T.copy()))
            layer.bias.copy_(torch.from_numpy(data[f"param/{name}/bias"]))
    device = common.torch_device(torch)
    model.to(device)
    tasks = {
        k: torch.from_numpy(data[f"task/{p}/{v}"]).to(device)
        for k, p, v in (
            ("xs", "support", "x"),
            ("ys", "support", "y"),
            ("xq", "query", "x"),
            ("yq", "query", "y"),
        )
    }
    return torch, model, tasks


def _run_higher(inner_steps: int, data_path: str, steps: int, warmup: int) -> dict:
    torch, model, t = _torch_setup(data_path)
    import higher

    mse = torch.nn.functional.mse_loss
    meta_opt = torch.optim.Adam(model.parameters(), lr=META_LR)
    inner_opt = torch.optim.SGD(model.parameters(), lr=INNER_LR)
    num_tasks = t["xs"].shape[0]

    def step():
        meta_opt.zero_grad()
        total = 0.0
        for i in range(num_tasks):
            with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (fm, opt):
                for _ in range(inner_steps):
                    opt.step(mse(fm(t["xs"][i]), t["ys"][i]))
                query = mse(fm(t["xq"][i]), t["yq"][i]) / num_tasks
                query.backward()
                total += query.item()
        meta_opt.step()
        return total

    first = step()
    return {
        **_time(step, steps=steps, warmup=warmup),
        "first_step_loss": first,
        **common.torch_platform(torch, torch.get_num_threads()),
        "version": f"torch {torch.__version__}, higher {importlib.metadata.version('higher')}",
    }


def _run_torchfunc(inner_steps: int, data_path: str, steps: int, warmup: int) -> dict:
    torch, model, t = _torch_setup(data_path)
    from torch import func

    mse = torch.nn.functional.mse_loss
    params = dict(model.named_parameters())
    meta_opt = torch.optim.Adam(params.values(), lr=META_LR)

    def loss(p, x, y):
        return mse(func.functional_call(model, p, (x,)), y)

    def task_loss(p, xs, ys, xq, yq):
        for _ in range(inner_steps):
            g = func.grad(loss)(p, xs, ys)
            p = {k: p[k] - INNER_LR * g[k] for k in p}
        return loss(p, xq, yq)

    batched = func.vmap(task_loss, in_dims=(None, 0, 0, 0, 0))

    def step():
        meta_opt.zero_grad()
        meta_loss = batched(params, t["xs"], t["ys"], t["xq"], t["yq"]).mean()
        meta_loss.backward()
        meta_opt.step()
        return meta_loss.item()

    first = step()
    return {
        **_time(step, steps=steps, warmup=warmup),
        "first_step_loss": first,
        **common.torch_platform(torch, torch.get_num_threads()),
        "version": f"torch {torch.__version__}",
    }


_RUNNERS = {
    "ftlab": _run_ftlab,
    "ftlab_xla_defaults": functools.partial(_run_ftlab, xla_defaults=True),
    "higher": _run_higher,
    "torchfunc": _run_torchfunc,
}


def _child(variant: str) -> None:
    impl, inner = variant.split(":")
    if impl == "data":
        return _write_data(_DATA.value)
    steps = _FTLAB_STEPS.value if impl.startswith("ftlab") else _STEPS.value
    steps, warmup = (3, 1) if _QUICK.value else (steps, _WARMUP.value)
    record = {
        "bench": "maml_sinusoid_meta_step",
        "impl": impl,
        "inner_steps": int(inner),
        "meta_batch": META_BATCH,
        "shots": SHOTS,
        "second_order": True,
        "cores": _cores(),
        **_RUNNERS[impl](int(inner), _DATA.value, steps, warmup),
    }
    # The machine's 1-minute load average at the end: a busy machine makes every timing noisy.
    record["load_avg_1min"] = os.getloadavg()[0]
    print("RESULT " + json.dumps(record), flush=True)


def main(argv):
    del argv
    if _VARIANT.value:
        return _child(_VARIANT.value)
    out = _OUT.value or (
        "experiments/bench/maml_sinusoid_quick.jsonl"
        if _QUICK.value
        else "experiments/bench/maml_sinusoid.jsonl"
    )
    unknown = [i for i in _IMPLS.value if i not in IMPLS]
    if unknown:
        raise app.UsageError(f"--impls: unknown {unknown}; expected a subset of {IMPLS}")
    if _ROUNDS.value < 1:
        raise app.UsageError(f"--rounds={_ROUNDS.value}; expected at least 1")
    variants = [
        f"{impl}:{inner}" for inner in _INNER.value for impl in IMPLS if impl in _IMPLS.value
    ]
    records, failed = [], []
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "init.npz")
        # Odd rounds run the variants in reverse, so no variant always follows the same one.
        schedule = [("data:0", 0)] + [
            (v, r) for r in range(_ROUNDS.value) for v in (variants[:: -1 if r % 2 else 1])
        ]
        for variant, round_ in schedule:
            cmd = [
                sys.executable,
                "-m",
                "experiments.bench.maml_sinusoid",
                f"--variant={variant}",
                f"--data={data}",
                f"--steps={_STEPS.value}",
                f"--ftlab_steps={_FTLAB_STEPS.value}",
                f"--warmup={_WARMUP.value}",
                f"--torch_threads={_TORCH_THREADS.value}",
            ]
            if _QUICK.value:
                cmd.append("--quick")
            logging.info("round %d: running %s", round_, variant)
            proc = subprocess.run(cmd, cwd=_REPO_ROOT, capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if variant == "data:0" and not proc.returncode:
                continue
            if proc.returncode or not lines:
                failed.append(variant)
                logging.error("%s failed:\n%s", variant, proc.stderr[-3000:])
                continue
            records.append({**json.loads(lines[-1][len("RESULT ") :]), "round": round_})
    group = ("inner_steps",)
    common.round_speedups(records, name="impl", group=group, peers=IMPLS[1:])
    if _ROUNDS.value > 1:
        records += common.summarize_rounds(records, name="impl", group=group)
    text = "".join(json.dumps(r) + "\n" for r in records)
    print(text, end="")
    pathlib.Path(_REPO_ROOT / out).write_text(text)
    if failed:
        logging.error("failed variants: %s", failed)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
