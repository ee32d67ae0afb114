"""The launchd and systemd templates: shipped as the package ``mailrouter.service_templates``.

``mailrouter service install`` reads them with ``importlib.resources`` (see setup.py).
"""
