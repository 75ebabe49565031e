"""The command line's own start-up."""

from __future__ import annotations

import subprocess
import sys

SERVER_SIDE = ("sqlalchemy", "psycopg", "alembic", "fastapi", "jsonschema", "ondeck.store.store")


def test_the_client_commands_start_without_the_server_side() -> None:
    """``ondeck run`` and the other commands that talk HTTP are what people type most: the
    store, the API and the schemas are imported only by the commands that use them, which
    halves the start-up (about 0.7 s instead of 1.3 s here)."""
    probe = f"import sys, ondeck.cli; print(sorted(set({SERVER_SIDE!r}) & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
