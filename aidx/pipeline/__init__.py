"""The automatic pipeline on top of the store: inference workers (:mod:`aidx.pipeline.worker`),
routes and priorities (:mod:`aidx.pipeline.routing`), and the ``/metrics`` and ``/healthz``
endpoint (:mod:`aidx.pipeline.metrics`). Imports :mod:`aidx.store` and the root of :mod:`aidx`,
never :mod:`aidx.cli`.
"""
