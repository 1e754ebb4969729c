"""attrdist's own error type: one clear line for the user, never a traceback.

Raise `AttrdistError("path/to/file: what is wrong; how to fix it")` for anything a user can
fix (bad config, missing data, corrupt input). Entry points catch it, print
`attrdist: error: <message>` on stderr and exit with status 2.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager


class AttrdistError(Exception):
    """A user-facing error. Its message is a single line naming the file and the fix."""

    exit_code = 2


@contextmanager
def user_errors(interrupted: str | None = None):
    """Turn AttrdistError into one line on stderr and exit status 2 (for entry points). With `interrupted`
    (what happens on a re-run), Ctrl-C too: that line instead of a traceback, and exit status 130."""
    try:
        yield
    except AttrdistError as e:
        print(f"attrdist: error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(e.exit_code) from None
    except KeyboardInterrupt:
        if interrupted is None:
            raise
        print(f"attrdist: interrupted; {interrupted}", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
