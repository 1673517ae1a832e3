"""A Caddy of its own for a test or a benchmark: its data (the internal CA, certificates) and config
under ``home`` instead of the user's, so runs never share or touch a real Caddy's state."""
from __future__ import annotations

import os
from pathlib import Path


def caddy_env(home: Path) -> dict:
    return {**os.environ, "HOME": str(home), "XDG_DATA_HOME": str(home / "data"),
            "XDG_CONFIG_HOME": str(home / "config")}


def caddy_root_ca(home: Path) -> Path:
    """The root certificate of the internal CA (``tls internal``) of a Caddy run with ``caddy_env(home)``."""
    return home / "data" / "caddy" / "pki" / "authorities" / "local" / "root.crt"
