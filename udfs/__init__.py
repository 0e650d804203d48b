"""Pure record logic of clickpulse: validation, enrichment, identity, sessions, trigger rules, DLQ records.

Nothing in this package imports pyflink, Kafka, Redis or HTTP clients (``tests/unit/test_layers.py``
checks): the Flink jobs in ``jobs/`` and the adapters in ``connectors/`` call into it, and its tests
run without a JVM or services. Keyed logic is written as reducers over frozen state with time passed
in (:mod:`udfs.sessions`, :mod:`udfs.rules.evaluate`).
"""
