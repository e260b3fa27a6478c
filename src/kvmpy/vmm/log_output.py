"""kvmpy's own log to a file or FIFO, as Firecracker's PUT /logger configures it."""

from __future__ import annotations

import fcntl
import logging
import os

from kvmpy.errors import ConfigError
from kvmpy.vmm.config import LoggerConfig

#: Firecracker's level names -> Python's (Trace has no Python level: it is Debug here).
LEVELS = {
    "off": logging.CRITICAL + 10,
    "error": logging.ERROR,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
    "trace": logging.DEBUG,
}

_handler: logging.Handler | None = None


def open_for_append(path: os.PathLike[str] | str, what: str) -> int:
    """A file or FIFO opened for appending; a FIFO without a reader is an error, not a hang."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as error:
        raise ConfigError(f"cannot open the {what} file {path}: {error.strerror}") from None
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
    return fd


def configure_logger(config: LoggerConfig) -> None:
    """Send the ``kvmpy`` loggers to ``config.path`` at ``config.level`` (replacing an earlier one)."""
    global _handler
    level = LEVELS.get(config.level.lower())
    if level is None:
        names = "Error, Warning, Info, Debug, Trace or Off"
        raise ConfigError(f"invalid log level {config.level!r}: use {names}")
    root = logging.getLogger("kvmpy" if not config.module else f"kvmpy.{config.module}")
    if config.path is not None:
        stream = os.fdopen(open_for_append(config.path, "log"), "a", buffering=1)
        handler: logging.Handler = logging.StreamHandler(stream)
        parts = ["%(asctime)s"]
        if config.show_level:
            parts.append("[%(levelname)s]")
        if config.show_log_origin:
            parts.append("[%(name)s %(filename)s:%(lineno)d]")
        handler.setFormatter(logging.Formatter(" ".join(parts) + " %(message)s"))
        if _handler is not None:
            logging.getLogger("kvmpy").removeHandler(_handler)
            _handler.close()
        _handler = handler
        root.addHandler(handler)
    root.setLevel(level)


__all__ = ["LEVELS", "configure_logger", "open_for_append"]
