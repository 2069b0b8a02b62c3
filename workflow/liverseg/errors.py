"""Expected, user-facing failures.

A CaseError is bad input that a user can fix (unreadable file, wrong shape...).  The CLI turns it into one
line naming the case and exits non-zero; anything else is a bug and keeps its traceback.
"""


class CaseError(Exception):
    def __init__(self, case: str, message: str):
        super().__init__(f"case {case}: {message}")
        self.case = case
        self.message = message


class ConfigError(ValueError):
    """A configuration value or command-line argument that is wrong: the message names the key or option."""


class ModelFileError(Exception):
    """A model file that is missing, corrupt, unsafe to unpickle, or does not fit the data it is applied to."""
