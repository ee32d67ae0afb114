"""The starter dataset, ``examples.jsonl``: shipped as the package ``mailrouter.starter``.

``mailrouter init`` and ``mailrouter demo`` read it with ``importlib.resources`` (see setup.py).
Runtime files a checkout may hold here (models/, state.db…) are not shipped.
"""
