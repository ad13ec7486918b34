"""Exit codes of the `aidx` command."""

EXIT_OK = 0
EXIT_FAILED = 1  # the operation ran and failed (peer refused, files not stored)
EXIT_USAGE = 2  # bad configuration or arguments: the message says what to change
