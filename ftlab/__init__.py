"""ftlab: transfer learning and fine-tuning as transformations of parameter pytrees.

The method modules are reachable from the top, as a researcher would type them::

    import ftlab
    params = ftlab.lora.init(params, rng, targets=[r"encoder/.*/query"], rank=8, alpha=16)
    trainable, frozen = ftlab.partition.split(params, ftlab.partition.labels(params, rules))
    adapted = ftlab.maml.adapt(params, support, loss_fn=loss_fn, inner_lr=0.01, num_steps=5)
    result = ftlab.online.run(model, model.init(), stream, learner=ftlab.online.ogd(0.1))

Each name is the module where the code lives (``ftlab.lora`` is ``ftlab.peft.lora``), imported on
first use, so ``import ftlab`` stays cheap. The packages (``ftlab.core``, ``ftlab.peft``,
``ftlab.models``, ``ftlab.data``, ``ftlab.tasks``, ``ftlab.meta``, ``ftlab.pretrain``,
``ftlab.posttrain``) likewise
load their submodules on first use, and every module lists its public names in ``__all__``.
"""

import importlib

# short name -> the module it stands for
_MODULES = {
    "partition": "ftlab.core.partition",
    "train": "ftlab.core.train",
    "parallel": "ftlab.core.parallel",
    "checkpoint": "ftlab.core.checkpoint",
    "metrics": "ftlab.core.metrics",
    "lora": "ftlab.peft.lora",
    "qlora": "ftlab.peft.qlora",
    "dora": "ftlab.peft.dora",
    "ia3": "ftlab.peft.ia3",
    "adapters": "ftlab.peft.adapters",
    "prefix": "ftlab.peft.prefix",
    "prompt": "ftlab.peft.prompt",
    "reft": "ftlab.peft.reft",
    "maml": "ftlab.meta.maml",
    "reptile": "ftlab.meta.reptile",
    "meta": "ftlab.meta",
    "multitask": "ftlab.multitask",
    "online": "ftlab.online",
    "pretrain": "ftlab.pretrain",
    "generation": "ftlab.generation",
    "icl": "ftlab.icl",
    "nnx": "ftlab.nnx",
    "sites": "ftlab.core.sites",
    "tensorfile": "ftlab.core.tensorfile",
    "config_options": "ftlab.config_options",
    "testing": "ftlab.testing",
    "types": "ftlab.types",
    # the packages, for `ftlab.peft.lora` and the like
    "core": "ftlab.core",
    "data": "ftlab.data",
    "models": "ftlab.models",
    "peft": "ftlab.peft",
    "posttrain": "ftlab.posttrain",
    "tasks": "ftlab.tasks",
}

__all__ = sorted(_MODULES)


def __getattr__(name: str):
    if name in _MODULES:
        module = importlib.import_module(_MODULES[name])
        globals()[name] = module
        return module
    raise AttributeError(f"module 'ftlab' has no attribute {name!r}; modules: {', '.join(__all__)}")


def __dir__():
    return list(__all__)
