"""Errors that mean "the input is wrong", reported as one line with exit status 2."""


class UserError(Exception):
    """Bad input from the user: a file, key, layer or op at fault, and what to do."""


class ConfigError(UserError):
    """A pipeline or device file is missing, malformed, or holds a bad key or value."""
