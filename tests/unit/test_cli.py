"""The command line's own start-up."""

from __future__ import annotations

import os
import subprocess
import sys

SERVER_SIDE = ("sqlalchemy", "psycopg", "alembic", "fastapi", "jsonschema", "ondeck.store.store")


def test_the_client_commands_start_without_the_server_side() -> None:
    """``ondeck run`` and the other commands that talk HTTP are what people type most: the
    store, the API and the schemas are imported only by the commands that use them, which
    halves the start-up (about 0.7 s instead of 1.5 s here)."""
    probe = (
        "import sys, ondeck.cli, ondeck.settings; ondeck.settings.Settings(); "
        f"print(sorted(set({SERVER_SIDE!r}) & set(sys.modules)))"
    )
    defaults = {key: value for key, value in os.environ.items() if not key.startswith("ONDECK_")}
    command = [sys.executable, "-c", probe]
    result = subprocess.run(command, capture_output=True, text=True, env=defaults, check=True)
    assert result.stdout.strip() == "[]"
