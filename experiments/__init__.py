"""Runnable experiments that check what the influence scores mean (see experiments/README.md)."""
