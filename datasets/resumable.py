"""A training DataLoader that resumes mid-epoch: its checkpointed state is (epoch, batches done).

Lightning stores `state_dict()` in every checkpoint and calls `load_state_dict()` on resume (it
treats loaders with both methods as resumable). The count of batches done comes from a callable the
DataModule passes (the trainer's batch progress), not from this loader's own iteration, which runs
ahead by Lightning's prefetch. Batches are skipped at the index level, before any image is loaded
or augmented, so a resume costs no data loading; because the order is a function of (seed, epoch)
the remaining batches are exactly those an uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from torch.utils.data import DataLoader


class _SkipFirstBatches:
    """Wraps a batch sampler; on iteration, drops the batches the loader was told were already trained on.

    The decision is taken lazily, at the first batch drawn, when the sampler's epoch is set and
    any checkpoint has been loaded (Lightning creates the iterator earlier than both).
    """

    def __init__(self, batch_sampler: Any, loader: ResumableLoader):
        self.batch_sampler, self.loader = batch_sampler, loader

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[Any]:
        state, self.loader._to_skip = self.loader._to_skip, None  # applies to one iteration only
        skip = state["batches"] if state and self.loader._epoch() == state["epoch"] else 0
        for i, batch in enumerate(self.batch_sampler):
            if i >= skip:
                yield batch


class ResumableLoader(DataLoader):
    def __init__(self, *args: Any, progress: Callable[[], int] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.progress = progress
        self._to_skip: dict[str, int] | None = None

    def _epoch(self) -> int:
        return int(getattr(getattr(self.batch_sampler, "sampler", None), "epoch", 0))

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch(), "batches": int(self.progress()) if self.progress else 0}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._to_skip = {"epoch": int(state_dict["epoch"]), "batches": int(state_dict["batches"])}

    @property
    def _index_sampler(self) -> Any:
        return _SkipFirstBatches(super()._index_sampler, self)
