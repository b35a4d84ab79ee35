"""Errors raised by distillation methods; the CLI turns them into one-line messages."""


class MethodError(ValueError):
    """An unknown method name or an invalid hyper-parameter."""


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite; the run stops at once and records the step."""

    def __init__(self, step: int, epoch: int, terms: dict[str, float]):
        self.step, self.epoch, self.terms = step, epoch, terms
        bad = ", ".join(f"{k}={v}" for k, v in terms.items())
        super().__init__(f"non-finite loss at global step {step} (epoch {epoch}): {bad}")
