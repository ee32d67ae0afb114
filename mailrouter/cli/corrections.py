"""Commands: corrections (see the README)."""
