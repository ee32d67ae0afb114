"""Commands: classify (see the README)."""
