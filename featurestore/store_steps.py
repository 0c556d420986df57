"""A store client's training steps: one call per shard, all in flight, merged exactly.

:class:`StepProtocol` numbers this client's steps (shard 0's replies keep the count shared
by all clients), derives each step's noise seed, settles NCE's ``Z`` (the objective's, the
store's, or estimated on the first step from every shard's noise), sends one
:class:`~featurestore.shard_protocol.StepRequest` to every shard, and merges the partial
statistics of the replies (:func:`~featurestore.statistics.merge`) into the loss and the
gradient a :class:`~featurestore.MemoryBank` would give. When shard 0 says a snapshot is due,
the :class:`~featurestore.store_snapshots.SnapshotCoordinator` writes it off this path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable

import torch
from torch import Tensor

from featurestore import wire
from featurestore.bank import PendingStep, StepOutput
from featurestore.noise import NoiseSpec, step_seed
from featurestore.objectives import Objective
from featurestore.shard_protocol import (
    UNKNOWN_OBJECTIVE,
    StepControl,
    StepRequest,
    StoreConfig,
    unpack_stats,
)
from featurestore.statistics import estimate_z, merge
from featurestore.store_snapshots import SnapshotCoordinator
from featurestore.store_transport import ShardGroup
from featurestore.validation import check_step

logger = logging.getLogger(__name__)


def _compact(t: Tensor) -> Tensor:
    """``t`` itself if it owns exactly its storage, else a compact copy.

    Pickling a view sends its whole storage (e.g. all of ``randperm(N)[:B]``).
    """
    if (
        t.is_contiguous()
        and t.storage_offset() == 0
        and t.untyped_storage().nbytes() == t.numel() * t.element_size()
    ):
        return t
    return t.clone(memory_format=torch.contiguous_format)


class StepProtocol:
    """The steps of one client of the store behind ``group``.

    Args:
        group: the shard group.
        config: the store's configuration.
        client: mixed into the step seeds (0: the creator, seeds as ``MemoryBank``'s).
        z: NCE's ``Z`` as shard 0 reported it when the client connected.
        next_step: the store's step counter then.
        request_id: a new request id per call (shards apply a repeated id once).
        observe: records a step's seconds (metrics).
        snapshots: writes the automatic snapshots shard 0 asks for.
    """

    def __init__(
        self,
        group: ShardGroup,
        config: StoreConfig,
        client: int,
        z: float | None,
        next_step: int,
        request_id: Callable[[], str],
        observe: Callable[[str, float], None],
        snapshots: SnapshotCoordinator,
    ) -> None:
        self.group = group
        self.config = config
        self.client = client
        self._request_id = request_id
        self._observe = observe
        self._snapshots = snapshots
        self._lock = threading.Lock()
        self._z = z
        #: NCE with z_momentum: this client's last Z observation, sent with its next step.
        self._z_observation: float | None = None
        self._max_step = next_step - 1
        #: Objective keys each shard has been sent, and each objective's key.
        self._registered: list[set[str]] = [set() for _ in range(config.num_shards)]
        self._keys: dict[Objective, str] = {}

    @property
    def next_step(self) -> int:
        """The next step's number as this client knows it (no remote call)."""
        with self._lock:
            return self._max_step + 1

    @property
    def z(self) -> float | None:
        """NCE's Z as this client knows it."""
        with self._lock:
            return self._z

    def reset(self, step: int, z: float | None) -> None:
        """The store was loaded from a snapshot at ``step`` with ``z``."""
        with self._lock:
            self._z = z
            self._max_step = step - 1

    def start(
        self,
        feats: Tensor,
        ids: Tensor,
        objective: Objective,
        noise_ids: Tensor | None = None,
        seed: int | None = None,
    ) -> PendingStep:
        """Check the inputs, send the step to every shard, and return at once; the
        :class:`PendingStep`'s ``result()`` collects and merges the replies."""
        start = time.perf_counter()
        cfg = self.config
        out_device = feats.device if isinstance(feats, Tensor) else None
        feats, ids, noise_ids = check_step(feats, ids, objective, cfg.num_rows, cfg.dim, noise_ids)
        feats, ids = _compact(feats.cpu()), _compact(ids)
        if noise_ids is not None:
            noise_ids = _compact(noise_ids)
        with self._lock:  # reserve a step number: steps in flight draw different noise
            self._max_step += 1
            next_step, known_z = self._max_step, self._z
            observation, self._z_observation = self._z_observation, None
        spec = None
        if objective.sampled:
            spec = NoiseSpec(
                objective.num_negatives,
                objective.shared_noise,
                step_seed(cfg.seed, next_step, self.client) if seed is None else int(seed),
                noise_ids,
            )
        z = self._nce_z(objective, feats, ids, spec, known_z)
        key = self._register(objective)
        pieces = wire.reply_pieces(*feats.shape)
        message = StepRequest(
            pieces,
            self._request_id(),
            ids.numpy(),
            key,
            spec,
            z,
            next_step,
            known_z,
            observation,
        )
        args = (message, *self.group.wire_feats(feats.numpy()))
        calls = dict.fromkeys(range(cfg.num_shards), args)
        refs = self.group.submit_all("step", calls)
        self.group.transfer.shared.clear()

        def finish() -> StepOutput:
            replies = {s: self._reply(s, ref, calls[s], objective) for s, ref in refs.items()}
            parts = [unpack_stats(replies[s][0]) for s in range(cfg.num_shards)]
            control: StepControl = replies[0][1]
            with self._lock:
                self._max_step = max(self._max_step, control.step_count - 1)
                if control.z is not None:
                    self._z = control.z
            sample_loss, grad = merge(parts, feats, objective, z, cfg.num_rows)
            seen = objective.observe_z(parts, feats, cfg.num_rows)
            if seen is not None:
                # Fold the observation in now, as shard 0 will when the next step brings it:
                # this client's next step then uses the Z a MemoryBank would.
                with self._lock:
                    self._z_observation = seen
                    self._z = objective.next_z(self._z, seen)
            self._observe("step", time.perf_counter() - start)
            if control.snapshot_due:
                self._snapshots.start_auto(control.step_count)
            return StepOutput.merged(sample_loss, grad, z, out_device)

        return PendingStep(finish)

    def _register(self, objective: Objective, shards: list[int] | None = None) -> str:
        """The objective's key, after sending the objective to the shards that lack it (once
        per shard; again to a shard that restarted)."""
        key = self._keys.get(objective)
        if key is None:  # once per objective: steps only look the key up
            data = json.dumps(objective.to_dict(), sort_keys=True)
            key = self._keys[objective] = hashlib.sha1(data.encode()).hexdigest()[:16]
        with self._lock:
            if shards is None:
                todo = [s for s in range(self.config.num_shards) if key not in self._registered[s]]
            else:  # shards that said they do not know it
                todo = list(shards)
        if todo:
            data = objective.to_dict()
            self.group.call("register_objective", {s: (key, data) for s in todo})
            with self._lock:
                for s in todo:
                    self._registered[s].add(key)
        return key

    def _reply(self, shard: int, ref, args: tuple, objective: Objective):
        """One shard's step reply; a shard that restarted and forgot the objective gets it
        again and the same step (same request id) once more."""
        try:
            return self.group.await_reply(shard, "step", ref, args)
        except LookupError as err:
            if not str(err).startswith(UNKNOWN_OBJECTIVE):
                raise
        self._register(objective, [shard])
        return self.group.await_reply(shard, "step", self.group.submit(shard, "step", args), args)

    def _nce_z(
        self,
        objective: Objective,
        feats: Tensor,
        ids: Tensor,
        spec: NoiseSpec | None,
        store_z: float | None,
    ) -> float | None:
        """NCE's Z: the objective's, the store's, or estimated now from this step's noise."""
        if not objective.uses_z:
            return None
        if objective.z is not None:
            return float(objective.z)
        if store_z is not None:
            return store_z
        assert spec is not None
        cfg = self.config
        obj = objective.to_dict()
        parts = self.group.call(
            "expsum", dict.fromkeys(range(cfg.num_shards), (feats, ids, obj, spec))
        )
        s_pos = torch.empty(feats.shape[0])
        expsum = 0.0
        for total, pos_index, scores in parts.values():
            expsum += total
            s_pos[pos_index] = scores
        pairs = feats.shape[0] * (objective.num_negatives + 1)
        proposed = estimate_z(expsum, s_pos, cfg.num_rows, pairs)
        z = float(self.group.control("propose_z", proposed))
        with self._lock:
            self._z = z
        logger.info("store %r: NCE normalization constant Z = %.6g (first step)", cfg.name, z)
        return z


__all__ = ["StepProtocol"]
