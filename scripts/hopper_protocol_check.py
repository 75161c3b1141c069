"""The Gluon Hopper kernel's synchronisation (`sparsediff/kernels/block_sparse_attn_hopper.py`), checked on
the CPU.

Gluon has no interpreter, and a wrong barrier parity on the GPU hangs the device or reads a buffer the
producer has refilled. This replays each program's producer and two consumer warpgroups as Python
generators, step for step in the order the kernel issues them, over a model of mbarriers (arrival
count, phase parity, TMA transactions landing at any later moment), under random interleavings of every
actor of every program. It models the persistent kernel: each program takes rows in turn (statically,
or from the shared counter), its producer publishes each row's work position in the slot of one of two
Q buffers, the K / V ring's position runs on across rows, and an end mark stops the consumers. A program
of one row is the one-program-a-row kernel, whose single Q barrier is the first Q buffer's.

It checks that no run deadlocks; that every product reads the Q, K or V tile it expects; that no buffer
is refilled before both consumers released it; that every row is computed once by each consumer; and
that the counters are back at zero after a dynamic launch. Each of a list of deliberate errors must be
caught (a check that cannot fail proves nothing).

    python scripts/hopper_protocol_check.py
"""
from __future__ import annotations

import itertools
import random

SPIN = "spin"  # what an actor yields while it waits on a barrier that has not passed

MUTATIONS = (
    "k-ready-parity",  # a consumer waits for K with the wrong parity
    "k-empty-count",  # a K buffer counts one release, not both consumers'
    "producer-parity",  # the producer waits for a free K buffer with the wrong parity
    "early-v-release",  # V released before its P·V product is waited for
    "q-empty-parity",  # the producer waits for a free Q buffer with the wrong parity
    "early-q-release",  # a Q buffer released before the output staged in it is stored
    "ring-restarts",  # the ring's position restarts at each row instead of running on
    "no-end-mark",  # the producer stops without publishing the end mark
    "publish-after-load",  # the work position written after the Q load's arrival
    "first-finisher-resets",  # the first program to finish, not the last, zeroes the counters
)


class Barrier:
    def __init__(self, count: int):
        self.count, self.arrived, self.completed, self.tx_pending = count, 0, 0, 0

    def passes(self, parity: int) -> bool:  # try_wait.parity: the phase of that parity has completed
        return (self.completed & 1) != parity

    def arrive(self, tx: int = 0) -> None:
        self.arrived += 1
        self.tx_pending += tx
        self._maybe_complete()

    def transaction_done(self) -> None:
        self.tx_pending -= 1
        self._maybe_complete()

    def _maybe_complete(self) -> None:
        assert self.arrived <= self.count, "more arrivals than the barrier's count in one phase"
        if self.arrived == self.count and self.tx_pending == 0:
            self.arrived, self.completed = 0, self.completed + 1


def _wait(bar: Barrier, parity: int):
    while not bar.passes(parity):
        yield SPIN


class Program:
    """One CTA: its shared-memory buffers and barriers, and its three partitions as generators."""

    def __init__(self, index: int, launch: "Launch"):
        self.index, self.launch = index, launch
        stages, mutation = launch.stages, launch.mutation
        self.q_ready, self.q_empty = [Barrier(1) for _ in range(2)], [Barrier(2) for _ in range(2)]
        self.k_ready, self.v_ready = [Barrier(1) for _ in range(stages)], [Barrier(1) for _ in range(stages)]
        self.k_empty = [Barrier(1 if mutation == "k-empty-count" else 2) for _ in range(stages)]
        self.v_empty = [Barrier(2) for _ in range(stages)]
        self.q_buf, self.work_slot = [None, None], [-1, -1]  # the row whose Q a buffer holds; published positions
        self.k_buf, self.v_buf = [None] * stages, [None] * stages  # the (row, tile) a ring buffer holds
        self.in_use = {("q", b): 0 for b in range(2)} | {("k", s): 0 for s in range(stages)} | {
            ("v", s): 0 for s in range(stages)}

    def _load(self, kind: str, ready: list, bufs: list, index: int, content) -> None:
        assert self.in_use[(kind, index)] == 0, f"{kind} buffer {index} refilled while a consumer still uses it"
        self.in_use[(kind, index)] = 2  # both consumers read it until they release it
        ready[index].arrive(tx=1)
        self.launch.in_flight.append((ready[index], bufs, index, content))

    def _release(self, kind: str, empty: list, index: int) -> None:
        self.in_use[(kind, index)] -= 1
        empty[index].arrive()

    def producer(self):
        launch, mutation, stages = self.launch, self.launch.mutation, self.launch.stages
        work, first, taken = self.index, 0, 0
        while work < launch.n_rows:
            buf = taken % 2
            yield from _wait(self.q_empty[buf], ((taken // 2) & 1) ^ int(mutation != "q-empty-parity"))
            if mutation != "publish-after-load":
                self.work_slot[buf] = work
            self._load("q", self.q_ready, self.q_buf, buf, work)
            yield
            if mutation == "publish-after-load":
                self.work_slot[buf] = work
            n_tiles = max((launch.counts[work] + 1) // 2, 1)
            for t in range(n_tiles):
                position = t if mutation == "ring-restarts" else first + t
                stage, phase = position % stages, (position // stages) & 1
                yield from _wait(self.k_empty[stage], phase ^ int(mutation != "producer-parity"))
                self._load("k", self.k_ready, self.k_buf, stage, (work, t))
                yield from _wait(self.v_empty[stage], phase ^ 1)
                self._load("v", self.v_ready, self.v_buf, stage, (work, t))
                yield
            first += n_tiles
            taken += 1
            if launch.dynamic:  # one atomic step
                work = launch.programs + launch.counters[0]
                launch.counters[0] += 1
                yield
            else:
                work += launch.programs
        if mutation == "no-end-mark":
            return
        buf = taken % 2
        yield from _wait(self.q_empty[buf], ((taken // 2) & 1) ^ 1)
        self.work_slot[buf] = launch.n_rows
        self.q_ready[buf].arrive()
        if launch.dynamic:
            finished = launch.counters[1]
            launch.counters[1] += 1
            if finished == (0 if mutation == "first-finisher-resets" else launch.programs - 1):
                launch.counters[:] = [0, 0]

    def consumer(self, order: int):
        launch, mutation, stages = self.launch, self.launch.mutation, self.launch.stages
        flip = int(mutation == "k-ready-parity")
        first, taken = 0, 0
        yield from _wait(self.q_ready[0], 0)
        work = self.work_slot[0]
        while work < launch.n_rows:
            buf = taken % 2
            assert self.q_buf[buf] == work, f"consumer reads Q of row {self.q_buf[buf]} for row {work}"
            n_tiles = max((launch.counts[work] + 1) // 2, 1)
            # The first tile: Q·K, waited for at once.
            stage = first % stages
            yield from _wait(self.k_ready[stage], (first // stages) & 1 ^ flip)
            assert self.k_buf[stage] == (work, 0), (self.k_buf[stage], work, 0)
            yield
            self._release("k", self.k_empty, stage)
            for t in range(first, first + n_tiles - 1):
                stage, nxt = t % stages, (t + 1) % stages
                yield from _wait(self.k_ready[nxt], ((t + 1) // stages) & 1 ^ flip)
                yield from _wait(self.v_ready[stage], (t // stages) & 1)
                assert self.k_buf[nxt] == (work, t + 1 - first) and self.v_buf[stage] == (work, t - first)
                if mutation == "early-v-release":
                    self._release("v", self.v_empty, stage)
                yield  # the next Q·K and this P·V in flight
                assert self.k_buf[nxt] == (work, t + 1 - first), "K refilled before its Q·K was waited for"
                self._release("k", self.k_empty, nxt)
                yield  # softmax
                assert self.v_buf[stage] == (work, t - first), "V refilled before its P·V was waited for"
                if mutation != "early-v-release":
                    self._release("v", self.v_empty, stage)
            last = first + n_tiles - 1
            yield from _wait(self.v_ready[last % stages], (last // stages) & 1)
            assert self.v_buf[last % stages] == (work, n_tiles - 1)
            yield
            assert self.v_buf[last % stages] == (work, n_tiles - 1)
            self._release("v", self.v_empty, last % stages)
            if mutation == "early-q-release":
                self._release("q", self.q_empty, buf)
            yield  # the output staged in this half of the Q buffer, stored by TMA, the store waited for
            assert self.q_buf[buf] == work, "Q buffer refilled while it staged the output"
            if mutation != "early-q-release":
                self._release("q", self.q_empty, buf)
            launch.done[order].append(work)
            first += n_tiles
            taken += 1
            yield from _wait(self.q_ready[taken % 2], (taken // 2) & 1)
            work = self.work_slot[taken % 2]


class Launch:
    def __init__(self, counts: list[int], programs: int, stages: int, dynamic: bool, mutation: str | None):
        self.counts, self.n_rows, self.programs, self.stages = counts, len(counts), programs, stages
        self.dynamic, self.mutation = dynamic, mutation
        self.counters = [0, 0]  # rows handed out past the first `programs`, programs finished
        self.in_flight = []  # TMA copies not yet landed: (barrier, buffers, index, content)
        self.done = ([], [])  # rows each consumer order computed

    def run(self, rng: random.Random) -> None:
        programs = [Program(p, self) for p in range(self.programs)]
        actors = [a for p in programs for a in (p.producer(), p.consumer(0), p.consumer(1))]
        stuck = 0
        while actors or self.in_flight:
            choices = len(actors) + len(self.in_flight)
            pick = rng.randrange(choices)
            if pick >= len(actors):  # a TMA copy lands
                bar, bufs, index, content = self.in_flight.pop(pick - len(actors))
                bufs[index] = content
                bar.transaction_done()
                stuck = 0
                continue
            try:
                step = next(actors[pick])
            except StopIteration:
                actors.pop(pick)
                stuck = 0
                continue
            stuck = stuck + 1 if step is SPIN else 0
            # Every actor spinning and nothing in flight cannot change: after many spins in a row, a deadlock.
            if stuck > 50 * choices and not self.in_flight:
                raise AssertionError("deadlock")
        for order in (0, 1):
            assert sorted(self.done[order]) == list(range(self.n_rows)), f"rows computed: {sorted(self.done[order])}"
        if self.dynamic:
            assert self.counters == [0, 0], f"counters left at {self.counters}"


def check(mutation: str | None, rng: random.Random, interleavings: int) -> str | None:
    """None if every case passes, else the first failure's message."""
    for programs, n_rows, stages, dynamic in itertools.product((1, 2, 3), (1, 2, 5), (2, 3), (True, False)):
        if programs > n_rows:  # the launcher runs at most one program a row
            continue
        for _ in range(interleavings):
            counts = [rng.randrange(8) for _ in range(n_rows)]  # kept blocks a row, 0-7
            try:
                Launch(counts, programs, stages, dynamic, mutation).run(rng)
            except AssertionError as error:
                return (f"programs={programs} rows={counts} stages={stages} dynamic={dynamic}: "
                        f"{error or 'assertion'}")
    return None


def main(interleavings: int = 100) -> None:
    rng = random.Random(0)
    failure = check(None, rng, interleavings)
    assert failure is None, failure
    print(f"the kernel's protocol: 1-3 programs, 1-5 rows of 0-7 kept blocks, 2 and 3 stages, static and dynamic, "
          f"{interleavings} random interleavings each: no deadlock, no stale read, every row once, counters reset")
    for mutation in MUTATIONS:
        failure = check(mutation, rng, interleavings)
        assert failure is not None, f"mutation {mutation} was not caught"
        print(f"mutation {mutation}: caught ({failure})")


if __name__ == "__main__":
    main()
