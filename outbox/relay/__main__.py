"""``python -m outbox.relay``: the relay sidecar (see :mod:`outbox.relay.cli`)."""

from __future__ import annotations

import sys

from outbox.relay.cli import main

if __name__ == "__main__":
    sys.exit(main())
