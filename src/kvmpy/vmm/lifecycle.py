"""The VM's lifecycle as one transition table (h11's habit: one module owns the state machine).

Not started -> Running <-> Paused -> Stopped; a restore goes Not started -> Paused. Pause and resume are
idempotent; a guest reboot is Running -> Running (the machine underneath is
rebuilt, the VMM goes on). Anything not in the table is refused with a
message naming the state and the event, never ignored and never a hang.
"""

from __future__ import annotations

from enum import Enum

from kvmpy.vmm.actions import ActionError, VmState


class Event(Enum):
    START = "start"
    RESTORE = "restore"
    PAUSE = "pause"
    RESUME = "resume"
    REBOOT = "reboot"
    STOP = "stop"


_NOT_STARTED, _RUNNING, _PAUSED, _STOPPED = (
    VmState.NOT_STARTED,
    VmState.RUNNING,
    VmState.PAUSED,
    VmState.STOPPED,
)

#: (state, event) -> next state; the only place transitions are decided.
TRANSITIONS: dict[tuple[VmState, Event], VmState] = {
    (_NOT_STARTED, Event.START): _RUNNING,
    (_NOT_STARTED, Event.RESTORE): _PAUSED,  # a loaded snapshot starts paused; resume_vm resumes it
    (_NOT_STARTED, Event.STOP): _STOPPED,
    (_RUNNING, Event.PAUSE): _PAUSED,
    (_RUNNING, Event.RESUME): _RUNNING,
    (_RUNNING, Event.REBOOT): _RUNNING,
    (_RUNNING, Event.STOP): _STOPPED,
    (_PAUSED, Event.PAUSE): _PAUSED,
    (_PAUSED, Event.RESUME): _RUNNING,
    (_PAUSED, Event.STOP): _STOPPED,
    (_STOPPED, Event.STOP): _STOPPED,
}


class LifecycleError(ActionError):
    """An event the current state does not allow."""


class Lifecycle:
    """The current state and the checked way to leave it."""

    def __init__(self) -> None:
        self.state = VmState.NOT_STARTED

    def next_state(self, event: Event) -> VmState:
        """Where ``event`` leads from here; raises LifecycleError if nowhere."""
        try:
            return TRANSITIONS[(self.state, event)]
        except KeyError:
            raise LifecycleError(f"cannot {event.value} a VM that is {self.state.value.lower()}") from None

    def apply(self, event: Event) -> VmState:
        self.state = self.next_state(event)
        return self.state

    @property
    def started(self) -> bool:
        return self.state is not VmState.NOT_STARTED


__all__ = ["TRANSITIONS", "Event", "Lifecycle", "LifecycleError"]
