"""``outbox.migrations.HEAD`` names the newest shipped revision, and a relay's start does not pay
for importing Alembic when the schema is at it."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import outbox.migrations


def test_head_constant_is_the_newest_revision_file() -> None:
    assert outbox.migrations.head() == outbox.migrations.HEAD


def test_mismatch_at_head_does_not_import_alembic(tmp_path: Path) -> None:
    code = textwrap.dedent(f"""
        import sys
        import sqlalchemy as sa
        import outbox, outbox.migrations as m
        engine = sa.create_engine("sqlite:///{tmp_path / 'db.sqlite'}")
        outbox.create_schema(engine)
        with engine.begin() as conn:
            conn.execute(m.version_table.insert().values(version_num=m.HEAD))
        assert m.mismatch(engine) is None
        print("alembic" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr
