"""mailrouter: routes a company's contact@ mailbox to its departments with a local LLM."""

__version__ = "0.1.0"
