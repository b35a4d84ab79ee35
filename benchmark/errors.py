"""User-facing errors. The CLI prints these as a message, never a traceback, and exits with the
category's status (the table is in the README, section "Reliability")."""

from ..datasets.errors import DatasetError
from ..methods.errors import MethodError, NonFiniteLossError


class BenchmarkError(Exception):
    """A configuration, protocol, pair, checkpoint or results problem the user can fix."""

    exit_code = 2


class CheckpointProblem(BenchmarkError):
    """A teacher or resume checkpoint that is unreadable, altered, or made for something else."""

    exit_code = 5


class ResultsError(BenchmarkError):
    """The results folder cannot take this run's record (unwritable, finished, in use)."""

    exit_code = 6


USER_ERRORS: tuple[type[BaseException], ...] = (BenchmarkError, DatasetError, MethodError, NonFiniteLossError)

#: exit status of the CLI per error category; anything else in USER_ERRORS exits with 2
EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (NonFiniteLossError, 3),
    (DatasetError, 4),
    (CheckpointProblem, CheckpointProblem.exit_code),
    (ResultsError, ResultsError.exit_code),
)


def exit_code(exc: BaseException) -> int:
    return next((code for kind, code in EXIT_CODES if isinstance(exc, kind)), 2)
