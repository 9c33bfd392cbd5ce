import sys

from .cli import main

if __name__ == "__main__":  # importing this module (tooling) must not run the CLI
    sys.exit(main())
