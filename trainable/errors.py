"""Errors a user can fix: the CLI prints their message on one line and exits with code 2."""


class CxrtuneError(Exception):
    """Base class for input errors (bad data, bad space file, unknown backbone, missing weights)."""


class DataError(CxrtuneError, ValueError):
    """The data set breaks a rule: the message names the file, row or field and the rule."""


class ModelError(CxrtuneError, ValueError):
    """An exported model directory is missing, partial or corrupt: the message names the file."""
