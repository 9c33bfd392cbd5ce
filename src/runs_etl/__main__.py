import sys

from .cli import main

if __name__ == "__main__":  # a worker process re-imports this module; it must not re-run
    sys.exit(main())
