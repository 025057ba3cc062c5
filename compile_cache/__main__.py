"""``python -m compile_cache [cache] ls|verify|prune|rm`` without the llmcore CLI."""

import logging
import sys

from .cli import main

logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
sys.exit(main())
