"""``python -m aidx`` runs the ``aidx`` command."""

from aidx.cli import main

raise SystemExit(main())
