"""Parameter-efficient fine-tuning methods as transformations of parameter pytrees.

Each module offers the same verbs: ``init`` (add the method's leaves), ``rules`` (its partition),
``adapter`` (its leaves alone) and, where the method allows, ``merge``/``unmerge``. Submodules
load on first use::

    from ftlab.peft import lora

- ``dense``: the shared interception of linear layers behind the dense-layer methods.
- ``lora``: LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685).
- ``dora``: weight-decomposed LoRA (Liu et al. 2024, https://arxiv.org/abs/2402.09353).
- ``ia3``: IA3's learned rescaling (Liu et al. 2022, https://arxiv.org/abs/2205.05638).
- ``adapters``: bottleneck adapters (Houlsby et al. 2019, https://arxiv.org/abs/1902.00751).
- ``prefix``: prefix tuning (Li & Liang 2021, https://arxiv.org/abs/2101.00190).
- ``prompt``: prompt tuning (Lester et al. 2021, https://arxiv.org/abs/2104.08691).
- ``qlora``: LoRA over a frozen base kept in 4-bit Q4_1 blocks (Dettmers et al. 2023,
  https://arxiv.org/abs/2305.14314).
- ``reft``: LoReFT (Wu et al. 2024, https://arxiv.org/abs/2404.03592).
"""

from ftlab import _lazy

_SUBMODULES = ("adapters", "dense", "dora", "ia3", "lora", "prefix", "prompt", "qlora", "reft")

__getattr__, __dir__, __all__ = _lazy.attach(__name__, _SUBMODULES)
