"""Parameter-efficient fine-tuning methods as transformations of parameter pytrees.

``dense`` is the shared `nn.Dense` interception for dense-layer methods; ``lora`` is LoRA
(Hu et al. 2021, https://arxiv.org/abs/2106.09685); ``dora`` is weight-decomposed LoRA
(Liu et al. 2024, https://arxiv.org/abs/2402.09353); ``ia3`` is IA3's learned rescaling
(Liu et al. 2022, https://arxiv.org/abs/2205.05638).
"""

from ftlab.peft import dense, dora, ia3, lora

__all__ = ["dense", "dora", "ia3", "lora"]
