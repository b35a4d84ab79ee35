"""Errors raised by the data layer; the CLI prints them as one actionable line."""


class DatasetError(Exception):
    """Base class for data problems the user can fix."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """The dataset is not in any of the places searched. The message lists them and how to get it."""

    def __init__(self, name: str, searched: list[str], how_to_get: list[str]):
        self.searched, self.how_to_get = searched, how_to_get
        lines = [f"dataset {name!r} not found. Searched:"]
        lines += [f"  - {place}" for place in searched]
        lines += ["Get it by one of:"] + [f"  - {way}" for way in how_to_get]
        super().__init__("\n".join(lines))


class CorruptDatasetError(DatasetError, ValueError):
    """A dataset file exists but is truncated or not in the expected format."""


class UnknownDatasetError(DatasetError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])
