"""Commands: dataset (see the README)."""
