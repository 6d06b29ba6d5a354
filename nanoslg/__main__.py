"""`python -m nanoslg ...` is the `nanoslg` command."""
import sys

from nanoslg.entrypoints.cli import main

sys.exit(main())
