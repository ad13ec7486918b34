"""DICOM networking: storage SCP, spool, study assembly, access control and TLS, export SCU."""
