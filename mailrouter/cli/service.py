"""Commands: service (see the README)."""
