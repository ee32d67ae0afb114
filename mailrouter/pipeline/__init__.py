"""One exactly-once round over the watched folder: batches, intake and copy detection, the
outbox (compose, send, retry) and filing. See :mod:`mailrouter.pipeline.round`."""
