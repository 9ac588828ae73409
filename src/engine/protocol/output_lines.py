"""How a slave's logging records travel on its output pipe (pure): one line each,
``\\x1elog LEVEL logger: message``, so the node can log them at their level
(engine/pool/output_log.py) among the plain lines of ``print`` and C libraries.
Shared by both sides, as the rest of this package."""
from __future__ import annotations

import logging

RECORD_MARK = "\x1elog "
_LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARNING": logging.WARNING,
           "ERROR": logging.ERROR, "CRITICAL": logging.CRITICAL}


def record_line(level: str, logger: str, message: str) -> str:
    """The line a slave writes for one logging record (its own newlines indented: the
    node reads lines, and the continuation lines stay plain INFO)."""
    return f"{RECORD_MARK}{level} {logger}: " + message.replace("\n", "\n  ")


def parse_line(text: str) -> tuple[int, str]:
    """(logging level, text) of one output line: a record's level, else INFO."""
    if text.startswith(RECORD_MARK):
        level, _, rest = text[len(RECORD_MARK):].partition(" ")
        if level in _LEVELS:
            return _LEVELS[level], rest
    return logging.INFO, text
