"""Loading a Hugging Face model folder: ftlab's `third_party.hf.load` against transformers'.

    .venv/bin/python -m experiments.bench.hf_load --peer_python=/path/to/venv-with-torch/bin/python

Two folders: the bundled all-MiniLM-L6-v2 (one `model.safetensors`, 90 MB) and the same weights
re-saved by ftlab in shards of ``--shard_mb`` (with `model.safetensors.index.json`). Each
(loader, folder) pair runs in its own process, so its peak memory is its own:

- ``ftlab``: `third_party.hf.load(folder)` to float32 numpy arrays (config checked field by
  field, tensors read one at a time, one shard at a time);
- ``transformers``: `AutoModel.from_pretrained(folder)` to a float32 torch model in eval mode,
  run by ``--peer_python`` (an interpreter with torch and transformers; they are no dependency
  of ftlab).

Each child reports the median wall time of ``--reps`` loads after one untimed load, and the
peak resident memory that its first load added over the process's size after its imports
(``load_peak_mib``). The parent adds, per folder, the ratios ftlab / transformers
(``time_vs_transformers``, ``memory_vs_transformers``: below 1 is better). Results:
`experiments/bench/RESULTS.md`.
"""

from __future__ import annotations

import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time

if __name__ != "__main__" or sys.argv[1:2] != ["child"]:
    # The parent (and tests). A child needs only the standard library and its loader, so the
    # peer's interpreter needs no absl.
    from absl import app, flags, logging

    from experiments.bench import common

    _PEER_PYTHON = flags.DEFINE_string(
        "peer_python", sys.executable, "Python with torch and transformers for the peer loads."
    )
    _REPS = flags.DEFINE_integer("reps", 5, "Timed loads per variant (after one untimed load).")
    _SHARD_MB = flags.DEFINE_integer("shard_mb", 20, "Shard size of the sharded copy, in MB.")
    _OUT = flags.DEFINE_string(
        "out", "experiments/bench/hf_load.jsonl", "Where to write the lines."
    )


LOADERS = ("ftlab", "transformers")


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _loader(name: str):
    if name == "ftlab":
        from third_party import hf  # noqa: PLC0415

        return lambda folder: hf.load(folder)
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    torch.set_num_threads(os.cpu_count() or 1)

    def load(folder):
        return transformers.AutoModel.from_pretrained(folder, dtype=torch.float32).eval()

    return load


def child(variant: str, folder: str, reps: int) -> None:
    """Measures one (loader, folder) pair and prints its JSON line."""
    loader, kind = variant.split(":")
    load = _loader(loader)
    base = _rss_mib()
    start = time.perf_counter()
    model = load(folder)
    first_s = time.perf_counter() - start
    peak = _peak_mib() - max(base, 0.0)
    del model
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        load(folder)
        times.append(time.perf_counter() - start)
    line = {
        "bench": "hf_load",
        "loader": loader,
        "folder": kind,
        "first_load_s": round(first_s, 4),
        "median_load_s": round(statistics.median(times), 4),
        "min_load_s": round(min(times), 4),
        "max_load_s": round(max(times), 4),
        "reps": reps,
        "load_peak_mib": round(peak, 1),
        "rss_after_imports_mib": round(base, 1),
        "files_mib": round(
            sum(p.stat().st_size for p in pathlib.Path(folder).glob("*.safetensors")) / 2**20, 1
        ),
        "python": sys.version.split()[0],
    }
    print(json.dumps(line), flush=True)


def _sharded_copy(dst: pathlib.Path, shard_mb: int) -> pathlib.Path:
    from third_party import hf, minilm  # noqa: PLC0415

    model_config, params, tokenizer = hf.load(minilm.model_dir())
    hf.save(dst, model_config, params, tokenizer, max_shard_bytes=shard_mb * 10**6)
    return dst


def main(argv):
    del argv
    from third_party import minilm  # noqa: PLC0415

    lines, failed = [], []
    with tempfile.TemporaryDirectory() as tmp:
        folders = {
            "minilm": str(minilm.model_dir()),
            "minilm_sharded": str(_sharded_copy(pathlib.Path(tmp) / "sharded", _SHARD_MB.value)),
        }
        for kind, folder in folders.items():
            for loader in LOADERS:
                python = _PEER_PYTHON.value if loader == "transformers" else sys.executable
                cmd = [python, "-m", "experiments.bench.hf_load", "child", f"{loader}:{kind}"]
                cmd += [folder, str(_REPS.value)]
                # The peer's interpreter may lack absl: it still needs this repository's modules.
                env = {**os.environ, "PYTHONPATH": str(common.REPO_ROOT)}
                proc = subprocess.run(
                    cmd, cwd=common.REPO_ROOT, env=env, stdout=subprocess.PIPE, text=True
                )
                got = [json.loads(t) for t in proc.stdout.splitlines() if t.startswith('{"bench"')]
                if proc.returncode or not got:
                    logging.error("%s:%s failed (exit %d): %s", loader, kind, proc.returncode, cmd)
                    failed.append(f"{loader}:{kind}")
                lines += got
    by = {(x["loader"], x["folder"]): x for x in lines}
    for (loader, kind), line in by.items():
        peer = by.get(("transformers", kind))
        if loader == "ftlab" and peer:
            line["time_vs_transformers"] = round(line["median_load_s"] / peer["median_load_s"], 3)
            line["memory_vs_transformers"] = round(
                line["load_peak_mib"] / max(peer["load_peak_mib"], 1e-9), 3
            )
    common.write_lines(lines, _OUT.value)
    if failed:
        raise SystemExit(f"failed: {failed}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["child"]:
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        app.run(main)
