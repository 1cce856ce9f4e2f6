"""`python -m mtp_engine ...` is the `mtp` command."""
import sys

from .cli import main

sys.exit(main())
