"""The security tests use the DICOM node's fixtures (a node on a free port in this process)."""

from tests.dicom_node.conftest import small_study, start_node

__all__ = ["small_study", "start_node"]
