"""Cluster launcher: config, up/down, bootstrap, autoscaler, local state."""
