"""twostage client: generated stubs (`twostage.v1`), a thin typed client, and the `twostage` CLI.

The client names below are imported on first use, so that `twostage --help` (which imports this
package) does not pay for loading gRPC and protobuf.
"""
from __future__ import annotations

import importlib
from typing import Any

_CLIENT_NAMES = (
    "AsyncClient", "BatchingInfo", "Client", "Defaults", "DeleteResult", "Document", "EmbedResult", "IndexInfo",
    "Info", "Limits", "ModelInfo", "RerankResult", "RerankResults", "RetryPolicy", "SearchHit", "SearchResult",
    "StageTiming", "Timing", "TwoStageError", "UpsertResult", "to_jsonable",
)
__all__ = list(_CLIENT_NAMES)


def __getattr__(name: str) -> Any:
    if name in _CLIENT_NAMES:
        return getattr(importlib.import_module("twostage.client.client"), name)
    raise AttributeError(f"module 'twostage.client' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
