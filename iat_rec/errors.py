"""User-facing errors: the command line prints one line and exits non-zero."""


class IatError(Exception):
    """An error caused by the user's input or artifacts, reported as one clear line."""
