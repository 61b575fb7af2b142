"""Config groups that every experiment shares."""

import ml_collections


def parallel(*, sharding: bool = True) -> ml_collections.ConfigDict:
    """``config.parallel``: data parallel over all devices; multi-host settings as on Cloud TPU.

    Run 2 processes x 4 devices on one machine (what the tests do) with
    ``--config.parallel.multihost=True --config.parallel.coordinator_address=127.0.0.1:PORT
    --config.parallel.num_processes=2 --config.parallel.process_id=0`` (and 1), each process
    under ``XLA_FLAGS=--xla_force_host_platform_device_count=4``.
    """
    group = ml_collections.ConfigDict()
    # "mesh" (jit + NamedSharding over a `data` axis) or "pmap"
    group.mode = "mesh"
    # 0: all devices
    group.num_devices = 0
    # multi-host: jax.distributed.initialize() with these (empty/-1: auto-detect, as on TPU)
    group.multihost = False
    group.coordinator_address = ""
    group.num_processes = 0
    group.process_id = -1
    if not sharding:
        return group
    # Parameters larger than a device: ((regex over leaf paths, tactic), ...) with tactics
    # replicate / fsdp / column / row (ftlab.core.sharding), over the mesh below ("data=2,fsdp=4";
    # "": every device on fsdp). Empty: data parallel, every parameter on every device.
    group.sharding_rules = ()
    group.mesh = ""
    # leaves smaller than this are replicated rather than split over fsdp
    group.fsdp_min_bytes = 1 << 16
    return group


def step() -> ml_collections.ConfigDict:
    """``config.step``: how the train step is built at scale (`experiments.loop.step_policy`)."""
    group = ml_collections.ConfigDict()
    # micro-batches per update: the update of the whole batch, in smaller passes
    group.accumulate = 1
    # "" (off) or a name in ftlab.core.train.REMAT_POLICIES, e.g. "nothing_saveable"
    group.remat_policy = ""
    # regex over Flax module paths rematerialised one call at a time, e.g. "encoder/layer_\\d+";
    # "" with a policy: the whole loss
    group.remat_modules = ""
    # "" (as the model is) or e.g. "bfloat16": the forward pass's dtype (float32 master weights)
    group.compute_dtype = ""
    # "" (as loaded) or e.g. "bfloat16": how frozen leaves are stored
    group.frozen_dtype = ""
    return group
