"""Errors raised on bad user input: one line naming the file, row and field."""


class ModpoError(Exception):
    """Base class for errors the CLI reports as one line."""


class DataError(ModpoError, ValueError):
    """A problem in the user's data: names the file, the 1-based row and the field."""

    def __init__(self, file, row, field, message):
        self.file, self.row, self.field = str(file), row, field
        where = f"{self.file}" + (f", row {row}" if row is not None else "") + (f", field '{field}'" if field else "")
        super().__init__(f"{where}: {message}")


class ConfigError(ModpoError, ValueError):
    """A problem in a configuration value: names the option (and the config file when known)."""
