"""aidx: an AI imaging diagnostic assistant (DICOM node, ONNX inference, review app).

This package is the application shell, by responsibility: :mod:`aidx.cli` (the ``aidx``
command), :mod:`aidx.pipeline` (workers, routing, metrics), :mod:`aidx.store` (tables, store, job
queue, outbox, migrations), and at the root configuration, logging, file permissions, deflate and
the demo study. Imports go one way: cli -> pipeline -> store -> root (docs/architecture.md). It
never imports torch or MONAI.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("aidx")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+source"
