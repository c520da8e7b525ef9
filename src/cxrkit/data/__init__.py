"""Datasets: adapters to a common manifest, decoding, the preprocessing cache and loaders."""
