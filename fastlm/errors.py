"""How the ``fastlm`` commands report failures the user can act on: one line on stderr and
exit status 1, never a traceback.

Bad input raises ``ValueError`` (DESIGN.md, "Bad input"), the file system ``OSError`` (a path
that cannot be written, a file that vanished), and the rest of fastlm's refusals derive from
:class:`FastlmError` (a run that diverged). Anything else is a bug in fastlm and keeps its
traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class FastlmError(Exception):
    """A refusal that is neither bad input nor a file system error (a diverged run)."""


REPORTED = (ValueError, OSError, FastlmError)


def report(prog: str, command: Callable[[], int]) -> int:
    """``command()``'s exit status; a reported error is printed as ``prog: message``."""
    try:
        return command()
    except REPORTED as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
