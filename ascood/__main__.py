"""``python -m ascood`` = the ``ascood`` console script."""
import sys

from .cli import main

sys.exit(main())
