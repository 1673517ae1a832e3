"""The wire contract shared by the coordinator, the Python worker and (in JavaScript) the browser.

Standard library and numpy only: never torch, aiohttp, or the coordinator/worker packages.
``contract.units`` holds the JSON messages, ``contract.codecs`` the delta codecs and the
binary container, ``contract.errors`` the one error type. docs/protocol.md is the spec.
"""
from contract.codecs import CODEC_IDS, CODECS, Codec, decode_delta, delta_norm, encode_delta, get_codec, spec_of
from contract.errors import ContractError, error_body
from contract.units import (PROTOCOL_VERSION, UnitRequest, UnitResult, WorkUnit, blob_id, check_result,
                            pack_result, staleness, unpack_result)

__all__ = [
    "CODEC_IDS", "CODECS", "Codec", "decode_delta", "delta_norm", "encode_delta", "get_codec", "spec_of",
    "ContractError", "error_body",
    "PROTOCOL_VERSION", "UnitRequest", "UnitResult", "WorkUnit", "blob_id", "check_result",
    "pack_result", "staleness", "unpack_result",
]
