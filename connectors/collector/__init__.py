"""The Segment-compatible HTTP collector: browsers and apps → ``events.raw``.

:mod:`.protocol` maps Segment's HTTP Tracking API onto the raw event contract (pure functions),
:mod:`.sink` publishes to Kafka and waits for the acknowledgements, :mod:`.app` is the aiohttp server,
:mod:`.main` the command (``clickpulse collector``, ``python -m connectors.collector``). See
``docs/collector.md``.
"""
