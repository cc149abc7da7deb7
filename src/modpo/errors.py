"""Errors raised on bad user input: one line naming the file, row and field."""


class ModpoError(Exception):
    """Base class for errors the CLI reports as one line."""


class DataError(ModpoError, ValueError):
    """A problem in the user's data: names the file, the 1-based row and the field.

    Rows of an in-memory dataset are named as Python indexes them: `index` gives `train_dataset[37]`."""

    def __init__(self, file, row, field, message, index: int | None = None):
        self.file, self.row, self.field, self.index, self.message = str(file), row, field, index, message
        where = f"{self.file}[{index}]" if index is not None else self.file
        where += (f", row {row}" if row is not None else "") + (f", field '{field}'" if field else "")
        super().__init__(f"{where}: {message}")


class ConfigError(ModpoError, ValueError):
    """A problem in a configuration value: names the option (and the config file when known)."""


class WriteError(ModpoError):
    """A write that failed (a full disk, a read-only folder): names what was kept and how to continue."""
