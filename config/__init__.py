"""``mailrouter.example.toml``, every field documented: shipped as ``mailrouter.example_config``.

A user's own ``config/mailrouter.toml`` is never shipped (see setup.py and pyproject.toml).
"""
