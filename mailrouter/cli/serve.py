"""Commands: serve (see the README)."""
