"""``python -m ascood`` = the ``ascood`` console script."""
import sys

try:  # Ctrl-C while the command's own modules load: the same one line as main() prints
    from .apps.main import main
except KeyboardInterrupt:
    print("ascood: interrupted", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
