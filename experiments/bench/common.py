"""The parent half every benchmark shares: one subprocess per variant, JSON lines out.

Each variant runs in its own process (``python -m <module> --variant=NAME --<setting>=...``), one
after another, so that its peak RSS is its own and nothing it compiled or allocated leaks into
the next. A child prints its result as JSON lines starting with ``{"bench"``; anything else it
prints is passed on to stderr.

The benchmarks against a peer library in another interpreter (``--peer_python``: TRL, PEFT)
share the rest: `run_peer_bench` in the parent, `child_main` in each child, and the
peer-side helpers below (SmolLM2's shape, a word-level tokenizer, a step timer). The peer's
interpreter imports this module too, so it imports nothing at the top beyond the standard
library (absl and JAX are imported where they are used).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def run_children(
    module: str, variants: Iterable[str], settings: Mapping[str, object]
) -> tuple[list[dict], list[str]]:
    """Runs ``module`` once per variant; returns ``(result lines, failed variants)``."""
    from absl import logging  # noqa: PLC0415 (the peer's interpreter has no absl)

    lines, failed = [], []
    for variant in variants:
        cmd = [sys.executable, "-m", module, f"--variant={variant}"]
        cmd += [f"--{k}={v}" for k, v in settings.items()]
        logging.info("running %s", variant)
        # The child's stderr (logs, warnings) passes through; its stdout carries the result.
        proc = subprocess.run(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True, check=False)
        got = []
        for text in proc.stdout.splitlines():
            if text.startswith('{"bench"'):
                got.append(json.loads(text))
            else:
                print(text, file=sys.stderr)
        if proc.returncode or not got:
            logging.error(
                "variant %s failed (exit %d); rerun it alone with\n  %s",
                variant,
                proc.returncode,
                " ".join(cmd),
            )
            failed.append(variant)
        lines.extend(got)
    return lines, failed


def write_lines(lines: list[dict], out: str | pathlib.Path) -> pathlib.Path:
    """Prints each result as one JSON line and writes them all to ``out`` (repo-relative)."""
    from absl import logging  # noqa: PLC0415 (the peer's interpreter has no absl)

    out = pathlib.Path(out)
    if not out.is_absolute():
        out = REPO_ROOT / out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        for x in lines:
            text = json.dumps(x)
            print(text, flush=True)
            f.write(text + "\n")
    logging.info("wrote %d lines to %s", len(lines), out)
    return out


def choose_variants(requested: str, known: Iterable[str]) -> list[str]:
    """The ``--variants`` list in the benchmark's fixed order; unknown names are an error."""
    known = list(known)
    asked = [v.strip() for v in requested.split(",") if v.strip()]
    unknown = [v for v in asked if v not in known]
    if unknown or not asked:
        raise ValueError(
            f"--variants: unknown {unknown or '(empty)'}; choose from {', '.join(known)}"
        )
    return [v for v in known if v in asked]


def add_rates(
    lines: list[dict],
    bench: str,
    *,
    baseline: str,
    speedup_key: str,
    flops_from: Mapping[str, str] = {},  # noqa: B006 - read only
) -> list[dict]:
    """Fills the fields that compare variants of one benchmark run, in place.

    ``gflops`` (``gflop_per_step / median_step_s``), ``matmul_peak_gflops`` (the fastest
    ``matmul_peak`` line on the same platform), ``fraction_of_matmul_peak`` and ``speedup_key``
    (``baseline``'s median step over this one's). A variant named in ``flops_from`` does the same
    math as the variant it maps to, so it takes that one's XLA count (torch and PEFT have no cost
    analysis; a bf16 or Q4 step is the fp32 step's FLOPs with other storage), or its own
    ``analytic_gflop_per_step`` when that variant did not run. A ratio whose reference did not run
    is None.

    Args:
      lines: the children's results.
      bench: the ``bench`` field of the step lines to fill.
      baseline: the variant the speedups are relative to.
      speedup_key: the name of the speedup field, e.g. ``speedup_vs_peft``.
      flops_from: variant -> the variant whose ``gflop_per_step`` stands for its own.

    Returns:
      ``lines``.
    """
    steps = {x["variant"]: x for x in lines if x["bench"] == bench}
    peaks: dict[str, float] = {}
    for x in lines:
        if x["bench"] == "matmul_peak":
            peaks[x["platform"]] = max(peaks.get(x["platform"], 0.0), x["gflops"])
    reference = steps.get(baseline)
    for name, x in steps.items():
        if name in flops_from:
            source = steps.get(flops_from[name], {})
            if source.get("gflop_per_step"):
                x["gflop_per_step"] = source["gflop_per_step"]
                x["gflop_source"] = f"xla_cost_analysis of {flops_from[name]}"
            else:
                x["gflop_per_step"] = x.get("analytic_gflop_per_step")
                x["gflop_source"] = f"analytic ({flops_from[name]} did not run)"
        gflop = x.get("gflop_per_step")
        x["gflops"] = None if gflop is None else gflop / x["median_step_s"]
        peak = peaks.get(x["platform"])
        x["matmul_peak_gflops"] = peak
        x["fraction_of_matmul_peak"] = None if not (peak and x["gflops"]) else x["gflops"] / peak
        x[speedup_key] = (
            None if reference is None else reference["median_step_s"] / x["median_step_s"]
        )
    return lines


def time_calls(fn: Callable[[], object], *, warmup: int, reps: int) -> list[float]:
    """Wall-clock seconds of each of ``reps`` calls of ``fn`` after ``warmup`` untimed calls.

    ``fn`` must return only once its work is finished (block_until_ready for JAX).
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def time_calls_cpu(
    fn: Callable[[], object], *, warmup: int, reps: int
) -> tuple[list[float], list[float]]:
    """`time_calls`, and the process's CPU seconds (every thread's) of each timed call.

    On a machine shared with other work the wall time grows with the load while the CPU time
    grows only with what the process itself burns (spinning threads included), so it is the
    steadier of the two.
    """
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(reps):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return wall, cpu


def cpu_fields(cpu: list[float]) -> dict:
    """``median_step_cpu_s``: the median CPU seconds of the timed steps (`time_calls_cpu`)."""
    return {"median_step_cpu_s": statistics.median(cpu)}


def timing_fields(times: list[float]) -> dict:
    """The step-time fields every step benchmark reports: median, rate, range, count."""
    median = statistics.median(times)
    return {
        "median_step_s": median,
        "steps_per_s": 1.0 / median,
        "min_step_s": min(times),
        "max_step_s": max(times),
        "timed_steps": len(times),
    }


def round_speedups(
    lines: list[dict], *, name: str, group: tuple[str, ...], peers: Iterable[str]
) -> list[dict]:
    """Fills ``speedup_vs_<peer>`` (the peer's median step over this line's), in place.

    A line is compared only with the peer's line of the same ``round`` and ``group`` fields, so
    that both were timed minutes apart rather than at the two ends of a long run on a machine
    whose speed drifts. A peer that did not run gives None.
    """

    def key(x):
        return (x.get("round"), *(x[g] for g in group))

    by_key = {(x[name], key(x)): x for x in lines}
    for x in lines:
        for peer in peers:
            other = by_key.get((peer, key(x)))
            x[f"speedup_vs_{peer}"] = other["median_step_s"] / x["median_step_s"] if other else None
    return lines


def summarize_rounds(lines: list[dict], *, name: str, group: tuple[str, ...]) -> list[dict]:
    """One ``"summary": "over_rounds"`` line per (``name``, ``group``) of round lines.

    ``median_step_s`` is the median of the rounds' medians; each ``speedup_vs_*`` field the
    median of the rounds' ratios (see `round_speedups`), with its ``_min`` and ``_max`` beside
    it, so a target is judged on the typical round and the spread is on record.
    """
    groups: dict[tuple, list[dict]] = {}
    for x in lines:
        groups.setdefault((x[name], *(x[g] for g in group)), []).append(x)
    out = []
    for (label, *values), rounds in groups.items():
        summary = {
            "bench": rounds[0]["bench"],
            name: label,
            **dict(zip(group, values, strict=True)),
        }
        summary["summary"] = "over_rounds"
        summary["rounds"] = len(rounds)
        summary["median_step_s"] = statistics.median(x["median_step_s"] for x in rounds)
        summary["round_median_step_s"] = [x["median_step_s"] for x in rounds]
        for field in sorted({k for x in rounds for k in x if k.startswith("speedup_vs_")}):
            ratios = [x[field] for x in rounds if x.get(field) is not None]
            summary[field] = statistics.median(ratios) if ratios else None
            summary[f"{field}_min"] = min(ratios) if ratios else None
            summary[f"{field}_max"] = max(ratios) if ratios else None
        out.append(summary)
    return out


# -- where a compiled step spends its time -------------------------------------------------------

# Trace events that time the runtime around the ops rather than an op itself.
_RUNTIME_EVENTS = (
    "ThunkExecutor",
    "SlinkyThreadPool",
    "PjitFunction",
    "ParseArguments",
    "CommonPjRt",
    "ExecuteReplicated",
    "$",
)


def _strip_index(name: str) -> str:
    return re.sub(r"[.]\d+$", "", name)


def op_kinds(hlo_text: str) -> dict[str, str]:
    """Maps each instruction of a compiled module's text to ``"<fusion kind>:<op>"``.

    The kind is the instruction name without its ``.N`` suffix (``ynn_fusion``, ``copy``, ...);
    the op is the last part of its ``op_name`` metadata (``dot_general``, ``reduce_sum``, ...),
    which tells a library fusion that runs a dot from one that runs a reduction; inside one of
    jax's own jitted helpers (``jit(_bernoulli)``, the random bits of dropout) it is the
    helper's name.
    """
    kinds = {}
    for line in hlo_text.splitlines():
        match = re.match(r"\s*(?:ROOT )?%([\w.-]+) = .*?op_name=\"([^\"]*)\"", line)
        if match:
            name, op_name = match.groups()
            helper = re.search(r"jit\((_\w+)\)", op_name)
            op = helper.group(1) if helper else op_name.rsplit("/", 1)[-1]
            kinds[name] = f"{_strip_index(name)}:{op}"
    return kinds


def op_profile(
    fn: Callable[[], object], *, calls: int = 3, hlo_text: str = "", top: int = 15
) -> dict:
    """Per-op time of ``calls`` calls of ``fn`` under ``jax.profiler``, summed by kind.

    Returns ``{"op_ms_per_call": total, "by_kind_ms": {kind: ms per call}}`` with the ``top``
    largest kinds. Kinds are instruction names without their ``.N`` suffix, refined by
    `op_kinds` when the compiled module's text is given. Op times on several threads can add up
    to more than the wall time. ``fn`` must block until its work is done.
    """
    import gzip  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    import jax  # noqa: PLC0415

    kinds = op_kinds(hlo_text) if hlo_text else {}
    with tempfile.TemporaryDirectory() as logdir:
        with jax.profiler.trace(logdir, create_perfetto_trace=True):
            for _ in range(calls):
                fn()
        traces = sorted(pathlib.Path(logdir).rglob("*.trace.json.gz"))
        if not traces:
            raise RuntimeError(f"jax.profiler wrote no perfetto trace under {logdir}")
        events = json.loads(gzip.decompress(traces[-1].read_bytes()))["traceEvents"]
    totals: dict[str, float] = {}
    for event in events:
        name = event.get("name", "")
        if event.get("ph") != "X" or "dur" not in event or name.startswith(_RUNTIME_EVENTS):
            continue
        kind = kinds.get(name) or _strip_index(name)
        totals[kind] = totals.get(kind, 0.0) + event["dur"] / 1e3 / calls  # us -> ms per call
    ranked = sorted(totals.items(), key=lambda item: -item[1])
    return {
        "op_ms_per_call": sum(totals.values()),
        "by_kind_ms": {kind: round(ms, 2) for kind, ms in ranked[:top]},
    }


# -- the torch peers: on the GPU when torch sees one ---------------------------------------------


def torch_device(torch) -> str:
    """Where a torch peer runs: ``"cuda"`` when torch sees a GPU, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_sync(torch) -> None:
    """Waits for the GPU's queued work (a no-op on the CPU), before a host clock is read."""
    if torch_device(torch) == "cuda":
        torch.cuda.synchronize()


def torch_platform(torch, threads: int) -> dict:
    """The fields every torch line reports about where it ran (and its device memory peak)."""
    cuda = torch_device(torch) == "cuda"
    return {
        "platform": "gpu" if cuda else "cpu",
        "device_kind": torch.cuda.get_device_name() if cuda else "cpu",
        "device_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "threads": None if cuda else threads,
    }


# -- benchmarks against a peer library in another interpreter (TRL) ------------------------------

# SmolLM2-135M's architecture (30 layers at full size): the shape both sides build.
SMOLLM2 = dict(
    vocab_size=49152, hidden_size=576, num_heads=9, num_kv_heads=3, intermediate_size=1536,
    max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
)  # fmt: skip
# LoRA on the query and value projections, as every peer benchmark of issue 20 sets it.
LORA_RANK, LORA_ALPHA = 8, 16.0
LORA_TARGETS = r"decoder/layer_\d+/attention/(query|value)"
PEER_LORA_TARGETS = ["q_proj", "v_proj"]


def peak_rss_mib() -> float:
    """This process's peak resident set (``ru_maxrss``) in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def is_child() -> bool:
    """Whether this process is a child of `run_peer_bench` (``python -m M child VARIANT JSON``)."""
    return sys.argv[1:2] == ["child"]


def child_main(bench: str, runs: Mapping[str, Callable[[dict], dict]]) -> None:
    """The child's half: runs ``runs[VARIANT](settings)`` and prints its one result line.

    The line holds ``bench``, ``variant``, the settings, what the run returned, the process's
    ``peak_rss_mib`` (so it counts this variant alone), ``cores`` and ``loadavg_1min`` (the
    machine's 1-minute load average when the run started and ended: other work slows a CPU
    benchmark, and torch's spinning threads more than XLA's).
    """
    variant, settings = sys.argv[2], json.loads(sys.argv[3])
    load_before = os.getloadavg()[0]
    fields = runs[variant](settings)
    line = {"bench": bench, "variant": variant, **settings, **fields,
            "peak_rss_mib": peak_rss_mib(), "cores": len(os.sched_getaffinity(0)),
            "loadavg_1min": [load_before, os.getloadavg()[0]]}  # fmt: skip
    print(json.dumps(line), flush=True)


def run_peer_bench(
    module: str,
    variants: Iterable[str],
    settings: Mapping[str, object],
    *,
    peer_python: str | None,
    peer_of: Mapping[str, str],
    out: str | pathlib.Path,
    peer: str = "trl",
    settings_of: Callable[[str, dict], dict] | None = None,
) -> int:
    """The parent's half: one child per variant, ratios against the peer, lines to ``out``.

    A variant whose name starts with ``peer`` runs under ``peer_python`` (torch and the peer
    library are no dependency of ftlab), the others under this interpreter. Without
    ``peer_python`` the peer's variants are skipped, with a log line saying so, and every ratio
    is None. Each line gets ``speedup_vs_<peer>`` (the peer variant's median step over its own)
    and ``memory_vs_<peer>`` (its peak RSS over the peer variant's), where ``peer_of`` maps it
    to a peer variant that ran, else None; with both lines' ``median_step_cpu_s`` also
    ``cpu_speedup_vs_<peer>`` (the same ratio of CPU seconds per step).

    Args:
      module: The benchmark's module, run as ``python -m module child VARIANT JSON``.
      variants: The variants to run, in order.
      settings: JSON-able settings every child gets.
      peer_python: The peer's interpreter, or None to run ftlab's variants alone.
      peer_of: variant -> the peer variant it is compared with.
      out: Where the lines go (`write_lines`).
      peer: The peer's name: the prefix of its variants and the ratio fields' suffix.
      settings_of: ``(variant, settings) -> that variant's settings``, for settings that
        differ by variant (e.g. the method); None: ``settings`` for all.

    Returns:
      The exit status: 1 if a variant failed, else 0.
    """
    from absl import logging  # noqa: PLC0415 (the peer's interpreter has no absl)

    lines, failed = [], []
    for variant in variants:
        if variant.startswith(peer) and not peer_python:
            logging.warning("%s skipped: no --peer_python with %s installed", variant, peer)
            continue
        python = peer_python if variant.startswith(peer) else sys.executable
        mine = settings_of(variant, dict(settings)) if settings_of else dict(settings)
        cmd = [python, "-m", module, "child", variant, json.dumps(mine)]
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        logging.info("running %s", " ".join(cmd))
        proc = subprocess.run(
            cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, text=True, check=False
        )
        got = [json.loads(t) for t in proc.stdout.splitlines() if t.startswith('{"bench"')]
        if proc.returncode or not got:
            logging.error(
                "variant %s failed (exit %d): rerun\n  %s", variant, proc.returncode, " ".join(cmd)
            )
            failed.append(variant)
        lines.extend(got)
    by = {x["variant"]: x for x in lines}
    for x in lines:
        other = by.get(peer_of.get(x["variant"], ""))
        x[f"speedup_vs_{peer}"] = other["median_step_s"] / x["median_step_s"] if other else None
        x[f"memory_vs_{peer}"] = x["peak_rss_mib"] / other["peak_rss_mib"] if other else None
        if other and "median_step_cpu_s" in x and "median_step_cpu_s" in other:
            x[f"cpu_speedup_vs_{peer}"] = other["median_step_cpu_s"] / x["median_step_cpu_s"]
    write_lines(lines, out)
    return 1 if failed else 0


def peer_timing(times: list[float], warmup: int, cpu: list[float] | None = None) -> dict:
    """`timing_fields` of a peer's per-step times after its ``warmup`` first steps, plus the
    first step's time (its analogue of a compile), and `cpu_fields` of ``cpu`` if given."""
    if len(times) <= warmup:
        raise RuntimeError(f"the peer ran {len(times)} steps; expected more than {warmup}")
    out = {**timing_fields(times[warmup:]), "first_step_s": times[0]}
    return {**out, **cpu_fields(cpu[warmup:])} if cpu else out


def step_timer(transformers, times: list[float], cpu: list[float] | None = None):
    """A `transformers.TrainerCallback` appending each optimizer step's wall time to ``times``
    (and its process CPU time, every thread's, to ``cpu`` if given).

    A step runs from ``on_step_begin`` (after the batch is loaded) to ``on_step_end`` (after
    the optimizer's update): forward, loss, backward, clipping, update.
    """

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            self.start, self.start_cpu = time.perf_counter(), time.process_time()

        def on_step_end(self, *args, **kwargs):
            times.append(time.perf_counter() - self.start)
            if cpu is not None:
                cpu.append(time.process_time() - self.start_cpu)

    return Timer()


def torch_cpu_threads(torch) -> int:
    """Sets torch's thread count to the cores this process may use; returns it."""
    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    return threads


def hf_smollm2(transformers, layers: int):
    """`transformers.LlamaForCausalLM` of `SMOLLM2`'s shape with ``layers`` layers, random
    weights, float32, tied embeddings; pad 0, EOS 1, BOS 2 (the `word_tokenizer`'s)."""
    config = transformers.LlamaConfig(
        vocab_size=SMOLLM2["vocab_size"], hidden_size=SMOLLM2["hidden_size"],
        intermediate_size=SMOLLM2["intermediate_size"], num_hidden_layers=layers,
        num_attention_heads=SMOLLM2["num_heads"], num_key_value_heads=SMOLLM2["num_kv_heads"],
        max_position_embeddings=SMOLLM2["max_position_embeddings"],
        rope_theta=SMOLLM2["rope_theta"], rms_norm_eps=SMOLLM2["rms_norm_eps"],
        tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).float()


# The word tokenizer's special tokens, ids 0-3. They are not of the "t<id>" form: transformers
# splits text at every occurrence of a special token, so "t3" as unk would cut "t31310" apart.
_SPECIAL_WORDS = ("<pad>", "<eos>", "<bos>", "<unk>")


def word_tokenizer(transformers, tokenizers):
    """A tokenizer with one word per token id, so a text of n words is exactly n tokens and
    decoding is lossless: ``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, ``<unk>`` 3, then ``t4`` ...
    ``t49151``. `words` writes token ids as its text."""
    vocab = {w: i for i, w in enumerate(_SPECIAL_WORDS)}
    vocab.update({f"t{i}": i for i in range(len(_SPECIAL_WORDS), SMOLLM2["vocab_size"])})
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    backend.decoder = tokenizers.decoders.WordPiece()  # joins words with spaces
    pad, eos, bos, unk = _SPECIAL_WORDS
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=pad, eos_token=eos, bos_token=bos, unk_token=unk
    )


def words(ids: Iterable[int]) -> str:
    """The `word_tokenizer` text of token ids."""
    n = len(_SPECIAL_WORDS)
    return " ".join(_SPECIAL_WORDS[int(t)] if int(t) < n else f"t{int(t)}" for t in ids)


def peer_version(**modules) -> str:
    """``"trl 1.16.0, peft ..."`` of the given modules (name -> module)."""
    return ", ".join(f"{name} {m.__version__}" for name, m in modules.items())


class TrlPeer:
    """The TRL side of a post-training bench (``sft_step``, ``dpo_step``, ``grpo_step``), run in
    the peer's venv: its modules, a seeded random SmolLM2-shaped model (`hf_smollm2`) and the
    `word_tokenizer`, with what every TRL trainer there is given alike.

    Attributes:
        datasets, peft, torch, transformers, trl: The peer's modules.
        model: ``transformers.LlamaForCausalLM`` of ``layers`` layers.
        tokenizer: The word tokenizer.
        threads: Torch's CPU threads (`torch_cpu_threads`).
    """

    def __init__(self, layers: int):
        import datasets  # noqa: PLC0415 - the peer's venv only
        import peft  # noqa: PLC0415
        import tokenizers  # noqa: PLC0415
        import torch  # noqa: PLC0415
        import transformers  # noqa: PLC0415
        import trl  # noqa: PLC0415

        self.datasets, self.peft, self.torch = datasets, peft, torch
        self.transformers, self.trl = transformers, trl
        self.threads = torch_cpu_threads(torch)
        torch.manual_seed(0)
        self.model = hf_smollm2(transformers, layers)
        self.tokenizer = word_tokenizer(transformers, tokenizers)

    def args(self, config_cls, out: str, *, dtype: str, max_steps: int, **options):
        """``config_cls`` (``trl.SFTConfig``, ...) with the settings every bench shares: a
        constant learning rate without weight decay, a log line per step, nothing saved or
        reported, CPU, mixed precision for ``dtype`` bfloat16, activations kept (as ftlab)."""
        return config_cls(
            output_dir=out, lr_scheduler_type="constant", weight_decay=0.0, max_steps=max_steps,
            logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
            bf16=dtype == "bfloat16", fp16=False, dataloader_num_workers=0, seed=0,
            gradient_checkpointing=False, **options,
        )  # fmt: skip

    def lora_config(self):
        """PEFT's LoRA of `LORA_RANK`, `LORA_ALPHA` on `PEER_LORA_TARGETS`, no dropout."""
        return self.peft.LoraConfig(
            r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=PEER_LORA_TARGETS,
            lora_dropout=0.0, task_type="CAUSAL_LM",
        )  # fmt: skip

    def result(self, trainer, times, warmup: int, cpu=None, **fields) -> dict:
        """The bench line of a trained ``trainer``: `peer_timing`, ``fields``, its trainable
        parameters, the platform, threads and versions."""
        params = trainer.model.parameters()
        return {
            **peer_timing(times, warmup, cpu),
            **fields,
            "trainable_params": sum(p.numel() for p in params if p.requires_grad),
            "platform": "cpu",
            "threads": self.threads,
            "version": peer_version(
                trl=self.trl, peft=self.peft, transformers=self.transformers, torch=self.torch
            ),
        }
