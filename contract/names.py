"""The display-name request: ``POST /api/v1/workers/<worker_id>/name`` (docs/protocol.md).

A worker (a browser tab, or ``crowdtrain worker --name``) may show a display name on the
coordinator's public leaderboard instead of an anonymous tag. The body is
``{"protocol": 1, "name": "Ada"}``; ``"name": null`` clears it. A name is untrusted text shown
to everyone, so the rule is strict and the same in Python and JavaScript
(worker_web/contract.js ``checkNameRequest``, tested against tests/golden/names.json):
1 to ``NAME_MAX_CHARS`` code points, no control, format, separator, bidi or zero-width
characters (they can hide or reorder text), no lone surrogates, and no space at either end.
Whoever shows a name still escapes it as HTML.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from contract.errors import ContractError
from contract.units import PROTOCOL_VERSION, _from_json, _protocol

NAME_MAX_CHARS = 32
# C0 and C1 controls, soft hyphen, Arabic letter mark, Mongolian vowel separator, zero-width and
# bidi marks, line/paragraph separators, bidi embeddings and isolates, invisible operators,
# byte-order mark, interlinear annotations, non-characters, and surrogates (lone ones in a str)
FORBIDDEN_RE = re.compile("[\x00-\x1f\x7f-\x9f\u00ad\u061c\u180e\u200b-\u200f\u2028-\u202e\u2060-\u206f"
                          "\ufeff\ufff9-\ufffb\ufffe\uffff\ud800-\udfff]")
SPACES = " \u00a0\u1680\u2000-\u200a\u202f\u205f\u3000"
EDGE_SPACE_RE = re.compile(f"^[{SPACES}]|[{SPACES}]\\Z")
NAME_RULE = (f"null or 1 to {NAME_MAX_CHARS} printable characters (no control, format or invisible characters), "
             "not starting or ending with a space")


def check_name(field: str, value: object) -> str | None:
    """``value`` if it is a valid display name (or None, no name); ``ContractError`` naming ``field`` otherwise."""
    if value is None:
        return None
    ok = (isinstance(value, str) and 1 <= len(value) <= NAME_MAX_CHARS and FORBIDDEN_RE.search(value) is None
          and EDGE_SPACE_RE.search(value) is None)
    if not ok:
        raise ContractError(field, NAME_RULE, value)
    return value


@dataclass(frozen=True)
class NameRequest:
    """Body of ``POST /api/v1/workers/<worker_id>/name``: the display name, or None to clear it."""

    name: str | None
    protocol: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        _protocol("name_request", self.protocol)
        check_name("name_request.name", self.name)

    def to_json(self) -> dict:
        return {"protocol": self.protocol, "name": self.name}

    @classmethod
    def from_json(cls, d: object) -> "NameRequest":
        return _from_json(cls, "name_request", d)
