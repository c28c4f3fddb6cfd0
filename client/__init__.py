"""twostage client: generated stubs (`twostage.v1`), a thin typed client, and the `twostage` CLI.

Layout: `types` (the results and options, plain dataclasses), `convert` (them to and from protobuf),
`channel` (target, TLS, retry and load-balancing settings of the gRPC channel), `client` (Client and
AsyncClient), `cli` / `output` / `progress` (the command line), `demo`, `evaluate` (`twostage evaluate`) with
`beir` (reading BEIR-layout folders) and `ir_metrics` (nDCG, recall; also used by bench/).

The client names below are imported on first use, so that `twostage --help` (which imports this
package) does not pay for loading gRPC and protobuf.
"""
from __future__ import annotations

import importlib

_MODULE_OF = {
    **dict.fromkeys(("AsyncClient", "Client"), "twostage.client.client"),
    **dict.fromkeys(("ClientOptions", "RetryPolicy"), "twostage.client.channel"),
    **dict.fromkeys((
        "BatchingInfo", "Defaults", "DeleteResult", "Document", "EmbedResult", "IndexInfo", "Info", "Limits",
        "ModelInfo", "RerankOptions", "RerankResult", "RerankResults", "SearchHit", "SearchOptions", "SearchResult",
        "StageTiming", "Timing", "TwoStageError", "UpsertResult", "to_jsonable"), "twostage.client.types"),
}
__all__ = list(_MODULE_OF)


def __getattr__(name: str) -> object:
    if name in _MODULE_OF:
        return getattr(importlib.import_module(_MODULE_OF[name]), name)
    raise AttributeError(f"module 'twostage.client' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
