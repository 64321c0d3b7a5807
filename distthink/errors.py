"""Every error a user can cause is a DistthinkError with a message that says what to do.

Data errors carry where they happened (file, line, field) so that the message points at the exact spot.
"""

from __future__ import annotations


class DistthinkError(Exception):
    """Base class. The message must say what is wrong *and* how to fix it."""


class ConfigError(DistthinkError):
    """A config key is unknown, has the wrong type, or the combination is impossible."""


class DataError(DistthinkError):
    """A sample is malformed. Names the source file, the line/row, the field and the fix."""

    def __init__(self, message: str, *, source: str | None = None, line: int | None = None,
                 field: str | None = None, fix: str | None = None, reason: str | None = None):
        self.source, self.line, self.field, self.fix = source, line, field, fix
        # `reason` is a short stable key ("unknown_role", ...) used by skip-and-count reports.
        self.reason = reason or "invalid_sample"
        self.bare_message = message
        where = []
        if source is not None:
            where.append(str(source))
        if line is not None:
            where.append(f"line {line}")
        if field is not None:
            where.append(f"field '{field}'")
        text = (": ".join([", ".join(where), message]) if where else message)
        if fix:
            text += f". Fix: {fix}"
        super().__init__(text)

    def __reduce__(self):
        # Rebuilt from its parts, not from the formatted text: errors travel back from encoding workers
        # (distthink/data/parallel_encode.py) and must keep `reason`, `line` and the message as they were.
        return (_rebuild_data_error, (type(self), self.bare_message, {"source": self.source, "line": self.line,
                                                                     "field": self.field, "fix": self.fix,
                                                                     "reason": self.reason}))


def _rebuild_data_error(cls, message: str, parts: dict) -> DataError:
    return cls(message, **parts)


class LabelAuditError(DistthinkError):
    """Labels equal input_ids everywhere: the prompt would be trained. Refused unless explicitly allowed."""


class CheckpointError(DistthinkError):
    """A checkpoint is missing files, has the wrong shapes or cannot be loaded."""
