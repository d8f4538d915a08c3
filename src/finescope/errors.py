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


class Terminated(BaseException):
    """SIGTERM during train, cv or demo (the CLI's handler raises it): under torchrun (train), whose agent sends it
    to every process of a run when one of them ends; in one process, a scheduler's pre-emption or time limit
    (SLURM), or a kill. Not an ``Exception``: no handler on the way may take it for an error of its own. Raised
    with a message where the library knows what its output holds, as :class:`Interrupted` is (the CLI prints
    ``finescope: stopped by SIGTERM <message>``)."""


SKIP_ADVICE = "; fix or remove the file, or set data.on_error=skip"  # ends the error of an unreadable image


def path_error_line(e: OSError) -> str:
    """The one line of an ``OSError`` about a file (a wrong path, a name too long): the system's words, the
    file, what to do."""
    return f"{e.strerror or e}: '{e.filename}'; check the path"
