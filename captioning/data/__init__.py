"""Datasets: the synthetic generator, Karpathy-format loaders, caption preparation, images."""
