"""What the console prints when it stops on an error it did not expect.

Textual prints such an error as a traceback *with the local variables of every frame*: the HTTP
client's headers, and so the token, among them. The console prints it without them, and with the
token (and any bearer value) blanked out of the messages, so that a crash report can be pasted
anywhere.
"""

from __future__ import annotations

from collections.abc import Iterable

import rich
from rich.console import RenderableType
from rich.traceback import Trace, Traceback

from .data import redact


def _redact_trace(trace: Trace, secrets: tuple[str | None, ...]) -> None:
    for stack in trace.stacks:
        stack.exc_value = redact(stack.exc_value, secrets)
        stack.notes = [redact(note, secrets) for note in stack.notes]
        if stack.syntax_error is not None:
            stack.syntax_error.line = redact(stack.syntax_error.line, secrets)
            stack.syntax_error.msg = redact(stack.syntax_error.msg, secrets)
        for frame in stack.frames:
            frame.locals = None
            frame.line = redact(frame.line, secrets)
        for group in stack.exceptions:
            _redact_trace(group, secrets)


def crash_report(error: BaseException, secrets: Iterable[str | None] = ()) -> Traceback:
    """``error``'s traceback (its causes included) without local variables, secrets blanked."""
    trace = Traceback.extract(type(error), error, error.__traceback__, show_locals=False)
    _redact_trace(trace, tuple(secrets))
    return Traceback(trace, show_locals=False, width=None, suppress=[rich])


def safe_renderable(renderable: RenderableType | BaseException, secrets: Iterable[str | None] = ()) -> RenderableType:
    """What may be printed in place of ``renderable``: an exception or a traceback becomes a
    :func:`crash_report`-like one; anything else is kept."""
    if isinstance(renderable, BaseException):
        return crash_report(renderable, secrets)
    if isinstance(renderable, Traceback):
        _redact_trace(renderable.trace, tuple(secrets))
        renderable.show_locals = False
        return renderable
    return renderable
