"""The one error type of the wire contract.

Every violation (a bad field in a JSON message, a malformed delta container) raises
``ContractError(field, expected, got)``. The message names the field and what was expected,
e.g. ``unit.hyper.lr: expected a finite number > 0, got -1``; ``to_dict()`` gives the body
that the coordinator sends back with a 4xx status (see docs/protocol.md).
"""
from __future__ import annotations

GOT_CHARS = 80  # longest rendering of the offending value kept in a message


class _Missing:
    """Sentinel for a required field that is absent; shows as ``nothing``."""

    def __repr__(self) -> str:
        return "nothing"


MISSING = _Missing()


class Said(str):
    """A ``got`` value that is a description, shown without quotes (``got 12 bytes``)."""

    def __repr__(self) -> str:
        return str(self)


def show(value: object) -> str:
    """Short ``repr`` of an offending value, truncated so a message never echoes a payload."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"{len(value)} bytes"
    text = repr(value)
    return text if len(text) <= GOT_CHARS else text[: GOT_CHARS - 3] + "..."


class ContractError(ValueError):
    """A message or delta that breaks the wire contract.

    ``field`` is a dotted path (``unit.lr``, ``result.delta``, ``delta.tensors[fc.bias].shape``),
    ``expected`` says what the contract wants, ``got`` is the offending value (or a ``Said``
    description), ``code`` is the machine-readable error code of the HTTP error body.
    """

    def __init__(self, field: str, expected: str, got: object, *, code: str = "invalid") -> None:
        self.field = field
        self.expected = expected
        self.got = got
        self.code = code
        super().__init__(f"{field}: expected {expected}, got {show(got)}")

    @property
    def message(self) -> str:
        return str(self)

    def to_dict(self) -> dict:
        """The ``error`` object of the HTTP error body."""
        return {"code": self.code, "field": self.field, "message": self.message}


def error_body(err: ContractError) -> dict:
    """``{"error": {"code", "field", "message"}}``: the JSON body of a 4xx response."""
    return {"error": err.to_dict()}
