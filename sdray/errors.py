"""Errors a user can fix. Entry points print them as one line and exit 2; anything else is a bug."""


class SdrayError(Exception):
    """Base class of user-facing errors: the message names the file, row or field at fault."""


class ConfigError(SdrayError):
    """A config file, key or value is wrong."""


class InputError(SdrayError):
    """An input path, column or data set is missing or unusable."""
