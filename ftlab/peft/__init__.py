"""Parameter-efficient fine-tuning methods as transformations of parameter pytrees.

``dense`` is the shared `nn.Dense` interception for dense-layer methods; ``lora`` is LoRA
(Hu et al. 2021, https://arxiv.org/abs/2106.09685).
"""

from ftlab.peft import dense, lora

__all__ = ["dense", "lora"]
