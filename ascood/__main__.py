"""``python -m ascood`` = the ``ascood`` console script."""
import sys

from .apps.main import main

sys.exit(main())
