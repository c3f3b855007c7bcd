"""CLI: `python -m parlm.ablate` (see parlm/ablate/__init__.py)."""
import sys

from parlm.ablate.cli import main

sys.exit(main())
