"""Trust in workers: replicated spot checks and reputation, after BOINC's adaptive replication.

A unit is deterministic given its base version, shards, hyperparameters and seed, so a second
worker (a *replica*) can recompute it and the two deltas must agree. What to check and what a
check means are decided here, in pure functions over one small record per worker id; the job
(``coordinator.job``) holds the replicated updates and writes each verdict to the store.

- **Replication rate** (``replication_probability``): a worker with fewer than
  ``trusted_after`` (10) consecutive valid results has every result checked; after that a
  result is checked with probability ``1 / consecutive_valid`` (BOINC's adaptive replication:
  Anderson, "BOINC: A Platform for Volunteer Computing", J. Grid Computing 2020, section 6.4),
  never below ``min_rate`` (so a long record does not buy a free lie). A trusted worker's results
  used unchecked count toward its run too (``after_unchecked``), as BOINC counts the results that
  pass without replication, so its rate falls as 1/n instead of staying near 1/``trusted_after``; a
  lost check still resets the run to 0. New ids start with no record, and two of them agreeing settle
  nothing, so minting ids buys nothing. Whatever the record, a result whose norm is far above the recent
  ones' (``suspicious``) is checked: a trusted worker that turns to scaled or flipped deltas is caught at
  its first such lie.
- **When a replica goes out** (``Job._replica_for``): a held result's unit to the next eligible worker
  that asks; and a unit of a worker that has not earned trust (its result will be held whatever the
  draw) at once, while it is still out, as BOINC issues a workunit's replicas together: a replica
  issued only after the result held it back a whole unit more.
- **A check** (``compare``/``agree``): cosine similarity and relative norm difference of
  the two deltas, over the weights and over the running statistics each, within ``Tolerance`` (measured between honest runs of the
  same unit on different machines and thread counts: bench/replica_tolerance.py,
  docs/results.md). Only workers of the same backend are compared: a browser draws its batches
  with another generator than torch, so its delta for the same unit is a different (equally
  honest) sample.
- **A verdict** (``judge``, ``after_check``): when the two disagree, or agree but neither
  ``vouches`` (has earned trust; or the replica's result carried an operator's token: two fresh ids
  of one volunteer must not vouch for each other's lie), the coordinator recomputes the unit; every
  party that agrees with that gains a valid result; a party it refutes loses:
  its run of valid results restarts at 0 and it earns a strike (a party in between, the
  inconclusive band, is not used and neither gains nor loses, but ``inconclusive_lost`` (3) inconclusive
  checks in a row count as a lost one: a liar that keeps its lies inside the band would otherwise cost a
  replica and a recomputation a result, for ever). ``quarantine_strikes`` (2) strikes before it earns ``trusted_after`` valid
  results again quarantine it for good: its results are still accepted and answered as any
  other, and recorded as dropped (``quarantined``), never folded.
"""
from __future__ import annotations

import dataclasses
import hashlib
import hmac
import ipaddress
import math
from dataclasses import dataclass

import numpy as np

from coordinator.limits import address_key
from models.state_names import is_running_stat


@dataclass(frozen=True)
class Tolerance:
    """Two deltas agree when their cosine similarity is at least ``min_cosine`` and their norms
    differ by at most ``max_norm_diff`` of the larger one. Against the coordinator's own computation,
    a delta is refuted (a lie) only when it is further off: cosine below ``refute_cosine`` or norms
    more than ``refute_norm_diff`` apart; in between, the check is inconclusive (BOINC's word): the
    result is not used, and nobody gains or loses trust. Measured (bench/replica_tolerance.py):
    honest units of 2 to 4 steps agree to 1 - cosine <= 1.2e-3 across torch thread counts, a
    16-step resnet_fast unit only to 0.947 (chaotic growth of rounding differences); every attack
    and another honest unit were at cosine <= 0.84 or norm difference >= 0.9."""

    min_cosine: float = 0.99
    max_norm_diff: float = 0.05
    refute_cosine: float = 0.9
    refute_norm_diff: float = 0.1


@dataclass(frozen=True)
class TrustPolicy:
    trusted_after: int = 10          # consecutive valid results before checks thin out
    min_rate: float = 0.02           # the lowest replication probability of a trusted worker
    quarantine_strikes: int = 2      # lost checks (before trust is earned again) that quarantine
    # Results of a worker that has not earned trust that may wait for their checks at once: beyond them it gets
    # no fresh unit (only replicas of others' units) until one is decided, as BOINC limits the jobs in progress of
    # a host it does not know. Without it a fast liar (a replay costs it nothing) sent 40, 48 and 61 results
    # before its second lost check quarantined it, with it 6 and 10 (real processes, tests/test_e2e_trust.py's
    # settings); the simulator's clean runs of 10 new workers were unchanged to the last digit on two seeds of
    # three (docs/results.md, 2026-12-07). None: no limit.
    max_unchecked: int | None = 4
    # Inconclusive checks in a row (no valid one between) of which the last counts as lost. A result in the band
    # is dropped and its worker neither gains nor loses, so a liar tuned to the band lost nothing and cost every
    # result a replica and a recomputation. Honest results measured in the band: none at these tolerances, in
    # every table of docs/results.md since the tab's tolerance of 2026-12-02 (tabs on WebAssembly against the
    # coordinator, 60 units on the 6 models a tab trains, 2026-12-07: the worst at 1 - cosine 0.137 on supermask_conv,
    # inside its own tolerance; torch thread counts on all 7 models). None: never.
    inconclusive_lost: int | None = 3
    tolerance: Tolerance = Tolerance()
    # A tab's result is compared across runtimes (WebAssembly or WebGPU kernels against onnxruntime's
    # native ones, or another tab's): rounding differs at every operation and training amplifies it,
    # so two honest 8-step resnet_fast units of 128 ended at cosine 0.978 to 0.998 (a tab against the
    # coordinator's recomputation, bench/browser_replica.py), where torch at other thread counts keeps
    # 7-step units to 0.9992. Every attack measured stays below cosine 0.84 (bench/replica_tolerance.py).
    browser_tolerance: Tolerance = Tolerance(min_cosine=0.95)
    # Models whose honest runs drift further, by name. supermask_conv trains scores whose top-k makes the mask: a
    # rounding difference flips near-tied scores in or out, and a flipped mask changes every later step. Two
    # honest runs of one unit at torch threads 1 and 2 ended at cosine 0.805 (norm difference 0.037), where every
    # lie measured was further off: a little is enough at cosine 0.78 / 0.74 with norm differences 0.10 / 0.08,
    # label flip and replay at 0.33 or below, sign flip, scale, noise and free ride far off
    # (bench/results/audit11_2026-12-06/rt_sm). At the dense tolerance an honest volunteer checked at another
    # thread count lost its check as a liar. (supermask_fc's honest runs agree to 1e-11: it keeps the dense one.)
    model_tolerances: tuple[tuple[str, Tolerance], ...] = (
        ("supermask_conv", Tolerance(min_cosine=0.75, max_norm_diff=0.05, refute_cosine=0.5, refute_norm_diff=0.1)),)

    # A result far larger than the recent ones is checked whatever its worker's record (a liar that earned trust
    # and then scales or flips its deltas is caught at its first such lie, not at ~1/n of them); honest results
    # never came above 4 x the median of the recent norms in the 40 full-budget parity runs (adaptive_clipped 0)
    suspicious_norm: float = 4.0
    suspicious_after: int = 10       # recent norms needed before any is suspicious

    def tolerance_for(self, backend: str, model: str | None = None) -> Tolerance:
        """The tolerance of a check of a result from a worker of this backend, for this model."""
        for name, tolerance in self.model_tolerances:
            if name == model:
                return tolerance
        return self.browser_tolerance if backend == "browser" else self.tolerance


@dataclass(frozen=True)
class Record:
    """What the coordinator knows of one worker id (a row of the store's ``trust`` table)."""

    worker_id: str
    backend: str = "unknown"
    address: str = ""                # the address of its last unit request
    results: int = 0                 # results accepted from it
    replicated: int = 0              # of those, checked by a replica or the coordinator
    consecutive_valid: int = 0
    valid: int = 0                   # checks it passed (as the original or as the replica)
    invalid: int = 0                 # checks it lost: its delta disagreed with the settled answer
    strikes: int = 0
    inconclusive: int = 0            # checks that were neither (in the band between agreeing and refuted)
    inconclusive_run: int = 0        # of those, in a row since its last valid or lost check
    quarantined: bool = False
    credit: int = 0                  # samples of its results that passed a check or were folded unchecked
    operator: bool = False           # its last unit request carried a token of the operator's own workers
    key_digest: str = ""             # sha256 of the worker key its id is bound to (``key_matches``); "" unbound


@dataclass(frozen=True)
class Similarity:
    cosine: float
    norm_diff: float                 # |(|a| - |b|)| / max(|a|, |b|); 0 when both are 0


# ---------------------------------------------------------------------------- the maths
def compare(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> Similarity:
    """The worse of ``similarity`` over the weights and over the batch-norm running statistics, each
    on its own: the statistics move alike in every unit (early in training the variances jump from
    1 to the data's), so in one sum they would hide any difference in the weights."""
    weights = similarity(*({k: v for k, v in d.items() if not is_running_stat(k)} for d in (a, b)))
    stats = similarity(*({k: v for k, v in d.items() if is_running_stat(k)} for d in (a, b)))
    return Similarity(min(weights.cosine, stats.cosine), max(weights.norm_diff, stats.norm_diff))


def similarity(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> Similarity:
    """Cosine similarity and relative norm difference of two deltas over all their tensors (float64
    sums). A tensor present in only one counts as zeros in the other. Two zero deltas are identical
    (cosine 1); a zero delta against a non-zero one has cosine 0 and norm difference 1."""
    dot = na = nb = 0.0
    for name in a.keys() | b.keys():
        x = np.asarray(a[name], np.float64).ravel() if name in a else None
        y = np.asarray(b[name], np.float64).ravel() if name in b else None
        if x is not None:
            na += float(x @ x)
        if y is not None:
            nb += float(y @ y)
        if x is not None and y is not None and x.shape == y.shape:
            dot += float(x @ y)
    na, nb = math.sqrt(na), math.sqrt(nb)
    if na == 0.0 and nb == 0.0:
        return Similarity(1.0, 0.0)
    if na == 0.0 or nb == 0.0:
        return Similarity(0.0, 1.0)
    return Similarity(min(1.0, max(-1.0, dot / (na * nb))), abs(na - nb) / max(na, nb))


def agree(s: Similarity, tolerance: Tolerance) -> bool:
    return s.cosine >= tolerance.min_cosine and s.norm_diff <= tolerance.max_norm_diff


def judge(s: Similarity, tolerance: Tolerance) -> str:
    """A delta against a trusted reference: ``valid`` (it agrees), ``invalid`` (refuted) or ``inconclusive``."""
    if agree(s, tolerance):
        return "valid"
    if s.cosine < tolerance.refute_cosine or s.norm_diff > tolerance.refute_norm_diff:
        return "invalid"
    return "inconclusive"


def suspicious(norm: float, recent, policy: TrustPolicy) -> bool:
    """Whether a result's delta norm is far above the recent results' (``suspicious_norm`` times their median,
    once ``suspicious_after`` are known): such a result is held for a check even from a trusted worker."""
    if len(recent) < policy.suspicious_after:
        return False
    return norm > policy.suspicious_norm * float(np.median(np.asarray(recent, np.float64)))


def earned(record: Record, policy: TrustPolicy) -> bool:
    """Whether the id has earned trust: ``trusted_after`` valid results in a row, and bound to a worker key (an id
    that never came with one is anyone's, so its run buys nothing)."""
    return bool(record.key_digest) and record.consecutive_valid >= policy.trusted_after


def replication_probability(record: Record | None, policy: TrustPolicy) -> float:
    """The chance that this worker's next result is checked: 1 while it is new, distrusted or unbound (an id
    that never came with a worker key: anyone may act as it, so it never earns trust),
    ``max(min_rate, 1 / consecutive_valid)`` once it has ``trusted_after`` valid results in a row;
    0 once quarantined (its results are not used, so there is nothing to check)."""
    if record is None:
        return 1.0
    if record.quarantined:
        return 0.0
    if not earned(record, policy):
        return 1.0
    return max(policy.min_rate, 1.0 / record.consecutive_valid)


def reputation(record: Record | None, policy: TrustPolicy) -> float:
    """One number for people: the chance a result of this worker is used without a check
    (0 for a new, distrusted or quarantined worker; 0.9 after 10 valid results in a row)."""
    if record is None or record.quarantined:
        return 0.0
    return 1.0 - replication_probability(record, policy)


def earns(record: Record, samples: int) -> int:
    """The credit ``samples`` of used work give this worker: none once it is quarantined (its results are never
    folded; a result or a check it wins after its quarantine, computed before it, counts for nothing either)."""
    return 0 if record.quarantined else samples


def after_check(record: Record, won: bool, policy: TrustPolicy, samples: int = 0) -> Record:
    """The record after a check: ``won`` (its delta agreed with the settled answer) or lost. A quarantined worker
    earns no credit by winning one (a replica it computed before its quarantine, judged after it: that result is
    never folded)."""
    if won:
        run = record.consecutive_valid + 1
        return dataclasses.replace(record, consecutive_valid=run, valid=record.valid + 1, inconclusive_run=0,
                                   strikes=0 if run >= policy.trusted_after else record.strikes,
                                   credit=record.credit + earns(record, samples))
    strikes = record.strikes + 1
    quarantined = record.quarantined or strikes >= policy.quarantine_strikes
    return dataclasses.replace(record, consecutive_valid=0, invalid=record.invalid + 1, strikes=strikes,
                               inconclusive_run=0, quarantined=quarantined, credit=0 if quarantined else record.credit)


def inconclusive_loses(record: Record | None, policy: TrustPolicy) -> bool:
    """Whether one more inconclusive check of this worker counts as a lost one (``inconclusive_lost`` in a row)."""
    return policy.inconclusive_lost is not None and \
        (record.inconclusive_run if record is not None else 0) + 1 >= policy.inconclusive_lost


def after_inconclusive(record: Record, policy: TrustPolicy) -> Record:
    """The record after an inconclusive check: counted, and lost (``after_check``) when ``inconclusive_loses``;
    else neither gained nor lost."""
    counted = dataclasses.replace(record, inconclusive=record.inconclusive + 1,
                                  inconclusive_run=record.inconclusive_run + 1)
    return after_check(counted, False, policy) if inconclusive_loses(record, policy) else counted


def after_unchecked(record: Record, policy: TrustPolicy) -> Record:
    """The record after a result used without a check: a trusted worker's run grows by one (its checks
    thin out as 1/n); a worker still earning trust, or quarantined, is unchanged."""
    if record.quarantined or record.consecutive_valid < policy.trusted_after:
        return record
    return dataclasses.replace(record, consecutive_valid=record.consecutive_valid + 1)


def vouches(record: Record | None, policy: TrustPolicy) -> bool:
    """Whether this worker's agreement settles a check: it earned trust (``trusted_after`` valid results in a
    row, its id bound to a key) and is not quarantined. (A replica computed by the operator's own worker vouches
    too: that is known from the token its result carried, not from the id's record, ``Job._check``.) Two parties
    of which neither vouches (two fresh ids, perhaps one volunteer's) agreeing prove nothing: the coordinator
    recomputes the unit."""
    return record is not None and not record.quarantined and earned(record, policy)


def bound(record: Record, key: str) -> Record:
    """``record`` bound to ``key``: its run of valid checks starts afresh, so whoever binds an id that worked
    without a key (anyone could act as it) does not take over the trust that run would give."""
    return dataclasses.replace(record, key_digest=key_digest(key), consecutive_valid=0)


def key_digest(key: str) -> str:
    """What the store keeps of a worker key (never the key)."""
    return hashlib.sha256(key.encode()).hexdigest()


def same_host(a: str, b: str) -> bool:
    """Whether two request addresses are one machine that is not this one: a replica is never given
    to the same remote host as the original (two ids of one volunteer would check themselves); an IPv6
    host is its /64, as for the rate limits (``limits.address_key``). Loopback (workers the operator runs
    here) and unknown addresses do not count."""
    if not a or not b or address_key(a) != address_key(b):
        return False
    try:
        return not ipaddress.ip_address(a).is_loopback
    except ValueError:
        return True


# ---------------------------------------------------------------------------- the records, kept in the store
class TrustBook:
    """Every worker's ``Record``, read from the store once and written through on each change (the
    store's ``trust`` table; a verdict writes them inside its transaction)."""

    def __init__(self, store, policy: TrustPolicy):
        self.store, self.policy = store, policy
        fields = {f.name for f in dataclasses.fields(Record)}
        self.records: dict[str, Record] = {}
        for raw in store.trust_records():
            record = Record(**{k: v for k, v in raw.items() if k in fields})
            self.records[record.worker_id] = record

    def get(self, worker_id: str) -> Record | None:
        return self.records.get(worker_id)

    def put(self, record: Record, later: bool = False) -> None:
        self.records[record.worker_id] = record
        self.store.put_trust(record.worker_id, dataclasses.asdict(record), later=later)

    def quarantined(self, worker_id: str) -> bool:
        record = self.records.get(worker_id)
        return record is not None and record.quarantined

    def probability(self, worker_id: str) -> float:
        return replication_probability(self.records.get(worker_id), self.policy)

    def key_matches(self, worker_id: str, key: str | None) -> bool:
        """Whether a request for ``worker_id`` that carries ``key`` (the ``WORKER_KEY_HEADER``; None: none) may
        act as it: always while the id is unbound, else only with the key it was bound to."""
        record = self.records.get(worker_id)
        if record is None or not record.key_digest:
            return True
        return key is not None and hmac.compare_digest(record.key_digest, key_digest(key))

    def bind(self, worker_id: str, key: str) -> None:
        """Bind ``worker_id`` to ``key`` if it is not bound yet (written at once); the caller asked ``key_matches``
        with no await between, so two first requests of one id cannot both bind."""
        record = self.records.get(worker_id) or Record(worker_id)
        if not record.key_digest:
            self.put(bound(record, key))

    def seen(self, worker_id: str, backend: str | None, address: str | None, operator: bool = False,
             key: str | None = None) -> None:
        """A unit request: the worker's backend and address, and whether it carried a token of the
        operator's own workers (written only when they change). Shown on the dashboard only: whether a
        result is checked follows the token its own request carries, not the id (ids are claimed). An unbound
        id that comes with a ``key`` is bound to it here (``key_matches`` was asked first), written at once."""
        record = self.records.get(worker_id) or Record(worker_id)
        bind = key is not None and not record.key_digest
        changed = dataclasses.replace(bound(record, key) if bind else record, backend=backend or record.backend,
                                      address=address or record.address, operator=operator)
        if changed != record or worker_id not in self.records:
            self.put(changed, later=not bind)   # (else shown only: written when the store's writer gets to it)

    def result(self, worker_id: str, checked: bool, samples: int) -> None:
        """An accepted result; ``checked``: held for a check (else credited now, used unchecked)."""
        record = self.records.get(worker_id) or Record(worker_id)
        record = dataclasses.replace(record, results=record.results + 1, replicated=record.replicated + checked,
                                     credit=record.credit + (0 if checked else earns(record, samples)))
        self.put(record if checked else after_unchecked(record, self.policy))

    def withdrawn(self, worker_id: str, samples: int) -> None:
        """Results credited when they were used unchecked, withdrawn before they were folded (the worker lost a
        check meanwhile): their samples are no longer its credit."""
        record = self.records.get(worker_id)
        if record is not None and samples:
            self.put(dataclasses.replace(record, credit=max(0, record.credit - samples)))

    def verdict(self, worker_id: str, won: bool | None, samples: int = 0) -> Record:
        """A check's outcome for this worker: ``won`` True or False, or None (inconclusive)."""
        record = self.records.get(worker_id) or Record(worker_id)
        record = after_inconclusive(record, self.policy) if won is None else \
            after_check(record, won, self.policy, samples)
        self.put(record)
        return record
