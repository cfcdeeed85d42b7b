"""Errors a user can fix: they are printed as one line (no traceback) by the step entry points."""


class UserError(Exception):
    """Bad flag, bad file or bad data: the message names what was wrong and what was expected."""
    # Raised alike on every rank (flags, collective checks): rank 0's line says it all. Otherwise every rank
    # that raises prints it, since a data or file error may happen on one rank alone.
    same_on_every_rank = False


class DataError(UserError):
    """A data file or row that cannot be read; the message names the file (and row, where there is one)."""


class ConfigError(UserError):
    """Flags that do not fit together (batch sizes, GPU-only options on CPU, ...)."""
    same_on_every_rank = True


class NonFiniteError(UserError):
    """Training met NaN or infinite values --max_nonfinite_steps times in a row: the run stops before it exports
    a broken model (the message names the step and what was non-finite)."""
    same_on_every_rank = True  # decided together (any_rank)
