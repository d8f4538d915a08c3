"""User-facing errors.

A :class:`FinescopeError` is raised for anything a user can fix (a wrong path, an unknown key, an unreadable
image). Its message names the file or key and says what to do; the CLI prints it as one line on stderr and
exits non-zero instead of showing a traceback. A :class:`FinescopeWarning` is printed the same way and the run
goes on.
"""


class FinescopeError(Exception):
    """An error caused by user input; the message says what was wrong and what to do."""


class FinescopeWarning(UserWarning):
    """Something a user should know that does not stop the run (a skipped image, an empty validation split); the
    CLI prints it as one line on stderr (``finescope: warning: ...``)."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C where the library knows what its output holds: the message says what was and was not written and
    what to do (the CLI prints ``finescope: interrupted <message>``)."""


SKIP_ADVICE = "; fix or remove the file, or set data.on_error=skip"  # ends the error of an unreadable image


def path_error_line(e: OSError) -> str:
    """The one line of an ``OSError`` about a file (a wrong path, a name too long): the system's words, the
    file, what to do."""
    return f"{e.strerror or e}: '{e.filename}'; check the path"
