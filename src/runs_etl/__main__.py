from .cli import console

if __name__ == "__main__":  # importing this module (tooling) must not run the CLI
    console()
