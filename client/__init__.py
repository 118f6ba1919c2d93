"""gRPC client library over tritonclient and the mmgpt-client command.

    from mmgpt.client import MMGPTClient
    print(MMGPTClient("localhost:8001").ask("What is this?", image="cat.jpg").text)
"""

from mmgpt.client.api import (
    DEFAULT_URL,
    AnswerStream,
    ClientError,
    Health,
    InvalidInput,
    MMGPTClient,
    Piece,
    RequestFailed,
    RequestRejected,
    ResponseTimeout,
    Result,
    ServerBusy,
    ServerUnavailable,
)

__all__ = [
    "DEFAULT_URL",
    "AnswerStream",
    "ClientError",
    "Health",
    "InvalidInput",
    "MMGPTClient",
    "Piece",
    "RequestFailed",
    "RequestRejected",
    "ResponseTimeout",
    "Result",
    "ServerBusy",
    "ServerUnavailable",
]
