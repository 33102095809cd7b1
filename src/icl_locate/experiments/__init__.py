"""Experiments: typed settings in, results out; the only layer that wires model + task + engine + store."""
