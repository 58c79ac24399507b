"""The reference table on its own: counts, borrowers, and every ordering of their messages.

The property tests play an owner's side of the protocol: each borrow of an object is relayed
by a process that keeps the object alive until it has sent the borrow (in the runtime, the
caller of the task that handed the ref over), while the release comes from the borrower
itself, so the two reach the owner in any order; borrowers may die at any point, and their
late messages still arrive. Whatever the order, the object must live while anyone may use it,
and be released exactly once when nobody can.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from redray.core.reference_table import DEAD_BORROWERS_KEPT, ReferenceTable

OWNER = b"owner-id"
OWNER_ADDRESS = ("127.0.0.1", 1, OWNER)
OTHER_ADDRESS = ("127.0.0.1", 2, b"other-id")
X = b"x" * 16


def owner_table() -> ReferenceTable:
    return ReferenceTable(OWNER, OWNER_ADDRESS)


class Ref:
    """What `add_unpickled` needs of a rebuilt ref."""

    def __init__(self, oid: bytes, owner):
        self._id = oid
        self._owner = owner


# -- plain counting ------------------------------------------------------------------------
def test_an_owned_object_lives_while_a_local_ref_does():
    table = owner_table()
    table.own(X)
    table.add(X, None)
    table.add(X, OWNER_ADDRESS)  # our own address means ours
    assert table.release([X]) == []
    released = table.release([X])
    assert [oid for oid, _ in released] == [X]
    assert X not in table.objects


def test_releasing_a_value_releases_what_it_contains():
    table = owner_table()
    inner, outer = b"i" * 16, b"o" * 16
    table.own(inner)
    table.add(inner, None)
    table.own(outer)
    table.add(outer, None)
    table.pin([inner])
    table.objects[outer].nested = [inner]
    table.release([inner])  # the user's ref goes; the value still holds it
    assert inner in table.objects
    released = table.release([outer])
    assert [oid for oid, _ in released] == [outer, inner]


def test_a_process_never_borrows_from_itself():
    # A task returning a ref its caller owns makes the caller "borrow" its own object: that
    # must not keep the object alive once the caller's refs are gone.
    table = owner_table()
    table.own(X)
    table.add(X, None)
    table.borrowed([X], OWNER)
    assert table.borrowers_of(X) == {}
    assert [oid for oid, _ in table.release([X])] == [X]


def test_unpickled_refs_of_other_owners_are_new_borrows_once():
    table = owner_table()
    refs = [Ref(X, OTHER_ADDRESS), Ref(X, OTHER_ADDRESS), Ref(b"y" * 16, OWNER_ADDRESS)]
    assert table.add_unpickled(refs) == [X]
    assert table.objects[X].count == 2
    assert table.add_unpickled([Ref(X, OTHER_ADDRESS)]) == []
    assert table.register([X]) == {OTHER_ADDRESS: [X]}
    assert table.register_alive([X, b"gone" * 4]) == [(X, OTHER_ADDRESS)]
    assert table.objects[X].registered == 2


def test_a_release_before_its_borrow_keeps_the_object_until_the_borrow_arrives():
    table = owner_table()
    table.own(X)
    table.add(X, None)
    assert table.unborrowed([(X, 1)], b"w") == []
    assert table.release([X]) == []  # w's balance is -1: its borrow is still on its way
    assert table.borrowers_of(X) == {b"w": -1}
    assert [oid for oid, _ in table.borrowed([X], b"w")] == [X]


def test_a_dead_borrowers_late_borrow_is_ignored():
    table = owner_table()
    table.own(X)
    table.add(X, None)
    table.borrowed([X], b"w")
    assert table.borrower_died(b"w") == []
    table.borrowed([X], b"w")  # relayed before the death, delivered after it
    assert [oid for oid, _ in table.release([X])] == [X]


def test_dead_borrowers_are_remembered_within_a_bound():
    table = owner_table()
    for i in range(DEAD_BORROWERS_KEPT + 10):
        table.borrower_died(i.to_bytes(8, "big"))
    assert len(table._dead) == DEAD_BORROWERS_KEPT


def test_a_borrowers_death_releases_only_what_it_held():
    table = owner_table()
    ids = [bytes([i]) * 16 for i in range(3)]
    for oid in ids:
        table.own(oid)
        table.add(oid, None)
        table.borrowed([oid], b"w")
    table.release(ids[:2])
    released = table.borrower_died(b"w")
    assert sorted(oid for oid, _ in released) == sorted(ids[:2])
    assert ids[2] in table.objects
    assert b"w" not in table._borrowed_by


# -- every ordering of the protocol's messages ----------------------------------------------
@dataclass
class Session:
    """One ref handed to a borrower: the relayer's keep, the borrow it relays, the release."""

    borrower: int
    kept: bool = True
    borrow_arrived: bool = False
    release_arrived: bool = False


def schedules(max_borrowers: int = 3, max_sessions: int = 6):
    """Event lists: ("borrow"|"unborrow"|"drop_keep", session) in an order the protocol
    allows (a keep is dropped only after its borrow was delivered), plus the user's release
    and borrower deaths anywhere."""

    @st.composite
    def build(draw):
        n = draw(st.integers(0, max_sessions))
        owners = [draw(st.integers(0, max_borrowers - 1)) for _ in range(n)]
        events: list[tuple[str, int]] = []
        pending = {i: ["borrow", "unborrow"] for i in range(n)}
        keep_after_borrow = set()
        user_released = False
        dead: set[int] = set()
        while pending or keep_after_borrow or not user_released:
            choices = [("session", i) for i in pending] + [
                ("drop_keep", i) for i in keep_after_borrow
            ]
            if not user_released:
                choices.append(("release", -1))
            alive = sorted(set(owners) - dead)
            if alive and draw(st.integers(0, 9)) == 0:
                choices.append(("die", draw(st.sampled_from(alive))))
            kind, i = draw(st.sampled_from(choices))
            if kind == "session":
                message = draw(st.sampled_from(pending[i]))
                pending[i].remove(message)
                if not pending[i]:
                    del pending[i]
                events.append((message, i))
                if message == "borrow":
                    keep_after_borrow.add(i)
            elif kind == "drop_keep":
                keep_after_borrow.discard(i)
                events.append(("drop_keep", i))
            elif kind == "release":
                user_released = True
                events.append(("release", -1))
            else:
                dead.add(i)
                events.append(("die", i))
        return owners, events

    return build()


@settings(max_examples=400, deadline=None)
@given(schedules())
def test_any_message_order_frees_exactly_when_nobody_can_use_the_object(schedule):
    owners, events = schedule
    table = owner_table()
    table.own(X)
    table.add(X, None)  # the user's ref
    sessions = [Session(b) for b in owners]
    for _ in sessions:
        table.pin([X])  # each relayer keeps the object until it has relayed the borrow
    user_holds = True
    dead: set[int] = set()
    releases = 0

    def borrower_id(index: int) -> bytes:
        return b"borrower-%d" % index

    for kind, i in events:
        if kind == "borrow":
            sessions[i].borrow_arrived = True
            released = table.borrowed([X], borrower_id(sessions[i].borrower))
        elif kind == "unborrow":
            sessions[i].release_arrived = True
            released = table.unborrowed([(X, 1)], borrower_id(sessions[i].borrower))
        elif kind == "drop_keep":
            sessions[i].kept = False
            released = table.release([X])
        elif kind == "release":
            user_holds = False
            released = table.release([X])
        else:
            dead.add(i)
            released = table.borrower_died(borrower_id(i))
        releases += len(released)
        if releases:
            # Released: nobody may still use it.
            assert not user_holds
            assert not any(s.kept for s in sessions)
            assert all(
                s.borrower in dead or (s.borrow_arrived and s.release_arrived) for s in sessions
            ), (events, sessions)
    assert releases == 1
    assert X not in table.objects
    assert not table._borrowed_by


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([b"a", b"b"]), st.integers(-3, 3)), max_size=20))
def test_signed_counts_release_only_at_zero(changes):
    """Borrow counts may go negative and back; the object lives until all are zero."""
    table = owner_table()
    table.own(X)
    table.add(X, None)
    table.release([X])  # (nothing else counts yet: released at once)
    assert X not in table.objects
    table.own(X)
    table.pin([X])
    balance = {b"a": 0, b"b": 0}
    for borrower, delta in changes:
        if delta >= 0:
            table._change_borrows([(X, delta)], borrower)
        else:
            table.unborrowed([(X, -delta)], borrower)
        balance[borrower] += delta
        assert table.borrowers_of(X) == {k: v for k, v in balance.items() if v}
    released = table.release([X])
    assert bool(released) == (not any(balance.values()))
