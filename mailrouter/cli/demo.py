"""Commands: demo (see the README)."""
