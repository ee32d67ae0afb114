"""Corrections by reply: tokens, reading replies, authentication and confirmation, applying,
the links of every forward and the spam digest. See :mod:`mailrouter.corrections.handler`."""
