"""User-facing errors: each one is reported as a single line and exit code 2."""


class FedKDError(Exception):
    """An error caused by the user's input (config, files, replies), not by a bug."""


class ConfigError(FedKDError):
    """A config value that is not allowed.

    The message always names the key, the value and what is allowed.
    """

    def __init__(self, key: str, value: object, allowed: str) -> None:
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={value!r} is not allowed: {allowed}")


class DataError(FedKDError):
    """Dataset files that are missing, unreadable or inconsistent with the config."""
