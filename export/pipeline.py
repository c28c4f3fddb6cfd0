"""One export, source to verified model directory, and the model set (bi-encoder + cross-encoder).

    source --(1) export to ONNX / validate--> graph --(2) [rebuild fp32 from an int8 source,] optimize
           --> model_fp32.onnx --(3) static int8 quantization--> model.onnx [both: first token only past the
           last attention, first_token.py] --(4) accuracy gate --> (5) manifest.json, atomic rename

The served int8 model is batch-invariant: its activation scales are fixed at export time (see int8.py), so a
row's output does not depend on the rest of its batch; the gate measures this (batch_variation) and checks it.

Work happens in `.tmp-<role>-<pid>-*` directories beside the target, renamed into place only once the
manifest verifies, so a crash never leaves a half-written model directory. A re-run whose inputs
(source revision, configuration, options, calibration set, tool versions) are unchanged and whose output
still verifies is skipped.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

from twostage.model.manifest import (
    FORMAT as MANIFEST_FORMAT,
    MANIFEST_NAME,
    ROLES,
    ManifestError,
    sha256_file,
    verify_model_dir,
)

from . import gate as gates
from .cpu import detect_target, target_settings
from .errors import ExportError, GateFailed
from .manifest import write_manifest
from .modelinfo import (
    TOKENIZER_FILES,
    PoolingInfo,
    choose_positive_label,
    copy_tokenizer_files,
    ensure_fast_tokenizer,
    given_pooling,
    label_names,
    read_json,
    read_max_length,
    read_pooling,
    read_query_prefix,
)
from .sources import Source

# Bump when the steps change in a way that should rebuild existing model directories.
EXPORTER_VERSION = 6  # 3: the gate's sessions leave out DISABLED_OPTIMIZERS, as the server does;
                      # 4: first-token readouts compute only the first token past the last attention;
                      # 5: the gate runs its models through the model layer (the server's tokenization, sessions);
                      # 6: sources below opset 13 keep their attention fusions (onnx_ops.with_softmax_ranks);
                      # bi-encoder manifests record query_prefix
TOOL_PACKAGES = ("twostage", "onnxruntime", "onnx", "optimum", "optimum-onnx", "transformers", "torch",
                 "tokenizers", "huggingface_hub", "numpy")
MODEL_FILE, FP32_FILE, TOKENIZER_FILE = "model.onnx", "model_fp32.onnx", "tokenizer.json"
STEPS = 5
# Largest served-output difference (raw score, or cosine distance for embeddings) an optimized fp32 graph may
# show against its unfused self; exact fusions stay below 1e-5.
FUSION_TOLERANCE = 1e-3


@dataclass(frozen=True)
class ExportOptions:
    quantize: bool = True
    target: str = "auto"  # a cpu.TARGETS name, or auto: the CPU running the export
    opset: int | None = None  # None: optimum's default for the architecture
    thresholds: gates.Thresholds = field(default_factory=gates.Thresholds)
    calibration: Path | None = None  # None: the built-in set
    keep_fp32_on_gate_failure: bool = False
    force: bool = False
    # Bi-encoder facts given on the command line; None: read from the model's files (a given value wins).
    pooling: str | None = None
    normalize: bool | None = None
    query_prefix: str | None = None

    def resolved_target(self) -> str:
        return detect_target() if self.target == "auto" else target_settings(self.target).name


@dataclass(frozen=True)
class ModelFacts:
    """What the served model needs that is read from the source's configuration."""

    max_length: int
    pooling: str | None = None
    normalize: bool = False
    pooling_origin: str | None = None
    labels: list[str] | None = None  # None until known (an ONNX source without config.json)
    model_type: str | None = None
    query_prefix: str | None = None  # bi-encoder: prepended to queries (not documents); "" for none
    query_prefix_origin: str | None = None


@dataclass(frozen=True)
class ExportResult:
    role: str
    path: Path
    skipped: bool
    manifest: dict[str, Any]
    seconds: float


class Progress:
    """Step lines with timings on stderr: `[bi-encoder] 2/5 optimizing ... 3.1 s`."""

    def __init__(self, role: str, stream: TextIO | None = None):
        self.role = role
        self.stream = stream

    def say(self, text: str) -> None:
        print(f"[{self.role}] {text}", file=self.stream or sys.stderr, flush=True)

    @contextlib.contextmanager
    def step(self, number: int, text: str) -> Iterator[None]:
        self.say(f"{number}/{STEPS} {text} ...")
        start = time.perf_counter()
        yield
        self.say(f"{number}/{STEPS} {text} ... {time.perf_counter() - start:.1f} s")


def tool_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for package in TOOL_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def source_manifest(source: Source) -> dict[str, Any] | None:
    """The manifest of a twostage model directory used as an ONNX source, if it is one."""
    data = read_json(source.path / MANIFEST_NAME) if source.format == "onnx" else None
    return data if isinstance(data, dict) and data.get("format") == MANIFEST_FORMAT else None


def read_facts(source: Source) -> ModelFacts:
    """Pooling, normalization, max_length and labels from the source's configuration files."""
    previous = source_manifest(source)
    if previous is not None:
        if previous.get("role") != source.role:
            raise ExportError(f"{source.path / MANIFEST_NAME}: a {previous.get('role')} directory cannot be "
                              f"exported as the {source.role}")
        prefix = previous.get("query_prefix") if source.role == "bi-encoder" else None
        return ModelFacts(previous["max_length"], previous.get("pooling"), bool(previous.get("normalize")),
                          f"{source.path / MANIFEST_NAME}", previous.get("labels"),
                          (previous.get("facts") or {}).get("model_type"), prefix or "",
                          f"{source.path / MANIFEST_NAME}" if prefix else "none")
    hf_config = read_json(source.path / "config.json")
    if hf_config is not None and not isinstance(hf_config, dict):
        raise ExportError(f"{source.path / 'config.json'}: expected a JSON object")
    max_length = read_max_length(source.path, source.role, hf_config)
    model_type = (hf_config or {}).get("model_type")
    if source.role == "bi-encoder":
        info = read_pooling(source.path)
        if info.origin == "default" and source.pooling is not None:  # no sentence-transformers files
            info = source.pooling
        prefix = read_query_prefix(source.path, source.name)
        return ModelFacts(max_length, info.pooling, info.normalize, info.origin, None, model_type, prefix.text,
                          prefix.origin)
    labels = None
    if hf_config and (hf_config.get("id2label") or hf_config.get("num_labels")):
        count = len(hf_config.get("id2label") or {}) or int(hf_config["num_labels"])
        labels = label_names(hf_config, count)
    return ModelFacts(max_length, None, False, None, labels, model_type)


def given_facts(facts: ModelFacts, options: ExportOptions, role: str) -> tuple[ModelFacts, list[str]]:
    """Bi-encoder facts with --pooling / --normalize / --query-prefix applied (a given value wins). Returns the
    facts and a warning for each given value that contradicts what the model's files say."""
    if role != "bi-encoder":
        return facts, []
    read = PoolingInfo(facts.pooling or "mean", facts.normalize, facts.pooling_origin or "default")
    info, warnings = given_pooling(read, options.pooling, options.normalize)
    facts = replace(facts, pooling=info.pooling, normalize=info.normalize, pooling_origin=info.origin)
    if options.query_prefix is not None:
        if facts.query_prefix and options.query_prefix != facts.query_prefix:
            warnings.append(f"--query-prefix {options.query_prefix!r} overrides {facts.query_prefix!r} from "
                            f"{facts.query_prefix_origin}")
        facts = replace(facts, query_prefix=options.query_prefix, query_prefix_origin="--query-prefix")
    return facts, warnings


def source_files_digest(source: Source) -> dict[str, str]:
    """sha256 of the small files that shape the export besides the weights (tokenizer, configs)."""
    names = list(TOKENIZER_FILES) + ["config.json", "modules.json", "sentence_bert_config.json",
                                     "1_Pooling/config.json", "config_sentence_transformers.json", MANIFEST_NAME]
    return {name: sha256_file(source.path / name) for name in names if (source.path / name).is_file()}


def fingerprint_inputs(source: Source, facts: ModelFacts, options: ExportOptions, target: str,
                       calibration_sha: str) -> dict[str, Any]:
    return {
        "exporter_version": EXPORTER_VERSION, "role": source.role,
        "source": {"kind": source.kind, "id": source.id, "revision": source.revision, "format": source.format,
                   "onnx_file": source.onnx_file.name if source.onnx_file else None,
                   "files": source_files_digest(source)},
        "facts": asdict(facts),
        "options": {"quantize": options.quantize, "target": target, "opset": options.opset,
                    "thresholds": asdict(options.thresholds),
                    "keep_fp32_on_gate_failure": options.keep_fp32_on_gate_failure},
        "calibration_sha256": calibration_sha, "tools": tool_versions(),
    }


def fingerprint(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def up_to_date(target_dir: Path, role: str, wanted: str) -> tuple[bool, str]:
    """Whether target_dir verifies and was made from the same inputs. Returns (up to date, why not)."""
    if not target_dir.exists():
        return False, "no previous export"
    try:
        existing = verify_model_dir(target_dir, role)
    except ManifestError as exc:
        return False, f"previous export does not verify ({exc})"
    if existing.manifest.get("fingerprint") != wanted:
        return False, "inputs changed since the previous export"
    return True, ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(out_dir: Path, role: str) -> None:
    """Delete `.tmp-<role>-<pid>-*` directories left by exports that died."""
    prefix = f".tmp-{role}-"
    for path in out_dir.glob(prefix + "*"):
        pid_text = path.name[len(prefix):].split("-", 1)[0]
        if path.is_dir() and pid_text.isdigit() and not _pid_alive(int(pid_text)):
            shutil.rmtree(path, ignore_errors=True)


def _directory_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


def replace_directory(staging: Path, target: Path) -> None:
    """Move the finished staging directory onto target (the previous version is removed afterwards)."""
    old = None
    if target.exists():
        old = target.with_name(f".tmp-{target.name}-{os.getpid()}-old")
        if old.exists():
            shutil.rmtree(old)
        os.rename(target, old)
    os.rename(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_model(source: Source, out_dir: Path, options: ExportOptions,
                 calibration: gates.Calibration | None = None, stream: TextIO | None = None) -> ExportResult:
    """Export one model into out_dir/<role>/ (skipped when up to date). Raises ExportError / GateFailed."""
    from .onnx_ops import working_directory

    started = time.perf_counter()
    role = source.role
    progress = Progress(role, stream)
    out_dir = Path(out_dir).absolute()  # the steps run inside the work directory (working_directory)
    out_dir.mkdir(parents=True, exist_ok=True)
    target_dir = out_dir / role
    cal = calibration if calibration is not None else gates.load_calibration(options.calibration)
    facts, warnings = given_facts(read_facts(source), options, role)
    for warning in warnings:
        progress.say(f"warning: {warning}")
    target = options.resolved_target()
    inputs = fingerprint_inputs(source, facts, options, target, cal.sha256)
    wanted = fingerprint(inputs)
    if not options.force:
        current, why = up_to_date(target_dir, role, wanted)
        if current:
            progress.say(f"up to date: {target_dir} (same source revision, options and tools; --force rebuilds)")
            manifest = verify_model_dir(target_dir, role).manifest
            return ExportResult(role, target_dir, True, manifest, time.perf_counter() - started)
        progress.say(f"exporting: {why}")
    remove_stale_staging(out_dir, role)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{role}-{os.getpid()}-", dir=out_dir))
    staging.chmod(_directory_mode())  # mkdtemp makes it owner-only; the model directory is meant to be shared
    work = Path(tempfile.mkdtemp(prefix=f".tmp-{role}-{os.getpid()}-work-", dir=out_dir))
    try:
        with working_directory(work):  # tools that drop scratch files into the current directory drop them here
            manifest = build(source, facts, staging, work, options, target, cal, progress)
        manifest["fingerprint"] = wanted
        manifest["fingerprint_inputs"] = inputs
        with progress.step(5, "writing manifest"):
            shutil.rmtree(work, ignore_errors=True)
            write_manifest(staging, manifest)
            verify_model_dir(staging, role)
            replace_directory(staging, target_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    written = verify_model_dir(target_dir, role).manifest
    seconds = time.perf_counter() - started
    progress.say(f"wrote {target_dir} in {seconds:.1f} s")
    return ExportResult(role, target_dir, False, written, seconds)


def copy_tokenizer(source: Source, staging: Path) -> None:
    """Tokenizer files (and config.json, for provenance) from the source; make sure tokenizer.json exists."""
    dirs = [source.path]
    if source.onnx_file is not None:
        dirs += [source.onnx_file.parent, source.onnx_file.parent.parent]
    copy_tokenizer_files(dirs, staging)
    ensure_fast_tokenizer(source.path, staging)
    if (source.path / "config.json").is_file():
        shutil.copyfile(source.path / "config.json", staging / "config.json")


def probe_labels(source: Source, facts: ModelFacts, graph: Path, output: str, tokenizer: Path) -> list[str]:
    """Cross-encoder labels: from config.json, else one LABEL_i per logit of a sample run."""
    model = gates.open_model(gates.GateSubject("cross-encoder", tokenizer, facts.max_length, output), graph)
    count = model.dimension  # the width of the logits of its warm-up run
    if facts.labels is not None:
        if len(facts.labels) != count:
            raise ExportError(f"{graph}: outputs {count} logits but the configuration names {len(facts.labels)} "
                              f"labels {facts.labels}")
        return facts.labels
    return [f"LABEL_{i}" for i in range(count)]


def probe_embeddings(graph: Path, output: str, tokenizer: Path, facts: ModelFacts) -> None:
    """Run a sample through a bi-encoder graph (shape errors surface here, naming the file)."""
    model = gates.open_model(gates.GateSubject("bi-encoder", tokenizer, facts.max_length, output, facts.pooling,
                                               facts.normalize), graph)
    gates.serve(model, ["a sample sentence", "another"])


def no_quantization(reason: str) -> dict[str, Any]:
    return {"mode": "none", "reason": reason, "target": None, "per_channel": None, "reduce_range": None,
            "weight_type": None}


def optimize(raw: Path, info: Any, subject: gates.GateSubject, staging: Path, work: Path,
             facts: ModelFacts, cal: gates.Calibration, progress: Progress) -> dict[str, Any]:
    """Step 2: the fp32 graph (rebuilt from an int8 source when needed), optimized, checked against its unfused
    self, written to staging/model_fp32.onnx. `info` is the source's onnx_ops.OnnxInfo. Returns the manifest's
    optimization record."""
    from . import onnx_ops
    from .dequantize import dequantize_model

    record: dict[str, Any] = {}
    fp32 = raw
    if info.quantized:
        fp32 = work / "dequantized.onnx"
        record["dequantized"] = dequantize_model(raw, fp32)
    fused = work / "fused.onnx"
    record["fp32"] = onnx_ops.optimize_fp32(fp32, fused, work / "fusion", facts.model_type)
    difference = gates.agreement(subject, fp32, fused, cal)
    check = {"reference": "unfused fp32", "inputs": 32, "max_difference": float(f"{difference:.3g}"),
             "tolerance": FUSION_TOLERANCE}
    if difference > FUSION_TOLERANCE:
        progress.say(f"optimized graph differs from the unfused one by {difference:.3g} (> {FUSION_TOLERANCE}); "
                     "keeping the unfused graph")
        import onnx

        onnx.save(onnx.load(str(fp32)), str(fused))  # loads external data too: the result is self-contained
        record["fp32"] = {"tool": None, "rejected": record["fp32"]}
        check["result"] = "rejected; the unfused graph is used"
    record["fp32"]["check"] = check
    os.replace(fused, staging / FP32_FILE)
    return record


def build(source: Source, facts: ModelFacts, staging: Path, work: Path, options: ExportOptions, target: str,
          cal: gates.Calibration, progress: Progress) -> dict[str, Any]:
    """Steps 1-4 into staging; returns the manifest (without files/fingerprint)."""
    from . import first_token, int8, onnx_ops

    role = source.role
    copy_tokenizer(source, staging)
    tokenizer = staging / TOKENIZER_FILE
    # 1. A graph to start from.
    if source.format == "checkpoint":
        task = "feature-extraction" if role == "bi-encoder" else "text-classification"
        with progress.step(1, f"exporting to ONNX (optimum, task {task})"):
            raw = onnx_ops.export_checkpoint(source.path, work / "export", role, options.opset)
            info = onnx_ops.inspect_onnx(raw)
            output = onnx_ops.served_output(info, role)
    else:
        if source.onnx_file is None:
            raise ExportError(f"{source.describe()}: format onnx without an ONNX file")
        raw = source.onnx_file
        with progress.step(1, f"validating source ONNX {raw.name}"):
            onnx_ops.check_onnx(raw)
            info = onnx_ops.inspect_onnx(raw)
            output = onnx_ops.served_output(info, role)
    table = onnx_ops.position_table_size(raw)
    if table is not None and table < facts.max_length and source.format == "onnx":
        # Without config.json nothing else caps the tokenizer's max_length (e.g. the graph's 128 positions).
        progress.say(f"max_length {facts.max_length} capped at the graph's {table} positions")
        facts = replace(facts, max_length=table)
    if role == "cross-encoder":
        labels = probe_labels(source, facts, raw, output, tokenizer)
    else:
        probe_embeddings(raw, output, tokenizer, facts)
        labels = None
    if options.opset is not None and source.format == "onnx" and info.opset != options.opset:
        progress.say(f"note: --opset {options.opset} applies to checkpoint exports; the source ONNX keeps opset "
                     f"{info.opset} until the optimizer converts it")
    positive = choose_positive_label(labels) if labels is not None else 0
    subject = gates.GateSubject(role, tokenizer, facts.max_length, output, facts.pooling, facts.normalize, positive)
    source_reference = "source-onnx" if source.format == "onnx" else "exported-onnx"
    source_quantization = onnx_ops.describe_source_quantization(raw) if info.quantized else None

    # 2. Optimize (an int8 source is first rebuilt in fp32, so that it can be fused and re-quantized).
    rebuilt = " from the int8 source" if info.quantized else ""
    with progress.step(2, f"optimizing{rebuilt} (opset 23, attention/LayerNorm/Gelu fusions)"):
        optimization = optimize(raw, info, subject, staging, work, facts, cal, progress)

    # 3. Quantize: static int8 with calibrated activation scales (batch-invariant).
    fp32_file: str | None = FP32_FILE
    if options.quantize:
        settings = target_settings(target)
        with progress.step(3, f"quantizing (static int8, {settings.weight_type} per-channel weights, activation "
                              f"scales calibrated on {cal.name}, target {target})"):
            feeds = gates.calibration_inputs(subject, cal, info.inputs)
            quantization = int8.quantize_static(staging / FP32_FILE, staging / MODEL_FILE, feeds, settings)
            quantization["calibration"] = cal.record()
            if source_quantization is not None:
                quantization["source_quantization"] = source_quantization
        candidate_name = "int8"
    else:
        progress.say(f"3/{STEPS} quantizing: skipped (--no-quantize)")
        os.replace(staging / FP32_FILE, staging / MODEL_FILE)
        fp32_file = None
        quantization = no_quantization("--no-quantize")
        candidate_name = "fp32-optimized"
    # Past the last attention, compute only the first token when that is all the output reads (exact; after
    # calibration, so the int8 activation scales are those of the full graph). The fp32 rebuild of an int8
    # source is only a gate reference and is not kept: left as it is.
    for name in (MODEL_FILE,) if info.quantized else (MODEL_FILE, FP32_FILE):
        if (staging / name).is_file():
            counts = first_token.rewrite_file(staging / name)
            if counts["tensors_sliced"]:
                optimization.setdefault("first_token_readout", {})[name] = counts
    if info.quantized or not options.quantize:
        reference, reference_name = raw, source_reference
    else:
        reference, reference_name = staging / FP32_FILE, "fp32-optimized"

    # 4. Accuracy gate.
    with progress.step(4, f"accuracy gate ({reference_name} vs {candidate_name}, "
                          f"{len(cal.queries)} queries, {len(cal.pairs)} pairs)"):
        served = gates.served_outputs(subject, staging / MODEL_FILE, cal)
        figures = gates.compare(cal, gates.served_outputs(subject, reference, cal), served)
        figures["batch_variation"] = gates.batch_variation(subject, staging / MODEL_FILE, cal)
        gate = gates.gate_record(role, reference_name, candidate_name, cal, figures, options.thresholds)
        if info.quantized and options.quantize:
            # How close the served model is to the fp32 rebuild of the source (the source's own int8 noise aside).
            secondary = gates.compare(cal, gates.served_outputs(subject, staging / FP32_FILE, cal), served)
            gate["secondary"] = {"reference": "fp32 rebuilt from the source",
                                 "metrics": {k: round(v, 6) for k, v in secondary.items()}}
    dimension = served.dimension
    progress.say(f"gate {'passed' if gate['passed'] else 'FAILED'}: {gates.format_figures(figures)}")
    if not gate["passed"]:
        problem = "; ".join(gate["failures"])
        if not options.keep_fp32_on_gate_failure:
            raise GateFailed(
                f"{role}: accuracy gate failed ({candidate_name} vs {reference_name} on calibration "
                f"{cal.name}): {problem}. Figures: {gates.format_figures(figures)}. Lower the thresholds, "
                "pass --keep-fp32-on-gate-failure to serve the reference model, or --no-quantize.", gate)
        progress.say(f"gate failed ({problem}); --keep-fp32-on-gate-failure: serving the reference "
                     f"({reference_name}) as {MODEL_FILE}")
        if reference == staging / FP32_FILE:
            os.replace(staging / FP32_FILE, staging / MODEL_FILE)
            quantization = no_quantization(f"accuracy gate failed: {problem}")
        else:
            shutil.copyfile(reference, staging / MODEL_FILE)
            quantization = ({**source_quantization, "note": f"the optimized graph failed the gate ({problem}); "
                                                           "the source is served"}
                            if source_quantization is not None else no_quantization(f"accuracy gate failed: {problem}"))
        fp32_file = None
        gate["served"] = reference_name
    if info.quantized and fp32_file is not None:
        # The fp32 rebuild of an int8 source is not an original fp32 model: it is not kept.
        (staging / FP32_FILE).unlink()
        fp32_file = None
    if fp32_file is None:
        optimization.get("first_token_readout", {}).pop(FP32_FILE, None)

    served_info = onnx_ops.inspect_onnx(staging / MODEL_FILE)
    import onnxruntime

    return {
        "role": role, "task": ROLES[role], "name": source.name, "source": source.manifest_record(),
        "model_file": MODEL_FILE, "fp32_file": fp32_file, "tokenizer_file": TOKENIZER_FILE,
        "inputs": served_info.inputs, "output": output, "max_length": facts.max_length, "dimension": dimension,
        "pooling": facts.pooling if role == "bi-encoder" else None,
        "normalize": facts.normalize if role == "bi-encoder" else False,
        "pooling_origin": facts.pooling_origin,
        "query_prefix": facts.query_prefix if role == "bi-encoder" else None,
        "query_prefix_origin": facts.query_prefix_origin if role == "bi-encoder" else None,
        "labels": labels, "positive_label": positive if role == "cross-encoder" else None,
        "quantization": quantization, "optimization": optimization, "opset": served_info.opset,
        "onnxruntime_version": onnxruntime.__version__, "tool_versions": tool_versions(),
        "gate": gate, "facts": {"model_type": facts.model_type},
    }


def export_model_set(out_dir: Path, sources: list[Source], options: ExportOptions,
                     stream: TextIO | None = None) -> list[ExportResult]:
    """Export each source into out_dir/<role>/ (one calibration set for all)."""
    cal = gates.load_calibration(options.calibration)
    return [export_model(source, out_dir, options, cal, stream) for source in sources]
