"""What the package is called where it is installed from, and its version (one place for both:
``pyproject.toml`` reads the version from here, error messages name the distribution)."""

from __future__ import annotations

__all__ = ["DISTRIBUTION", "__version__"]

#: The name to ``pip install`` (the import name is ``outbox``; ``outbox`` on the package registry
#: is an unrelated project).
DISTRIBUTION = "sqlalchemy-outbox"
__version__ = "0.1.0"
