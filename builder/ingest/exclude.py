"""``--exclude``: glob patterns for documents under ``--docs`` that the bundle must not answer from (release notes,
changelogs, license texts, an ``old/`` folder), so the build engineer need not copy the folder to drop them.

Rules, as in ``.gitignore`` for the common cases:

* a pattern without ``/`` is matched against every part of the path under ``--docs``: ``release-*.html`` drops
  that file in any folder, ``archive`` drops every file under any folder called ``archive``;
* a pattern with ``/`` is matched against the whole relative POSIX path (``html/release-*.html``); a trailing ``/``
  only says the pattern names a folder (``old/``) and is otherwise ignored;
* matching is :func:`fnmatch.fnmatchcase` (``*``, ``?``, ``[abc]``), case-sensitive on every platform, so a recipe
  replays the same way everywhere. In a pattern with ``/``, ``*`` also matches across folders.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import PurePosixPath

from fieldpack.shared.errors import UsageError

#: How the ingest report words a file an ``--exclude`` pattern left out (``FileReport.reason`` starts with it).
EXCLUDED_REASON = "excluded by --exclude"


def excluded_reason(pattern: str) -> str:
    """The ingest report's reason for a file ``pattern`` left out: ``"excluded by --exclude 'PATTERN'"``."""
    return f"{EXCLUDED_REASON} {pattern!r}"


@dataclass(frozen=True)
class Excludes:
    """Compiled ``--exclude`` patterns (in the order given). Build with :meth:`parse`."""

    patterns: tuple[str, ...] = ()

    @classmethod
    def parse(cls, patterns: Iterable[str] | None) -> "Excludes":
        """Validate the patterns.

        Raises:
            UsageError: an empty pattern, an absolute path, or one with a ``..`` part (it could never match a path
                under ``--docs``); the message names the pattern and the fix.
        """
        out: list[str] = []
        for raw in patterns or ():
            p = str(raw).strip()
            if not p or p == "/":
                raise UsageError(f"--exclude {raw!r} is empty",
                                 hint="give a glob such as 'release-*.html' or a folder such as 'old/'")
            if p.startswith("/") or ".." in PurePosixPath(p).parts or "\\" in p:
                raise UsageError(f"--exclude {raw!r} is not a path under --docs",
                                 hint="give it relative to the docs folder, with '/', e.g. 'html/release-*.html'")
            out.append(p)
        return cls(tuple(out))

    def match(self, rel: str) -> str | None:
        """The first pattern that excludes ``rel`` (a relative POSIX path under ``--docs``), else None."""
        return next((p for p in self.patterns if _matches(p, rel)), None)

    def unused(self, paths: Sequence[str]) -> list[str]:
        """The patterns that match none of ``paths`` (most likely a typo: the build says so)."""
        return [p for p in self.patterns if not any(_matches(p, rel) for rel in paths)]

    def __bool__(self) -> bool:
        return bool(self.patterns)


def _matches(pattern: str, rel: str) -> bool:
    """Whether one ``--exclude`` pattern leaves out ``rel`` (rules in the module docstring)."""
    parts = PurePosixPath(rel).parts
    pat = pattern.rstrip("/")
    if "/" in pat:
        return fnmatchcase(rel, pat) or any(fnmatchcase("/".join(parts[:i]), pat) for i in range(1, len(parts)))
    return any(fnmatchcase(part, pat) for part in parts)
