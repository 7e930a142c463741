"""Experiment configs: each module's `get_config(arg=None)` returns an ml_collections.ConfigDict."""
