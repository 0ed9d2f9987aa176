"""``python -m ascood_kernels``: the self-check (see :mod:`ascood_kernels.doctor`)."""
import sys

from .doctor import main

sys.exit(main())
