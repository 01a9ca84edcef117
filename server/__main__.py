"""`python -m server` is `llama-serve`."""

import sys

from server.cli import main

sys.exit(main())
