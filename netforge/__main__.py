"""``python -m netforge`` runs the CLI."""

import sys

from netforge.cli import main

sys.exit(main())
