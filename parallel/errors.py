"""Typed errors of the engine, raised where they arise and never recognised by their text.

Every error a request can meet carries what a server needs to answer it: whether it is the client's mistake
(``InvalidRequestError``: the field in ``param``, an OpenAI ``code``), a failure of that one request inside
the engine (``RequestFailedError``), or of the engine as a whole (``EngineDeadError``, ``EngineOverloadedError``).
The serving layer maps these classes to HTTP statuses; the engine knows nothing of HTTP.

Example:
    >>> err = ContextLengthError("prompt has 9000 tokens", param="prompt")
    >>> (err.param, err.code, isinstance(err, ValueError))
    ('prompt', 'context_length_exceeded', True)
"""

from __future__ import annotations


class EngineError(Exception):
    """Base of every error the engine raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __reduce__(self):  # keep the subclass and its fields across pickling (process and Ray boundaries)
        return (_rebuild, (type(self), self.__dict__.copy()))


def _rebuild(cls: type[EngineError], state: dict) -> EngineError:
    err = cls.__new__(cls)
    Exception.__init__(err, state.get("message", ""))
    err.__dict__.update(state)
    return err


class InvalidRequestError(EngineError, ValueError):
    """The request itself is wrong (a bad field, a prompt the engine cannot hold): the client's mistake.

    ``param`` names the offending field in the OpenAI request when it is known; ``code`` is OpenAI's
    machine-readable code (None for a generic invalid request). Subclasses ValueError so offline callers
    that catch ValueError keep working.
    """

    code: str | None = None

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        if code is not None:
            self.code = code


class ContextLengthError(InvalidRequestError):
    """Prompt (plus max_tokens) does not fit the model's context length or the KV cache."""

    code = "context_length_exceeded"


class RequestFailedError(EngineError):
    """One request failed inside the engine (sampling, detokenising, a stop matcher...): that request alone
    is finished; the engine and the rest of its batch go on."""


class EngineDeadError(EngineError):
    """The engine (its loop, process or a rank) is gone; requests in flight cannot finish. Retryable: the
    engine is being restarted or its replica replaced."""


class EngineOverloadedError(EngineError):
    """Admission refused: the queue is too long or its expected wait too high. ``retry_after_s`` hints when
    to come back."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
