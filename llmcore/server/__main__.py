"""``python -m llmcore.server serve|batch ...`` (the same commands as ``llmcore serve|batch``)."""

import sys

from llmcore.server.cli import main

if __name__ == "__main__":
    sys.exit(main())
