"""aidx: an AI imaging diagnostic assistant (DICOM node, ONNX inference, review app).

This package is the application shell: the ``aidx`` command, configuration, logging and (with
later components) the store and job pipeline. It never imports torch or MONAI.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("aidx")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+source"
