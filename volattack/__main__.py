"""``python -m volattack`` runs the command line."""

import sys

from volattack.cli import main

sys.exit(main())
