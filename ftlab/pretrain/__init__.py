"""Pretraining for transfer: greedy layer-wise autoencoders and self-supervised pretext tasks."""

from ftlab.pretrain import layerwise, loop, network, ssl, transfer

__all__ = ["layerwise", "loop", "network", "ssl", "transfer"]
