"""The `twostage` command line.

    twostage export        export the models to optimized int8 ONNX      (twostage.export.cli)
    twostage index build   build an index from a corpus file             (twostage.server.cli)
    twostage serve         run the gRPC server                           (twostage.server.cli)
    twostage search        search a running server
    twostage rerank        rerank texts or stored documents on a running server
    twostage info          models, limits and index state of a running server
    twostage evaluate      quality and latency of each mode and of reranking on judged queries; --tune
    twostage demo          export, index, serve and compare, from nothing

Only the chosen subcommand's module is imported (and only its options are built), so `twostage --help`
stays fast and the serving install (no torch) runs serve/search/rerank/info. A subcommand whose module
cannot be imported still shows in --help and says why when used.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the client is imported only when a client command runs (keeps --help fast)
    from twostage.client.client import Client

DEFAULT_TARGET = "127.0.0.1:50051"  # same as twostage.client.channel.DEFAULT_TARGET (not imported: keeps --help fast)
EXIT_FAILURE = 1


@dataclass(frozen=True)
class Command:
    """A subcommand: `module` provides `add_name(parser)` and `run_name(args) -> int | None`."""
    name: str
    help: str
    module: str
    add_name: str
    run_name: str


COMMANDS = (
    Command("export", "export the bi-encoder and cross-encoder to optimized int8 ONNX model directories",
            "twostage.export.cli", "add_arguments", "run"),
    Command("serve", "run the gRPC server", "twostage.server.cli", "add_serve_arguments", "run_serve"),
    Command("search", "search a running server (two-stage: retrieve, then rerank)",
            "twostage.client.cli", "add_search_arguments", "run_search"),
    Command("rerank", "score texts or stored documents against a query on a running server",
            "twostage.client.cli", "add_rerank_arguments", "run_rerank"),
    Command("info", "show the models, limits, batching and index state of a running server",
            "twostage.client.cli", "add_info_arguments", "run_info"),
    Command("evaluate", "measure nDCG@10, recall@100 and latency of each retrieval mode and of reranking on a "
            "BEIR-layout folder of judged queries; --tune chooses the settings and writes a server config",
            "twostage.client.evaluate", "add_arguments", "run"),
    Command("demo", "export the packaged models, index the sample corpus, serve it and compare bi-encoder-only "
            "with reranked results", "twostage.client.demo", "add_arguments", "run"),
)
INDEX_COMMANDS = (
    Command("build", "build an index directory from a corpus file (offline, no server needed)",
            "twostage.server.cli", "add_index_build_arguments", "run_index_build"),
)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32)


# ------------------------------------------------------------------------------- parser building


def _wire(parser: argparse.ArgumentParser, command: Command) -> None:
    """Import the command's module and let it add its options; on failure, make the command explain."""
    try:
        module = importlib.import_module(command.module)
        add = getattr(module, command.add_name)
        run = getattr(module, command.run_name)
    except (ImportError, AttributeError) as exc:
        reason = f"cannot load {command.module}.{command.add_name}/{command.run_name}: {type(exc).__name__}: {exc}"
        parser.description = f"{command.help}\n\nUNAVAILABLE in this installation: {reason}"
        parser.set_defaults(func=_unavailable(parser.prog, reason), accepts_extra=True)
        return
    add(parser)
    parser.set_defaults(func=run)


def _unavailable(prog: str, reason: str) -> Callable[[argparse.Namespace], int]:
    def explain(args: argparse.Namespace) -> int:
        hint = ""
        if "twostage.export" in reason:
            hint = "\nhint: the export step needs the export extra: pip install 'twostage[export,models]'"
        print(f"{prog}: unavailable: {reason}{hint}", file=sys.stderr)
        return EXIT_FAILURE
    return explain


def _first_positional(argv: list[str]) -> list[str]:
    """The leading non-option words of argv (the subcommand path)."""
    words = []
    for word in argv:
        if word.startswith("-"):
            break
        words.append(word)
    return words


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("twostage")
    except PackageNotFoundError:
        return "unknown"


class _VersionAction(argparse.Action):
    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        print(f"twostage {_version()}")
        parser.exit()


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The full parser, with options built only for the subcommand named in argv."""
    path = _first_positional(argv)
    parser = argparse.ArgumentParser(prog="twostage", formatter_class=_Formatter,
                                     description="twostage: two-stage retrieval (bi-encoder + usearch, then "
                                                 "cross-encoder reranking) over gRPC.",
                                     epilog="Run `twostage COMMAND --help` for the options of each command.")
    parser.add_argument("--version", action=_VersionAction)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS[:1]:
        _add_command(sub, command, selected=path[:1] == [command.name])
    index = sub.add_parser("index", help="index maintenance (index build ...)", formatter_class=_Formatter,
                           description="Index maintenance.")
    index_sub = index.add_subparsers(dest="index_command", metavar="INDEX_COMMAND", required=True)
    for command in INDEX_COMMANDS:
        _add_command(index_sub, command, selected=path[:2] == ["index", command.name])
    for command in COMMANDS[1:]:
        _add_command(sub, command, selected=path[:1] == [command.name])
    return parser


def _add_command(sub: Any, command: Command, *, selected: bool) -> None:
    parser = sub.add_parser(command.name, help=command.help, description=command.help, formatter_class=_Formatter)
    if selected:
        _wire(parser, command)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        code = args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # the client's errors and clear setup errors: one line, no traceback
        from_client = type(exc).__name__ == "TwoStageError"
        if not (from_client or isinstance(exc, (RuntimeError, ValueError, OSError))):
            raise
        print(f"twostage {args.command}: error: {exc}", file=sys.stderr)
        if from_client and getattr(getattr(exc, "code", None), "name", "") == "UNAVAILABLE":
            target = getattr(args, "target", "?")
            if "unhealthy" in str(exc):     # reachable, but its health service does not say SERVING
                print(f"hint: the server at {target} is up but its health check does not say SERVING (still "
                      "loading, or its backend is unreachable); with --no-health-check the call reaches it and "
                      "gets its reason", file=sys.stderr)
            else:
                print(f"hint: is a server running at {target}?", file=sys.stderr)
        return EXIT_FAILURE
    return int(code or 0)


# ----------------------------------------------------------------------------- client subcommands


def add_connection_arguments(parser: argparse.ArgumentParser, json_flag: bool = True) -> None:
    """--target, --api-key, TLS and deadline options shared by search, rerank, info and evaluate; `json_flag` adds
    --json (print the result as JSON)."""
    group = parser.add_argument_group("connection")
    group.add_argument("--target", default=os.environ.get("TWOSTAGE_TARGET", DEFAULT_TARGET),
                       help="server address host:port; replicas as IP:PORT,IP:PORT,... or dns:///NAME:PORT (every "
                            "address of the name), called round robin with retries on the others "
                            f"(default: {DEFAULT_TARGET}; env TWOSTAGE_TARGET)")
    group.add_argument("--api-key", default=None,
                       help="API key, sent as 'authorization: Bearer KEY' (default: env TWOSTAGE_API_KEY, else none)")
    group.add_argument("--tls", action="store_true",
                       help="use TLS with the system trust store (default: plaintext unless a --tls-* option is given)")
    group.add_argument("--tls-ca", metavar="FILE", default=None,
                       help="PEM CA bundle to verify the server with (default: the system trust store); implies TLS")
    group.add_argument("--tls-cert", metavar="FILE", default=None,
                       help="PEM client certificate for mutual TLS, with --tls-key (default: none)")
    group.add_argument("--tls-key", metavar="FILE", default=None,
                       help="PEM client private key for mutual TLS, with --tls-cert (default: none)")
    group.add_argument("--tls-server-name", metavar="NAME", default=None,
                       help="name to verify in the server certificate instead of the target host (default: the host)")
    group.add_argument("--timeout", type=float, default=30.0,
                       help="deadline of the call in seconds, retries included (default: 30)")
    group.add_argument("--max-attempts", type=int, default=4, choices=range(1, 6), metavar="{1..5}",
                       help="attempts when the server is UNAVAILABLE, with jittered exponential backoff, done by "
                            "gRPC (default: 4)")
    group.add_argument("--no-health-check", dest="health_check", action="store_false",
                       help="call servers whatever their health service reports (default: call only servers whose "
                            "health service reports twostage.v1.TwoStage SERVING; a server without one counts as "
                            "serving)")
    if json_flag:
        parser.add_argument("--json", action="store_true",
                            help="print the result as JSON, leaving out fields the server left empty (default: a "
                                 "table; ranks count from 0 in both)")


def client_from_args(args: argparse.Namespace) -> Client:
    from twostage.client.client import Client
    api_key = args.api_key if args.api_key is not None else os.environ.get("TWOSTAGE_API_KEY") or None
    return Client(args.target, timeout=args.timeout, api_key=api_key, tls=args.tls, root_certs=args.tls_ca,
                  client_cert=args.tls_cert, client_key=args.tls_key, server_name=args.tls_server_name,
                  max_attempts=args.max_attempts, health_check=args.health_check)


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc.msg}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError('must be a JSON object, e.g. \'{"topic": "astronomy"}\'')
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (got {value})")
    return value


def _unit_interval(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (got {value})")
    return value


def add_search_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (f"{parser.description}\n\nRanks count from 0, in the table as in --json and the proto: "
                          "rank is the hit's position\nin the answer, retrieval_rank its position among the stage-1 "
                          "candidates.")
    parser.add_argument("query", help="the query text")
    parser.add_argument("--top-k", type=_non_negative, default=0,
                        help="hits to return (default: 0 = the server's default, 10 unless configured)")
    parser.add_argument("--candidates", type=_non_negative, default=0,
                        help="stage-1 candidates to retrieve and rerank (default: 0 = the server's default, 20)")
    parser.add_argument("--skip-rerank", action="store_true",
                        help="stage 1 only: rank by bi-encoder similarity, no cross-encoder (default: rerank)")
    parser.add_argument("--filter", type=_json_object, default=None, metavar="JSON",
                        help='metadata equality filter as a JSON object, e.g. \'{"topic": "astronomy"}\' '
                             '(default: none)')
    parser.add_argument("--ids-only", action="store_true",
                        help="return ids and scores only, no text or metadata (default: full documents)")
    parser.add_argument("--mode", choices=("dense", "lexical", "hybrid"), default="",
                        help="stage-1 retrieval: dense (bi-encoder), lexical (BM25) or hybrid (both, fused) "
                             "(default: the server's, hybrid unless configured)")
    parser.add_argument("--fusion", choices=("convex", "rrf"), default="",
                        help="how hybrid retrieval fuses its two lists (default: the server's, convex)")
    parser.add_argument("--fusion-weight", type=_unit_interval, default=None, metavar="W",
                        help="convex fusion: weight of the dense list, 0-1 (default: the server's)")
    parser.add_argument("--rerank-weight", type=_unit_interval, default=None, metavar="W",
                        help="weight of the cross-encoder in the final score, 0-1; 1 = cross-encoder alone "
                             "(default: the server's rule, query-adaptive unless configured)")
    parser.add_argument("--latency-budget-ms", type=_non_negative, default=0,
                        help="latency budget for the whole request in ms: reranking is cut short rather than late "
                             "(default: 0 = the server's default)")
    parser.add_argument("--rerank-budget-ms", type=_non_negative, default=0,
                        help="deprecated alias of --latency-budget-ms (default: 0 = none)")
    parser.add_argument("--raw-scores", action="store_true",
                        help="raw cross-encoder logits instead of normalized scores (default: normalized)")
    parser.add_argument("--max-query-tokens", type=_non_negative, default=0,
                        help="cap on query tokens (default: 0 = the model's limit)")
    parser.add_argument("--max-document-tokens", type=_non_negative, default=0,
                        help="cap on document tokens for reranking (default: 0 = the model's limit)")
    parser.add_argument("--expansion-search", type=_non_negative, default=0,
                        help="HNSW expansion factor for this search (default: 0 = the index's setting)")
    add_connection_arguments(parser)


def run_search(args: argparse.Namespace) -> int:
    from twostage.client.output import print_json, search_table
    with client_from_args(args) as client:
        result = client.search(args.query, top_k=args.top_k, candidates=args.candidates, skip_rerank=args.skip_rerank,
                               filter=args.filter, ids_only=args.ids_only, rerank_budget_ms=args.rerank_budget_ms,
                               raw_scores=args.raw_scores, max_query_tokens=args.max_query_tokens,
                               max_document_tokens=args.max_document_tokens, expansion_search=args.expansion_search,
                               retrieval_mode=args.mode, fusion=args.fusion, fusion_weight=args.fusion_weight,
                               rerank_weight=args.rerank_weight, latency_budget_ms=args.latency_budget_ms)
    if args.json:
        print_json(result, sys.stdout)
    else:
        print(search_table(result))
    return 0


def add_rerank_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("query", help="the query text")
    source = parser.add_argument_group("documents (give texts with --doc/--docs-file, or stored ids with --ids)")
    source.add_argument("--doc", action="append", default=[], metavar="TEXT",
                        help="a document text; repeat for more (default: none)")
    source.add_argument("--docs-file", type=Path, default=None, metavar="FILE",
                        help="a file with one document text per line, '-' for standard input; blank lines are "
                             "skipped (default: none)")
    source.add_argument("--ids", action="append", default=[], metavar="ID[,ID...]",
                        help="ids of stored documents, comma-separated or repeated (default: none)")
    parser.add_argument("--top-n", type=_non_negative, default=0, help="return only the best N (default: 0 = all)")
    parser.add_argument("--return-documents", action="store_true",
                        help="ask the server to include each document's text (default: off; the table shows the "
                             "texts you sent anyway)")
    parser.add_argument("--raw-scores", action="store_true",
                        help="raw logits instead of normalized scores (default: normalized)")
    parser.add_argument("--no-truncate", action="store_true",
                        help="refuse over-long pairs with INVALID_ARGUMENT instead of truncating (default: truncate)")
    parser.add_argument("--max-query-tokens", type=_non_negative, default=0,
                        help="cap on query tokens (default: 0 = the model's limit)")
    parser.add_argument("--max-document-tokens", type=_non_negative, default=0,
                        help="cap on document tokens (default: 0 = the model's limit)")
    parser.add_argument("--chunk-long-documents", action="store_true",
                        help="split long documents into overlapping chunks and score each by its best chunk "
                             "(default: off)")
    parser.add_argument("--chunk-overlap-tokens", type=_non_negative, default=0,
                        help="overlap between chunks in tokens (default: 0 = the server's default, 32)")
    parser.add_argument("--latency-budget-ms", type=_non_negative, default=0,
                        help="latency budget for the whole request in ms: as many documents as fit are scored, the "
                             "rest come back unscored after them (default: 0 = the server's default)")
    add_connection_arguments(parser)


def rerank_inputs(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """(texts, ids) from --doc, --docs-file and --ids; exactly one kind must be given."""
    texts = list(args.doc)
    if args.docs_file is not None:
        if str(args.docs_file) == "-":
            lines = sys.stdin.read().splitlines()
        else:
            try:
                lines = args.docs_file.read_text(encoding="utf-8").splitlines()
            except OSError as exc:
                raise ValueError(f"--docs-file {args.docs_file}: {exc.strerror}") from exc
        texts.extend(line for line in lines if line.strip())
    ids = [part.strip() for item in args.ids for part in item.split(",") if part.strip()]
    if texts and ids:
        raise ValueError("give document texts (--doc/--docs-file) or stored ids (--ids), not both")
    if not texts and not ids:
        raise ValueError("no documents: give --doc TEXT, --docs-file FILE or --ids ID[,ID...]")
    return texts, ids


def run_rerank(args: argparse.Namespace) -> int:
    from twostage.client.output import print_json, rerank_table
    texts, ids = rerank_inputs(args)
    with client_from_args(args) as client:
        results = client.rerank(args.query, texts or None, document_ids=ids or None, top_n=args.top_n,
                                return_documents=args.return_documents, raw_scores=args.raw_scores,
                                truncate=not args.no_truncate, max_query_tokens=args.max_query_tokens,
                                max_document_tokens=args.max_document_tokens,
                                chunk_long_documents=args.chunk_long_documents,
                                chunk_overlap_tokens=args.chunk_overlap_tokens,
                                latency_budget_ms=args.latency_budget_ms)
    if args.json:
        print_json(results, sys.stdout)
    else:
        print(rerank_table(results, texts))
    return 0


def add_info_arguments(parser: argparse.ArgumentParser) -> None:
    add_connection_arguments(parser)


def run_info(args: argparse.Namespace) -> int:
    from twostage.client.output import info_text, print_json
    with client_from_args(args) as client:
        info = client.info()
    if args.json:
        print_json(info, sys.stdout)
    else:
        print(info_text(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
