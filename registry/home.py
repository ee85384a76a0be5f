"""Where the catalog lives.

The catalog is one SQLite file, ``catalog.db``, in a folder chosen in this order: the ``home``
argument (the CLI's ``--home``), ``$LORAREG_HOME``, ``$XDG_DATA_HOME/lorareg``,
``~/.local/share/lorareg``. Nothing else is stored there; downloaded Hub files stay in the
Hugging Face cache.
"""

from __future__ import annotations

import os
from pathlib import Path

DATABASE_NAME = "catalog.db"


def catalog_home(home: str | os.PathLike | None = None) -> Path:
    """The catalog folder: ``home`` if given, else ``$LORAREG_HOME``, else the per-user data folder."""
    if home:
        return Path(home).expanduser()
    if os.environ.get("LORAREG_HOME"):
        return Path(os.environ["LORAREG_HOME"]).expanduser()
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(data) / "lorareg"


def catalog_path(home: str | os.PathLike | None = None) -> Path:
    """The catalog database file inside :func:`catalog_home`."""
    return catalog_home(home) / DATABASE_NAME
