"""Errors a user can fix: they are printed as one line (no traceback) by the step entry points."""


class UserError(Exception):
    """Bad flag, bad file or bad data: the message names what was wrong and what was expected."""


class DataError(UserError):
    """A data file or row that cannot be read; the message names the file (and row, where there is one)."""


class ConfigError(UserError):
    """Flags that do not fit together (batch sizes, GPU-only options on CPU, ...)."""


class NonFiniteError(UserError):
    """Training met NaN or infinite values --max_nonfinite_steps times in a row: the run stops before it exports
    a broken model (the message names the step and what was non-finite)."""
