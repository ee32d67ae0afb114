"""Commands: train (see the README)."""
