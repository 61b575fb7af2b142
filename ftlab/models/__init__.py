"""Flax models ftlab ships, and what they share. Submodules load on first use::

    from ftlab.models import bert, llama

- ``bert``: a BERT-style encoder (all-MiniLM-L6-v2) and classifier.
- ``llama``: a Llama-style decoder (SmolLM2) with a KV cache.
- ``attention``: scaled dot-product attention with a choice of kernel.
- ``dots``: matrix products summed in float32 and differentiated in the operands' dtype.
- ``hooks``: the structural hook points the models share.
- ``rnn``: a GRU/LSTM language model whose cell kernels are plain Dense leaves.
- ``gcn``: graph convolutional networks (Kipf & Welling), dense or sparse propagation.
- ``diffusion``: a class-conditional flow-matching U-Net of `nn.Conv` blocks and its sampler.
"""

from ftlab import _lazy

_SUBMODULES = (
    "attention",
    "bert",
    "diffusion",
    "dots",
    "gcn",
    "hooks",
    "llama",
    "rnn",
)

__getattr__, __dir__, __all__ = _lazy.attach(__name__, _SUBMODULES)
