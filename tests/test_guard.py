"""The divergence watch on loss curves measured on CIFAR-10 and the built-in digits: the
fixed-Z NCE divergence warns, healthy runs (whose loss rises while the bank is still
random) do not."""

from __future__ import annotations

import pytest

from trainer.guard import DivergenceWatch, warm_epochs

# Epoch-mean losses of real runs (CIFAR-10 train 50k unless noted).
HEALTHY = {
    # the plain reference loop: exact softmax, small encoder, lr 0.03 step, 12 epochs
    "plain-softmax": [14.76, 15.26, 14.52, 14.1, 13.62, 12.38, 11.31, 10.7, 10.3, 10.09, 10.02,
                      9.98],
    # the trainer, same recipe
    "trainer-softmax": [14.68, 14.98, 14.32, 13.32, 12.6, 11.72, 10.79, 10.21, 9.88, 9.75,
                        9.66, 9.64],
    # the built-in digits (1,437 images), exact softmax: the loss rises 40 % as the bank fills
    "digits-3-epochs": [9.89, 13.68, 13.82],
}  # fmt: skip
# The default NCE (K 4096, Z fixed on the first batch) on CIFAR-10, from the issue report.
DIVERGING_NCE = [33.6, 66.0]


@pytest.mark.parametrize("name", sorted(HEALTHY))
def test_healthy_runs_do_not_warn(name):
    watch = DivergenceWatch("softmax")
    assert [watch.check(e + 1, v) for e, v in enumerate(HEALTHY[name])] == [None] * len(
        HEALTHY[name]
    )


def test_fixed_z_nce_divergence_warns_with_the_flags_to_change():
    watch = DivergenceWatch("nce", "fixed")
    assert watch.check(1, DIVERGING_NCE[0]) is None
    warning = watch.check(2, DIVERGING_NCE[1])
    assert warning is not None and "diverging" in warning and "--nce-z ema" in warning


def test_a_loss_rising_after_warm_up_warns_each_epoch():
    watch = DivergenceWatch("softmax", bank_momentum=0.5)
    assert warm_epochs(0.5) == 4
    losses = [9.0, 10.0, 9.5, 9.0, 8.0, 8.5, 9.4, 10.5, 12.0]
    warnings = [watch.check(e + 1, v) for e, v in enumerate(losses)]
    assert warnings[:6] == [None] * 6  # 8.5 is 6 % above the best: a wobble
    assert all(w is not None and "diverging" in w and "--lr" in w for w in warnings[6:])


def test_warm_up_follows_the_bank_momentum():
    assert warm_epochs(0.0) == 1 and warm_epochs(0.9) == 22 and warm_epochs(1.0) > 10**6
