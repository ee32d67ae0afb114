"""Which packages the wheel holds; everything else about the build is in ``pyproject.toml``.

Three folders of the checkout are shipped as package data from where they are, each mapped onto a
subpackage (``data/`` is ``mailrouter.starter``, ``deploy/`` is ``mailrouter.service_templates``,
``config/`` is ``mailrouter.example_config``) and read with ``importlib.resources``, so an
installed wheel never reads the checkout. ``pyproject.toml`` can either discover packages or list
them, not both: this file discovers ``mailrouter``'s own subpackages (a new one needs no edit) and
adds the three mapped ones.
"""

from setuptools import find_packages, setup

MAPPED = {
    "mailrouter.starter": "data",
    "mailrouter.service_templates": "deploy",
    "mailrouter.example_config": "config",
}

setup(
    packages=[*find_packages(include=["mailrouter", "mailrouter.*"]), *MAPPED],
    package_dir=MAPPED,
)
