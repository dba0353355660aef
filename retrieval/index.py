"""Open a SQLite database with the sqlite-vec extension loaded, through apsw.

The standard library's ``sqlite3`` cannot load extensions on every Python build, so fieldpack uses apsw for
the bundle index (``vec0`` virtual tables: https://alexgarcia.xyz/sqlite-vec/). apsw's errors are translated
into :mod:`shared.errors` here, at this one boundary.
"""

from __future__ import annotations

import logging
from pathlib import Path

import apsw

from fieldpack.shared.errors import OutputNotWritableError, RuntimeLoadError

log = logging.getLogger(__name__)

#: Exceptions a caller of :func:`connect`'s connection may want to translate (apsw's base class).
SQLiteError = apsw.Error


def connect(path: Path, *, readonly: bool) -> apsw.Connection:
    """Open ``path`` and load sqlite-vec into the connection.

    Args:
        path: the database file. With ``readonly=True`` it must exist; with ``readonly=False`` it is created
            when missing (its folder must exist).
        readonly: open with ``SQLITE_OPEN_READONLY`` (the device's view of an installed bundle index).

    Returns:
        An ``apsw.Connection`` with the ``vec0`` module and ``vec_*`` functions available, extension loading
        switched off again afterwards.

    Raises:
        RuntimeLoadError: read-only open of a missing or non-SQLite file, or sqlite-vec cannot be loaded.
        OutputNotWritableError: a writable open fails (missing folder, permissions).
    """
    path = Path(path)
    if readonly and not path.is_file():
        raise RuntimeLoadError(
            f"index database {path} does not exist", hint="reinstall the bundle, or check the slot path"
        )
    flags = apsw.SQLITE_OPEN_READONLY if readonly else apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE
    try:
        conn = apsw.Connection(str(path), flags=flags)
        # Touch the schema so a file that is not a database fails here rather than on first query.
        conn.execute("SELECT count(*) FROM sqlite_schema").fetchall()
    except apsw.Error as exc:
        if readonly:
            raise RuntimeLoadError(
                f"cannot open index database {path}: {exc}",
                hint="the file is damaged or not a fieldpack index; reinstall or roll back the bundle",
            ) from exc
        raise OutputNotWritableError(
            f"cannot create or open database {path}: {exc}",
            hint="check that the folder exists and is writable, and the file is not another format",
        ) from exc
    _load_sqlite_vec(conn, path)
    return conn


def _load_sqlite_vec(conn: apsw.Connection, path: Path) -> None:
    try:
        import sqlite_vec
    except ImportError as exc:
        conn.close()
        raise RuntimeLoadError(
            "the sqlite-vec package is not installed", hint="pip install 'fieldpack[device]' (sqlite-vec)"
        ) from exc
    try:
        conn.enable_load_extension(True)
        conn.load_extension(sqlite_vec.loadable_path())
    except apsw.Error as exc:
        conn.close()
        raise RuntimeLoadError(
            f"cannot load the sqlite-vec extension for {path}: {exc}",
            hint="reinstall sqlite-vec for this platform (pip install --force-reinstall sqlite-vec)",
        ) from exc
    finally:
        try:
            conn.enable_load_extension(False)
        except apsw.Error:  # connection already closed above
            pass
    log.debug("opened %s with sqlite-vec %s", path, conn.execute("SELECT vec_version()").fetchone()[0])
