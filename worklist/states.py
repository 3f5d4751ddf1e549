"""The UPS state machine of PS3.4 Table CC.1.1-2, as a pure function so it can be checked on its own.

Every Change UPS State request (PS3.18 11.7) and Request Cancellation (11.8) is decided here from the stored
state and Transaction UID; storage applies the outcome in the transaction that read them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class State(enum.IntEnum):
    SCHEDULED = 0
    IN_PROGRESS = 1
    COMPLETED = 2
    CANCELED = 3

    @property
    def code(self) -> str:
        """The Procedure Step State (0074,1000) value."""
        return self.name.replace("_", " ")

    @property
    def final(self) -> bool:
        return self in (State.COMPLETED, State.CANCELED)

    @classmethod
    def from_code(cls, text: str) -> State | None:
        try:
            return cls[text.strip().replace(" ", "_")]
        except KeyError:
            return None


class Status(enum.Enum):
    """DIMSE status codes of PS3.4 Table CC.2.1-2 (and CC.2.2-2) that the table can answer."""

    OK = "0000"
    ALREADY_CANCELED = "B304"  # warning
    ALREADY_COMPLETED = "B306"  # warning
    MAY_NO_LONGER_BE_UPDATED = "C300"
    WRONG_TRANSACTION_UID = "C301"
    ALREADY_IN_PROGRESS = "C302"
    ONLY_VIA_CREATE = "C303"
    FINAL_STATE_NOT_MET = "C304"
    NOT_IN_PROGRESS = "C310"
    ALREADY_COMPLETED_CANCEL = "C311"


@dataclass(frozen=True, slots=True)
class Outcome:
    status: Status
    new_state: State | None = None  # None: the state does not change
    # Request Cancellation of an IN PROGRESS item: nothing changes, subscribers are told someone asked
    cancel_requested: bool = False

    @property
    def failed(self) -> bool:
        return self.status.value.startswith("C")


def change_state(
    current: State, stored_tuid: str | None, requested: State, given_tuid: str, final_state_met: bool
) -> Outcome:
    """Outcome of N-ACTION Change UPS State (one row of Table CC.1.1-2 per requested state)."""
    if requested is State.SCHEDULED:
        return Outcome(Status.ONLY_VIA_CREATE)
    if requested is State.IN_PROGRESS:
        if current is State.SCHEDULED:
            return Outcome(Status.OK, State.IN_PROGRESS)
        if given_tuid != stored_tuid:
            return Outcome(Status.WRONG_TRANSACTION_UID)
        return Outcome(
            Status.ALREADY_IN_PROGRESS if current is State.IN_PROGRESS else Status.MAY_NO_LONGER_BE_UPDATED
        )
    # COMPLETED or CANCELED
    if current is State.SCHEDULED:
        return Outcome(Status.NOT_IN_PROGRESS)
    if given_tuid != stored_tuid:
        return Outcome(Status.WRONG_TRANSACTION_UID)
    if current is State.IN_PROGRESS:
        if not final_state_met:
            return Outcome(Status.FINAL_STATE_NOT_MET)
        return Outcome(Status.OK, requested)
    if current is requested:
        return Outcome(Status.ALREADY_COMPLETED if current is State.COMPLETED else Status.ALREADY_CANCELED)
    return Outcome(Status.MAY_NO_LONGER_BE_UPDATED)


def request_cancel(current: State) -> Outcome:
    """Outcome of N-ACTION Request UPS Cancel: a SCHEDULED item is canceled by the archive itself (it goes
    through IN PROGRESS, as the table says, which storage reports as two state events); an IN PROGRESS one
    is left to its performer, who is told through the Cancel Requested event."""
    if current is State.SCHEDULED:
        return Outcome(Status.OK, State.CANCELED)
    if current is State.IN_PROGRESS:
        return Outcome(Status.OK, cancel_requested=True)
    if current is State.CANCELED:
        return Outcome(Status.ALREADY_CANCELED)
    return Outcome(Status.ALREADY_COMPLETED_CANCEL)


def may_update(current: State, stored_tuid: str | None, given_tuid: str | None) -> Status:
    """N-SET (Update Workitem, PS3.18 11.6): SCHEDULED items need no Transaction UID, IN PROGRESS ones the
    owner's, final ones none at all (CC.2.5.3)."""
    if current.final:
        return Status.MAY_NO_LONGER_BE_UPDATED
    if current is State.IN_PROGRESS and given_tuid != stored_tuid:
        return Status.WRONG_TRANSACTION_UID
    return Status.OK
