"""User-facing errors.

A :class:`FinescopeError` is raised for anything a user can fix (a wrong path, an unknown key, an unreadable
image). Its message names the file or key and says what to do; the CLI prints it as one line on stderr and
exits non-zero instead of showing a traceback.
"""


class FinescopeError(Exception):
    """An error caused by user input; the message says what was wrong and what to do."""
