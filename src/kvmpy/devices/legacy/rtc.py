"""The MC146818 CMOS real-time clock and its 128 bytes of CMOS memory.

Port 0x70 selects a register (bit 7 masks NMI), port 0x71 reads or writes
it. The time comes from an injected clock (the host's UTC time by default);
a guest that sets the time moves an offset, never the host clock. Update
cycles are not simulated: UIP (register A bit 7) always reads 0, so Linux's
"wait for the end of an update" loops finish at once.

The guest may set any date the registers can hold, and time goes on from
there: past the end of year 9999 (where Python's dates end) the clock shows
the same date 400 years earlier (the Gregorian calendar, weekdays included,
repeats every 400 years), so every later read and write still works and the
guest can set the clock back.
"""

from __future__ import annotations

import datetime
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from kvmpy.errors import RestoreError

INDEX = 0
DATA = 1

REG_SECONDS = 0x00
REG_MINUTES = 0x02
REG_HOURS = 0x04
REG_WEEKDAY = 0x06
REG_DAY = 0x07
REG_MONTH = 0x08
REG_YEAR = 0x09
REG_A = 0x0A
REG_B = 0x0B
REG_C = 0x0C
REG_D = 0x0D
REG_CENTURY = 0x32

B_24_HOUR = 0x02
B_BINARY = 0x04
B_SET = 0x80
D_VALID_RAM_TIME = 0x80

_TIME_REGISTERS = (
    REG_SECONDS,
    REG_MINUTES,
    REG_HOURS,
    REG_WEEKDAY,
    REG_DAY,
    REG_MONTH,
    REG_YEAR,
    REG_CENTURY,
)


@dataclass(frozen=True, slots=True)
class CmosRtcState:
    index: int
    cmos: bytes
    offset_seconds: float


_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
_FIRST = datetime.datetime(1, 1, 1, tzinfo=datetime.UTC)
_LAST = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.UTC)
#: 400 Gregorian years in seconds: dates and weekdays repeat after it.
_CYCLE_SECONDS = 146097 * 86400


def _calendar(seconds: float) -> datetime.datetime:
    """The date ``seconds`` after 1970 shows, moved by whole 400-year cycles into years 1-9999."""
    first, last = (_FIRST - _EPOCH).total_seconds(), (_LAST - _EPOCH).total_seconds()
    if seconds > last:
        seconds -= math.ceil((seconds - last) / _CYCLE_SECONDS) * _CYCLE_SECONDS
    elif seconds < first:
        seconds += math.ceil((first - seconds) / _CYCLE_SECONDS) * _CYCLE_SECONDS
    return _EPOCH + datetime.timedelta(seconds=int(seconds))


def _to_bcd(value: int) -> int:
    return ((value // 10) << 4) | (value % 10)


def _from_bcd(value: int) -> int:
    return (value >> 4) * 10 + (value & 0x0F)


class CmosRtc:
    """RTC registers 0x00-0x0D plus general CMOS memory up to 0x7F."""

    def __init__(
        self,
        clock: Callable[[], float] = time.time,
        cmos_values: dict[int, int] | None = None,
    ) -> None:
        self._clock = clock
        self._index = 0
        self._offset = 0.0  # guest time minus host time, in seconds
        self._cmos = bytearray(128)
        self._cmos[REG_A] = 0x26  # 32.768 kHz divider, 1024 Hz rate
        self._cmos[REG_B] = B_24_HOUR
        self._cmos[REG_D] = D_VALID_RAM_TIME
        for index, value in (cmos_values or {}).items():
            if 0x0E <= index < 0x80:
                self._cmos[index] = value & 0xFF

    def read(self, offset: int, data: memoryview) -> None:
        value = 0xFF
        if offset == INDEX:
            value = self._index
        elif offset == DATA:
            value = self._read_register(self._index)
        data[:] = bytes([value]) * len(data)

    def write(self, offset: int, data: bytes) -> None:
        if not data:
            return
        if offset == INDEX:
            self._index = data[0] & 0x7F  # bit 7 is the NMI mask, not part of the index
        elif offset == DATA:
            self._write_register(self._index, data[0])

    def _now(self) -> datetime.datetime:
        return _calendar(self._clock() + self._offset)

    def _encode(self, value: int) -> int:
        return value if self._cmos[REG_B] & B_BINARY else _to_bcd(value)

    def _decode(self, value: int) -> int:
        return value if self._cmos[REG_B] & B_BINARY else _from_bcd(value)

    def _read_register(self, index: int) -> int:
        if index in _TIME_REGISTERS:
            return self._read_time(index)
        if index == REG_A:
            return self._cmos[REG_A] & 0x7F  # UIP never set
        if index == REG_C:
            return 0  # no interrupt flags pending (and reading clears them)
        return self._cmos[index]

    def _read_time(self, index: int) -> int:
        now = self._now()
        if index == REG_HOURS:
            return self._encode_hour(now.hour)
        values = {
            REG_SECONDS: now.second,
            REG_MINUTES: now.minute,
            REG_WEEKDAY: now.isoweekday() % 7 + 1,  # 1 = Sunday
            REG_DAY: now.day,
            REG_MONTH: now.month,
            REG_YEAR: now.year % 100,
            REG_CENTURY: now.year // 100,
        }
        return self._encode(values[index])

    def _encode_hour(self, hour: int) -> int:
        if self._cmos[REG_B] & B_24_HOUR:
            return self._encode(hour)
        pm = 0x80 if hour >= 12 else 0
        return self._encode(hour % 12 or 12) | pm

    def _write_register(self, index: int, value: int) -> None:
        if index in _TIME_REGISTERS:
            self._set_time_field(index, value)
        elif index in (REG_C, REG_D):
            return  # read-only
        else:
            self._cmos[index] = value

    def _set_time_field(self, index: int, value: int) -> None:
        """Setting the clock moves the guest's offset from host time."""
        now = self._now()
        fields = {
            "second": now.second,
            "minute": now.minute,
            "hour": now.hour,
            "day": now.day,
            "month": now.month,
            "year": now.year,
        }
        if index == REG_HOURS and not self._cmos[REG_B] & B_24_HOUR:
            pm = bool(value & 0x80)
            hour = self._decode(value & 0x7F) % 12
            decoded = hour + 12 if pm else hour
        else:
            decoded = self._decode(value)
        names = {
            REG_SECONDS: "second",
            REG_MINUTES: "minute",
            REG_HOURS: "hour",
            REG_DAY: "day",
            REG_MONTH: "month",
        }
        if index in names:
            fields[names[index]] = decoded
        elif index == REG_YEAR:
            fields["year"] = now.year // 100 * 100 + decoded
        elif index == REG_CENTURY:
            fields["year"] = decoded * 100 + now.year % 100
        else:
            return  # weekday follows from the date
        try:
            wanted = datetime.datetime(tzinfo=datetime.UTC, **fields)
        except ValueError:
            return  # an impossible date (e.g. 31 February) is ignored
        # From the date shown, not by the difference: past year 9999 the date shown is 400-year
        # cycles behind the guest's seconds, and the difference would keep those cycles.
        self._offset = (wanted - _EPOCH).total_seconds() - self._clock()

    def save(self) -> CmosRtcState:
        return CmosRtcState(self._index, bytes(self._cmos), self._offset)

    def restore(self, state: CmosRtcState) -> None:
        if len(state.cmos) != 128 or not 0 <= state.index < 0x80:
            raise RestoreError("saved CMOS state must hold 128 bytes and an index below 0x80")
        if not math.isfinite(state.offset_seconds):
            raise RestoreError(f"saved CMOS clock offset {state.offset_seconds} is not a number of seconds")
        self._index, self._cmos, self._offset = (
            state.index,
            bytearray(state.cmos),
            float(state.offset_seconds),
        )


__all__ = ["CmosRtc", "CmosRtcState"]
