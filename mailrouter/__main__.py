"""``python -m mailrouter`` is the ``mailrouter`` command."""

from .cli import main

main()
