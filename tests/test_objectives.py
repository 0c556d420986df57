"""The objectives as one module each behind one interface: the registry, the ``Z`` rules
of NCE in one place, no objective ladders elsewhere, and a new objective that is one class
the in-process bank runs without any other change."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from reference import unit

from featurestore import NCE, MemoryBank, Objective, SampledSoftmax, Softmax
from featurestore.objectives import REGISTRY
from featurestore.objectives.base import check_common

REPO = Path(__file__).resolve().parent.parent


def test_every_objective_is_registered_by_kind_and_round_trips():
    assert {"nce": NCE, "softmax": Softmax, "sampled_softmax": SampledSoftmax}.items() <= (
        REGISTRY.items()
    )
    for obj in (NCE(num_negatives=7, z_momentum=0.9), Softmax(0.2), SampledSoftmax(5)):
        assert Objective.from_dict(obj.to_dict()) == obj
    with pytest.raises(ValueError, match="unknown objective kind 'hinge'"):
        Objective.from_dict({"kind": "hinge"})


def test_the_running_z_is_one_formula():
    nce = NCE(num_negatives=4, z_momentum=0.9)
    assert nce.next_z(100.0, 200.0) == pytest.approx(0.9 * 100 + 0.1 * 200)
    assert nce.next_z(None, 200.0) is None  # not estimated yet
    assert nce.next_z(100.0, None) == 100.0
    assert nce.next_z(100.0, math.inf) == 100.0
    assert NCE(num_negatives=4).next_z(100.0, 200.0) == 100.0  # the paper's fixed Z
    assert Softmax().next_z(None, 1.0) is None and not Softmax().uses_z


def test_no_module_outside_the_objectives_asks_which_objective_it_holds():
    ladder = re.compile(r"isinstance\([^)]*\b(NCE|Softmax|SampledSoftmax)\b")
    found = [
        f"{path.relative_to(REPO)}:{n}"
        for pkg in ("featurestore", "trainer", "knn_service")
        for path in (REPO / pkg).rglob("*.py")
        if "objectives" not in path.parts
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if ladder.search(line)
    ]
    assert not found


@dataclass(frozen=True)
class Alignment(Objective):
    """A new objective in one class: pull each feature to its own row, ``-s_i`` (no noise)."""

    temperature: float = 0.1
    prox_lambda: float = 0.0
    kind: ClassVar[str] = "test-alignment"

    def __post_init__(self) -> None:
        check_common(self.temperature, self.prox_lambda)

    def shard_statistics(self, out, rows, lo, feats, noise, z, num_rows, memory_budget):
        pass  # the positives' rows are all it needs

    def merge_terms(self, parts, pos, s_pos, z, num_rows):
        return -s_pos, -pos / self.temperature


def test_a_new_objective_is_one_class_the_bank_runs():
    bank = MemoryBank(50, 8, seed=3)
    feats, ids = unit(4, 8, seed=1), torch.tensor([0, 7, 21, 49])
    before = bank.get(ids)
    out = bank.step(feats, ids, Alignment())
    expected = -((before * feats).sum(1) / 0.1).mean()
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(out.grad, -before / 0.1 / 4)
    assert Objective.from_dict(Alignment().to_dict()) == Alignment()
