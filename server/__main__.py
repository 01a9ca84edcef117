"""`python -m server` is `llama-serve`."""

import sys

from server.cli import main

# Guarded: the engine process is spawned, and spawning imports the parent's main module.
if __name__ == "__main__":
    sys.exit(main())
