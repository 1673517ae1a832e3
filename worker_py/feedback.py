"""Error feedback for lossy upload codecs (EF-SGD: Seide et al. 2014; Karimireddy et al. 2019).

A worker that uploads its delta ``d`` with a lossy codec ``C`` (fp16, int8, topk) keeps what the
codec dropped and adds it to its next delta: it sends ``C(d + r)`` and keeps
``r = (d + r) - decode(C(d + r))``. Over many units the sum of what arrived tracks the sum of the
true deltas to within the last residual (for int8: half a quantum of the last upload per element),
and top-k eventually sends every coordinate that keeps moving.

``feedback_step`` is the arithmetic (pure; float32 throughout, as worker_web/feedback.js does it,
so both give the same bytes). ``ErrorFeedback`` is the state one worker keeps: one residual per
tensor (bounded memory: the model's size in float32), reset when the job or the tensors' names
and shapes change, and changed only when the coordinator accepted the result that carried it
(``commit``); a unit that failed, was handed back, refused or superseded leaves it as it was
(``discard``), since what that upload carried was not folded.

When it is used (the coordinator decides per unit, ``WorkUnit.error_feedback``; docs/protocol.md):
only for units that say so, which the coordinator gives only to a worker that asked for them
(``UnitRequest.error_feedback``) and only when replicated checks are off: a replica and the
coordinator's own recomputation of a unit must get the same delta as the original, and a residual
from earlier units would make honest results disagree (coordinator/trust.py). Never for fp32
(nothing is lost). A unit without it is encoded as ``C(d)`` and leaves the residual untouched.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from contract.codecs import Codec, decode_delta, encode_delta, get_codec
from contract.errors import ContractError, Said

Arrays = Mapping[str, np.ndarray]


def lossless(codec: Codec) -> bool:
    """Whether ``codec`` sends every value exactly (fp32): error feedback has nothing to carry."""
    return codec.id == "fp32"


def feedback_step(codec: Codec, delta: Arrays, residual: Arrays | None) -> tuple[bytes, dict[str, np.ndarray]]:
    """(``C(d + r)`` as a CTD1 container, the new residual ``(d + r) - decode(C(d + r))``).

    ``residual``: name -> float32 array of the same shape as the delta's tensor (a missing name
    counts as zeros), or None for none. For a lossless codec: ``C(d)`` and the residual unchanged.
    Everything is float32 (d + r and the difference rounded to float32, as JavaScript's Float32Array).
    """
    residual = residual or {}
    if lossless(codec):
        return encode_delta(codec, delta), {k: np.asarray(v, np.float32) for k, v in residual.items()}
    corrected = {}
    for name, value in delta.items():
        d = np.asarray(value)
        if d.dtype.kind != "f":
            raise ContractError(f"delta[{name}]", "a floating-point array", Said(str(d.dtype)))
        d = d.astype(np.float32, copy=False)
        r = residual.get(name)
        if r is not None and np.shape(r) != d.shape:
            raise ContractError(f"residual[{name}]", f"shape {list(d.shape)} (the delta's)", list(np.shape(r)))
        corrected[name] = d if r is None else d + np.asarray(r, np.float32)
    data = encode_delta(codec, corrected)
    sent = decode_delta(data)
    return data, {name: corrected[name] - sent[name] for name in corrected}


class ErrorFeedback:
    """One worker's residual between units: ``encode`` a unit's delta, then ``commit`` or ``discard``.

    At most one encoded unit is pending (a worker computes and submits one unit at a time); a newer
    ``encode`` replaces it. Memory: the residual and at most one pending residual, each the model's
    size in float32.
    """

    def __init__(self) -> None:
        self.job: str | None = None
        self.residual: dict[str, np.ndarray] = {}
        self._pending: tuple[str, str, dict[str, np.ndarray]] | None = None   # (job, unit id, new residual)

    def _shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: r.shape for name, r in self.residual.items()}

    def encode(self, job: str, unit_id: str, codec: Codec | str, delta: Arrays, use: bool = True) -> bytes:
        """The container to upload for this unit's ``delta``: ``C(d + r)`` when ``use`` (the unit says
        so) and the codec is lossy, else ``C(d)``. The new residual waits for ``commit(unit_id)``. A
        job or tensors (names, shapes) other than the residual's start from a zero residual."""
        codec = get_codec(codec) if isinstance(codec, str) else codec
        if not use or lossless(codec):
            self._pending = None
            return encode_delta(codec, delta)
        shapes = {name: tuple(np.shape(v)) for name, v in delta.items()}
        same = job == self.job and list(shapes.items()) == list(self._shapes().items())   # names in order, shapes
        current = self.residual if same else None
        data, residual = feedback_step(codec, delta, current)
        self._pending = (job, unit_id, residual)
        return data

    def commit(self, unit_id: str) -> bool:
        """The coordinator accepted ``unit_id``'s result: its new residual is kept. False if none was pending."""
        if self._pending is None or self._pending[1] != unit_id:
            return False
        self.job, _, self.residual = self._pending
        self._pending = None
        return True

    def discard(self, unit_id: str) -> None:
        """``unit_id``'s result was not taken (failed, refused, superseded, undelivered): keep the old residual."""
        if self._pending is not None and self._pending[1] == unit_id:
            self._pending = None

    def reset(self) -> None:
        self.job, self.residual, self._pending = None, {}, None
