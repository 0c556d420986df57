"""Runs that go wrong say so: a non-finite step stops the run; a rising loss warns.

- :class:`TrainingStoppedError`: raised by the worker loop when the encoder's features or the
  loss stop being finite. The loop records it in ``metrics.jsonl`` (``"error"``), the last
  checkpoint stays as it is, and the launcher ends the run with one line and exit code 1
  (not a retry: a restart from the same checkpoint would diverge the same way).
- :class:`DivergenceWatch`: fed the epoch-mean loss, it returns one warning line (with the
  word ``diverging``, the likely cause and the flags to change) for each epoch in which
  the loss has risen clearly above the lowest it reached. A healthy run's loss *rises*
  while the bank still holds its random initial rows (they score near 0, so the loss
  starts near ``ln N``; learned rows score their neighbours higher): with bank momentum
  ``m`` a fraction ``m^e`` of each row is still random after ``e`` epochs. So during those
  first :func:`warm_epochs` only a jump to ``JUMP`` times the best loss counts (the fixed-Z
  NCE divergence doubles it); afterwards a rise of ``RISE_MARGIN`` over the best epoch
  since warm-up counts when it lasts ``RISING_EPOCHS`` epochs in a row, or twice the
  margin at once.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field


class TrainingStoppedError(RuntimeError):
    """The run cannot continue (non-finite features or loss); the message says why.

    Attributes:
        epoch: the epoch (1-based) in which it stopped.
        step: optimizer steps completed when it stopped.
    """

    def __init__(self, message: str, epoch: int, step: int) -> None:
        super().__init__(message)
        self.epoch = epoch
        self.step = step


#: After warm-up: a loss this far above the best epoch, relative to it, counts as
#: diverging ...
RISE_MARGIN = 0.15
#: ... once it has risen for this many epochs in a row (or at once by twice the margin).
RISING_EPOCHS = 2
#: During warm-up: this many times the best loss so far counts as diverging.
JUMP = 1.75
#: The bank counts as warm once less than this fraction of its rows is still random.
RANDOM_LEFT = 0.1


def warm_epochs(bank_momentum: float) -> int:
    """Epochs until at most :data:`RANDOM_LEFT` of each bank row is its random start
    (``m^e <= 0.1``): 4 for the default ``m = 0.5``."""
    if bank_momentum <= 0:
        return 1
    if bank_momentum >= 1:
        return 1 << 30  # a frozen bank never warms up: only jumps count
    return max(1, math.ceil(math.log(RANDOM_LEFT) / math.log(bank_momentum)))


@dataclass
class DivergenceWatch:
    """Watch epoch losses; :meth:`check` returns a warning line or None.

    Attributes:
        objective: the objective's kind (``nce``, ``softmax``, ``sampled_softmax``).
        z_mode: NCE's Z handling (``fixed`` or ``ema``), for the advice.
        bank_momentum: the bank's momentum ``m`` (sets the warm-up, :func:`warm_epochs`).
    """

    objective: str
    z_mode: str = "fixed"
    bank_momentum: float = 0.5
    losses: dict[int, float] = field(default_factory=dict)

    def check(self, epoch: int, loss: float) -> str | None:
        """Record epoch ``epoch``'s (1-based) mean loss; a ``diverging`` warning when it is
        rising (see the module docstring)."""
        if not math.isfinite(loss):
            return None  # the loop stops on non-finite values itself
        previous = dict(self.losses)
        self.losses[epoch] = loss
        if not previous:
            return None
        warm = warm_epochs(self.bank_momentum)
        settled = [v for e, v in previous.items() if e >= warm]
        if epoch <= warm or not settled:
            best = min(previous.values())
            if loss <= JUMP * best:
                return None
        else:
            best = min(settled)
            rise = (loss - best) / max(abs(best), 1e-12)
            recent = [v for e, v in sorted(previous.items()) if e >= warm][-RISING_EPOCHS:]
            recent.append(loss)
            rising = len(recent) > RISING_EPOCHS and all(
                b > a for a, b in itertools.pairwise(recent)
            )
            if not (rise > 2 * RISE_MARGIN or (rise > RISE_MARGIN and rising)):
                return None
        rise = (loss - best) / max(abs(best), 1e-12)
        return (
            f"loss diverging at epoch {epoch}: {loss:.4g}, {100 * rise:.0f}% above the best "
            f"epoch so far ({best:.4g}); {self._advice()}"
        )

    def _advice(self) -> str:
        if self.objective == "nce" and self.z_mode == "fixed":
            return (
                "NCE with Z fixed from the first batch drifts as the features change: use "
                "--nce-z ema, or --nce-k 0 (the exact softmax), or a lower --lr"
            )
        if self.objective == "nce":
            return "lower --lr, raise --nce-t, or use --nce-k 0 (the exact softmax)"
        return "lower --lr (or add --warmup-epochs), or raise --nce-t"


__all__ = ["DivergenceWatch", "TrainingStoppedError"]
