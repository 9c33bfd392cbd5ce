import sys

from .cli import run

if __name__ == "__main__":  # importing this module (tooling) must not run the CLI
    sys.exit(run())
