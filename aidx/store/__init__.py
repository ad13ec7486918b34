"""The store: the index of received instances, the study jobs, results and export outbox, the
review app's tables, and the schema versions (SQLAlchemy Core; SQLite or PostgreSQL).

:mod:`aidx.store.store` (the :class:`~aidx.store.store.Store`), :mod:`aidx.store.schema` (the
tables), :mod:`aidx.store.jobs` and :mod:`aidx.store.outbox` (the job queue and the outbox, mixed
into the store), :mod:`aidx.store.migrations` (schema versions). Imports only the root of
:mod:`aidx` (configuration, logs), never :mod:`aidx.pipeline` or :mod:`aidx.cli`.
"""
