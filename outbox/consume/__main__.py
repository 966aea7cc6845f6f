"""``python -m outbox.consume`` (see :mod:`outbox.consume.cli`)."""

import sys

from outbox.consume.cli import main

sys.exit(main())
