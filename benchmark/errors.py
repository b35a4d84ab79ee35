"""User-facing errors. The CLI prints these as a message, never a traceback."""

from ..datasets.errors import DatasetError
from ..methods.errors import MethodError, NonFiniteLossError


class BenchmarkError(Exception):
    """A configuration, protocol, pair, checkpoint or results problem the user can fix."""


USER_ERRORS: tuple[type[BaseException], ...] = (BenchmarkError, DatasetError, MethodError, NonFiniteLossError)
