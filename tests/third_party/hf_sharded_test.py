"""`hf.load(..., shardings=...)`: each tensor goes straight into its sharding as it is read. On 8
simulated devices in one subprocess: the values are the unsharded load's, every device holds its
1/8 of each leaf, and the host holds one tensor read from the files at a time (a counting hook on
the loader's reads); errors and `load_abstract` here, on one device.
"""

import json
import pathlib

import jax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ftlab import testing
from ftlab.core import partition
from third_party import hf

ROOT = pathlib.Path(__file__).resolve().parents[2]
DATA = pathlib.Path(__file__).parent / "testdata" / "hf"

_CHILD = r"""
import gc, json, sys, weakref
import jax, ml_dtypes, numpy as np
from ftlab.core import partition, sharding
from third_party import hf

# Every array the loader reads from a file is counted from its read until it is freed.
live = {"now": 0, "peak": 0}
_fromfile = np.fromfile
def counting_fromfile(*args, **kwargs):
    a = _fromfile(*args, **kwargs)
    live["now"] += a.nbytes
    live["peak"] = max(live["peak"], live["now"])
    weakref.finalize(a, lambda n=a.nbytes: live.__setitem__("now", live["now"] - n))
    return a
np.fromfile = counting_fromfile

mesh = sharding.make_mesh({"fsdp": 8})
to_fsdp = lambda tree: sharding.shardings(tree, [(".*", "fsdp")], mesh, min_bytes=0)
out = {}
for arch, dtype in [("llama", np.float32), ("bert", np.float32), ("llama", ml_dtypes.bfloat16)]:
    key = f"{arch}/{np.dtype(dtype).name}"
    gc.collect(); live["now"] = live["peak"] = 0
    _, host, _ = hf.load(sys.argv[1] + "/" + arch, dtype=dtype)
    gc.collect()
    host_peak, host_held = live["peak"], live["now"]
    del host
    gc.collect(); live["now"] = live["peak"] = 0
    _, placed, _ = hf.load(sys.argv[1] + "/" + arch, dtype=dtype, shardings=to_fsdp)
    gc.collect()
    sharded_peak, sharded_held = live["peak"], live["now"]
    _, ref, _ = hf.load(sys.argv[1] + "/" + arch, dtype=dtype)
    flat, ref = partition.flatten(placed), partition.flatten(ref)
    out[key] = {
        "equal": sorted(flat) == sorted(ref) and all(
            np.array_equal(np.asarray(jax.device_get(flat[k])), ref[k]) for k in ref),
        "dtypes": sorted({str(x.dtype) for x in flat.values()}),
        "specs": sorted({str(x.sharding.spec) for x in flat.values()}),
        # Every device holds 1/8 of every leaf, so 1/8 of the tree.
        "shares": all(
            sorted(s.data.nbytes * 8 for s in x.addressable_shards) == [x.nbytes] * 8
            and len({s.device for s in x.addressable_shards}) == 8
            for x in flat.values()),
        "device_bytes": sorted(set(sharding.device_bytes(placed).values())),
        "total_bytes": sum(x.nbytes for x in flat.values()),
        "sharded_peak": sharded_peak, "sharded_held": sharded_held,
        "host_peak": host_peak, "host_held": host_held,
    }
print("RESULT " + json.dumps(out))
"""


def _largest_stored_tensor(arch):
    header = hf._SafetensorsFile(DATA / arch / "model.safetensors").header
    return max(b - a for a, b in (v["data_offsets"] for v in header.values()))


@pytest.fixture(scope="module")
def results():
    proc = testing.run_on_simulated_devices(_CHILD, str(DATA), root=ROOT)
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


@pytest.mark.parametrize("case", ["llama/float32", "bert/float32", "llama/bfloat16"])
def test_sharded_load_equals_the_host_load_with_an_eighth_per_device(results, case):
    r = results[case]
    assert r["equal"] and r["dtypes"] == [case.split("/")[1]]
    assert r["shares"] and r["device_bytes"] == [r["total_bytes"] // 8], r
    assert all("'fsdp'" in spec for spec in r["specs"]), r["specs"]


@pytest.mark.parametrize("case", ["llama/float32", "bert/float32", "llama/bfloat16"])
def test_sharded_load_holds_one_tensor_read_from_the_files_at_a_time(results, case):
    r = results[case]
    largest = _largest_stored_tensor(case.split("/")[0])
    # Each tensor read is freed before the next is read, and none is kept behind a shard.
    assert r["sharded_peak"] == largest and r["sharded_held"] == 0, r
    if case.endswith("float32"):
        # The hook sees a loader that holds its reads: the host load keeps the float32 tensors
        # it need not transpose or cast (the embedding tables among them) as read.
        assert r["host_held"] > largest and r["host_peak"] > largest, r


def test_load_abstract_gives_the_shapes_of_load_without_reading_tensors():
    config, abstract = hf.load_abstract(DATA / "qwen3")
    loaded_config, params, _ = hf.load(DATA / "qwen3")
    assert config == loaded_config
    shapes = {k: (v.shape, v.dtype) for k, v in partition.flatten(abstract).items()}
    assert shapes == {k: (v.shape, v.dtype) for k, v in partition.flatten(params).items()}


def test_shardings_that_do_not_fit_the_tree_are_named():
    mesh = jax.make_mesh((1,), ("fsdp",))
    replicated = NamedSharding(mesh, P())

    def lacking(tree):
        out = jax.tree.map(lambda _: replicated, tree)
        del out["decoder"]["final_norm"]
        return out

    with pytest.raises(ValueError, match=r"lacks \['decoder/final_norm/scale'\]"):
        hf.load(DATA / "llama", shardings=lacking)
    _, abstract = hf.load_abstract(DATA / "llama")
    shardings = jax.tree.map(lambda _: replicated, abstract)
    shardings["decoder"]["final_norm"]["scale"] = "replicate"
    with pytest.raises(ValueError, match=r"shardings\['decoder/final_norm/scale'\] is 'replicate'"):
        hf.load(DATA / "llama", shardings=shardings)
    # A tree (not a function) works as well; on one device the leaves are whole.
    shardings["decoder"]["final_norm"]["scale"] = replicated
    _, params, _ = hf.load(DATA / "llama", shardings=shardings)
    assert isinstance(params["decoder"]["final_norm"]["scale"], jax.Array)
