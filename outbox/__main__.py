"""``python -m outbox``: the operator's CLI (see :mod:`outbox.cli`)."""

from __future__ import annotations

import sys

from outbox.cli import main

if __name__ == "__main__":
    sys.exit(main())
