"""The security tests use the DICOM node's fixtures (a node on a free port in this process), and
a shell's usual umask."""

import os
from collections.abc import Iterator

import pytest

from tests.dicom_node.conftest import small_study, start_node

__all__ = ["small_study", "start_node", "umask_022"]


@pytest.fixture
def umask_022() -> Iterator[None]:
    """The usual umask of a shell, which makes 0644 files and 0755 folders."""
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)
