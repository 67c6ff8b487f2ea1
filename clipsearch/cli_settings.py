"""The CLI's global options (`clipsearch --home ... --device ... COMMAND`), set once per invocation.

A module of their own so that command modules outside `cli.py` (training) read them without
importing `cli`, which imports them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class Settings:
    home: Path | None = None
    device: str = "auto"
    verbose: bool = False
    quiet: bool = False


settings = Settings()
