"""Experiment (fifty-second session): the Gluon probe kernel's synchronisation checked on the CPU.

The probe (`gluon_attention.py`, removed after it was measured; git d0804d9) became
`sparsediff/kernels/block_sparse_attn_hopper.py`, which keeps its schedule 1 with the same barriers,
arrival counts and parities (its TMA loads come two to a barrier, which one expected byte count covers).
Gluon has no interpreter, and a wrong barrier parity on the GPU hangs the device call or reads a
buffer the producer has refilled. This replays the probe's producer and consumers as
Python generators, step for step in the order the kernel issues them, over a model of mbarriers
(arrival count, phase parity, TMA transaction completion at any later moment) under random
interleavings, and checks that no run deadlocks, that every product reads the K or V block it
expects, and that the producer refills a buffer only after every consumer has released it.

    python scripts/session52/gluon_protocol_check.py  # every schedule, 2 and 3 stages, 1-7 blocks
"""
from __future__ import annotations

import itertools
import random

SPIN = "spin"  # what an actor yields while it waits on a barrier that has not passed


class Barrier:
    changes = 0  # arrivals and landed transactions, over every barrier: a pass with none and no step is stuck

    def __init__(self, count: int):
        self.count, self.arrived, self.completed, self.tx_pending = count, 0, 0, 0

    def passes(self, parity: int) -> bool:  # try_wait.parity: the phase of that parity has completed
        return (self.completed & 1) != parity

    def arrive(self, tx: int = 0) -> None:
        Barrier.changes += 1
        self.arrived += 1
        self.tx_pending += tx
        self._maybe_complete()

    def transaction_done(self) -> None:
        Barrier.changes += 1
        self.tx_pending -= 1
        self._maybe_complete()

    def _maybe_complete(self) -> None:
        assert self.arrived <= self.count, "more arrivals than the barrier's count in one phase"
        if self.arrived == self.count and self.tx_pending == 0:
            self.arrived, self.completed = 0, self.completed + 1


# Deliberate errors that the check must catch (it is run against each: a check that cannot fail proves nothing).
MUTATIONS = ("k-ready-parity", "k-empty-count", "producer-parity", "turn-parity", "early-v-release")


def simulate(count: int, stages: int, schedule: int, rng: random.Random, mutation: str | None = None) -> None:
    consumers = 2 if schedule else 1
    pingpong = schedule == 2
    flip = int(mutation == "k-ready-parity")
    q_bar = Barrier(1)
    k_ready, v_ready = [Barrier(1) for _ in range(stages)], [Barrier(1) for _ in range(stages)]
    k_empty = [Barrier(1 if mutation == "k-empty-count" else consumers) for _ in range(stages)]
    v_empty = [Barrier(consumers) for _ in range(stages)]
    turns = [Barrier(1), Barrier(1)]
    k_buf, v_buf = [None] * stages, [None] * stages  # the block a buffer holds
    released = {("k", s): consumers for s in range(stages)} | {("v", s): consumers for s in range(stages)}
    in_flight = []  # TMA copies not yet landed: (barrier, buffer list, stage, block)
    issuers = []  # with ping-pong, the warpgroup of each turn in order

    def load(kind, bufs, ready, stage, block):
        assert released[(kind, stage)] == consumers, f"{kind} buffer {stage} refilled before every consumer released it"
        released[(kind, stage)] = 0
        ready[stage].arrive(tx=1)
        in_flight.append((ready[stage], bufs, stage, block))

    def wait(bar, parity):
        while not bar.passes(parity):
            yield SPIN

    def producer():
        q_bar.arrive(tx=1)
        in_flight.append((q_bar, None, 0, 0))
        for i in range(count):
            stage, phase = i % stages, (i // stages) & 1
            yield from wait(k_empty[stage], phase ^ int(mutation != "producer-parity"))
            load("k", k_buf, k_ready, stage, i)
            yield from wait(v_empty[stage], phase ^ 1)
            load("v", v_buf, v_ready, stage, i)
            yield

    def take_turn(order, j):
        if pingpong:
            yield from wait(turns[order], (j & 1) ^ (1 - order) * int(mutation != "turn-parity"))
            assert not issuers or issuers[-1] != order, "a warpgroup took two turns in a row"
            issuers.append(order)

    def pass_turn(order):
        if pingpong:
            turns[1 - order].arrive()

    def release(kind, bars, stage):
        released[(kind, stage)] += 1
        bars[stage].arrive()

    def consumer(order):
        yield from wait(q_bar, 0)
        yield from wait(k_ready[0], 0)
        yield from take_turn(order, 0)
        assert k_buf[0] == 0
        pass_turn(order)
        yield
        release("k", k_empty, 0)
        for i in range(count - 1):
            stage, nxt = i % stages, (i + 1) % stages
            yield from wait(k_ready[nxt], ((i + 1) // stages) & 1 ^ flip)
            yield from wait(v_ready[stage], (i // stages) & 1)
            yield from take_turn(order, i + 1)
            assert k_buf[nxt] == i + 1 and v_buf[stage] == i, (k_buf, v_buf, i)
            pass_turn(order)
            if mutation == "early-v-release":
                release("v", v_empty, stage)
            yield
            assert k_buf[nxt] == i + 1  # still there when the Q·K product is waited for
            release("k", k_empty, nxt)
            yield
            assert v_buf[stage] == i, "V refilled before its P·V product was waited for"
            if mutation != "early-v-release":
                release("v", v_empty, stage)
        last = (count - 1) % stages
        yield from wait(v_ready[last], ((count - 1) // stages) & 1)
        yield from take_turn(order, count)
        assert v_buf[last] == count - 1
        pass_turn(order)
        yield
        assert v_buf[last] == count - 1
        release("v", v_empty, last)

    actors = [producer()] + [consumer(order) for order in range(consumers)]
    while actors or in_flight:
        choices = len(actors) + len(in_flight)
        progressed = False
        changes = Barrier.changes
        for pick in rng.sample(range(choices), choices):
            if pick >= len(actors):  # a TMA copy lands
                bar, bufs, stage, block = in_flight.pop(pick - len(actors))
                if bufs is not None:
                    bufs[stage] = block
                bar.transaction_done()
                progressed = True
                break
            try:
                step = next(actors[pick])
            except StopIteration:
                actors.pop(pick)
                progressed = True
                break
            if step is not SPIN:
                progressed = True
                break
        if not progressed and Barrier.changes == changes:  # every actor spins, nothing in flight
            raise AssertionError(f"deadlock: count={count} stages={stages} schedule={schedule}")


def check(mutation: str | None, rng: random.Random, interleavings: int) -> str | None:
    """None if every case passes, else the first failure's message."""
    for count, stages, schedule in itertools.product(range(1, 8), (2, 3), (0, 1, 2)):
        for _ in range(interleavings):
            try:
                simulate(count, stages, schedule, rng, mutation)
            except AssertionError as error:
                return f"count={count} stages={stages} schedule={schedule}: {error}"
    return None


if __name__ == "__main__":
    rng = random.Random(0)
    failure = check(None, rng, 200)
    assert failure is None, failure
    print("the kernel's protocol: every schedule, 2 and 3 stages, 1-7 blocks, 200 random interleavings each: "
          "no deadlock, no stale read, turns alternate")
    for mutation in MUTATIONS:
        failure = check(mutation, rng, 200)
        assert failure is not None, f"mutation {mutation} was not caught"
        print(f"mutation {mutation}: caught ({failure})")
