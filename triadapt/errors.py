"""Errors the user can fix: the runner prints them as one line and exits non-zero."""


class TriadaptError(Exception):
    """Base class of user-facing errors (bad config, bad data, impossible budget)."""


class ConfigError(TriadaptError, ValueError):
    pass


class DataError(TriadaptError):
    pass


class TrainingDiverged(TriadaptError):
    pass
