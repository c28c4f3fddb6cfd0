"""Rerank latency and throughput: twostage (end-to-end over gRPC) against plain runtimes of the same model.

    python -m bench.rerank                 # full run (see docs/benchmarks.md for the runtime)
    python -m bench.rerank --quick         # smoke run, seconds, figures meaningless

Three parts, one JSON file (bench/results/rerank.json):

1. Contenders, same pairs, alternating request by request: twostage Rerank RPC (a real server in a child
   process); sentence-transformers CrossEncoder (PyTorch fp32, batch 32); a plain ONNX Runtime fp32 session;
   a plain int8 session of the served graph (all pairs padded to the longest, one run); Infinity (if its venv
   exists). The PyTorch / fp32 / Infinity contenders use a random-weight model of the served architecture
   (see bench/reference_models.py): same compute, meaningless scores.
2. Concurrency sweep: 1..64 closed-loop clients against a server with batching on and one with batching off;
   pairs/s, latency percentiles, and where the time went (response Timing fields, /metrics deltas).
3. Compute floor: int8 matrix-multiply throughput of this CPU in ONNX Runtime against the reranker's own
   op rate.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from bench.common import (Dataset, ServerProcess, base_parser, document_text, finish_common_args, format_table,
                          load_dataset, metric_delta, parse_metrics, ratio, resolve_threads, save_result,
                          server_threads, summarize)
from bench.prepare import source_onnx
from bench.reference_models import (BertShape, build_random_cross_encoder, export_fp32_onnx, infer_bert_shape,
                                    pair_ops)

TWOSTAGE = "twostage (gRPC, int8, batched)"


# ------------------------------------------------------------------------------------------- workload
@dataclass
class RerankRequestSpec:
    """One request of the workload: a query and its passages (texts only; ids kept for the record)."""

    query_id: str
    query: str
    doc_ids: list[str]
    docs: list[str]


def build_workload(dataset: Dataset, docs_per_request: int, requests: int, seed: int = 13) -> list[RerankRequestSpec]:
    """`requests` requests cycling through the judged queries: each query's judged passages first (sorted by id),
    then passages drawn at random from the corpus, `docs_per_request` in all."""
    queries = dataset.judged_queries or list(dataset.queries)
    all_ids = sorted(dataset.corpus)
    out = []
    for i in range(requests):
        qid = queries[i % len(queries)]
        rng = random.Random(f"{seed}:{qid}:{i // len(queries)}")
        chosen = sorted(dataset.qrels.get(qid, {}))[:docs_per_request]
        have = set(chosen)
        while len(chosen) < min(docs_per_request, len(all_ids)):
            cand = all_ids[rng.randrange(len(all_ids))]
            if cand not in have:
                have.add(cand)
                chosen.append(cand)
        rng.shuffle(chosen)
        out.append(RerankRequestSpec(qid, dataset.queries[qid], chosen,
                                     [document_text(*dataset.corpus[d]) for d in chosen]))
    return out


# ------------------------------------------------------------------------------------------ contenders
class Contender:
    name = ""
    notes = ""

    def score(self, query: str, docs: Sequence[str]) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        pass


class TwostageContender(Contender):
    """The Rerank RPC of a real server (child process), called with the generated stub."""

    name = TWOSTAGE
    notes = "end-to-end client latency: serialization, gRPC, validation, tokenization, batching, inference"

    def __init__(self, models: Path, index_dir: Path, threads: int, **overrides: Any):
        self.server = ServerProcess(models, index_dir, **server_threads(threads), **overrides).start()
        self.stub = self.server.stub()
        self.timings: list[dict[str, float]] = []

    def score(self, query: str, docs: Sequence[str]) -> np.ndarray:
        from twostage.v1 import twostage_pb2 as pb

        resp = self.server_call(pb.RerankRequest(query=query, texts=list(docs)))
        scores = np.empty(len(docs), dtype=np.float32)
        for r in resp.results:
            scores[r.index] = r.score
        return scores

    def server_call(self, request: Any) -> Any:
        resp = self.stub.Rerank(request, timeout=900)
        t = resp.timing
        self.timings.append({"total_ms": t.total_ms, "queue_ms": t.rerank.queue_ms,
                             "tokenize_ms": t.rerank.tokenize_ms, "inference_ms": t.rerank.inference_ms,
                             "batches": t.rerank.batches, "tokens": t.rerank.tokens})
        return resp

    def close(self) -> None:
        self.server.stop()


class PlainOrtContender(Contender):
    """A plain ONNX Runtime session: tokenizer pads all pairs to the longest, one run for the whole request."""

    def __init__(self, name: str, onnx_path: Path, tokenizer_path: Path, max_length: int, threads: int, notes: str):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.name = name
        self.notes = notes
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        self.tokenizer.enable_truncation(max_length=max_length, strategy="longest_first")
        pad_id = self.tokenizer.token_to_id("[PAD]") or 0
        self.tokenizer.enable_padding(pad_id=pad_id, pad_token="[PAD]")
        self.last_padded_length = 0

    def score(self, query: str, docs: Sequence[str]) -> np.ndarray:
        encs = self.tokenizer.encode_batch([(query, d) for d in docs])
        feeds = {"input_ids": np.array([e.ids for e in encs], dtype=np.int64),
                 "attention_mask": np.array([e.attention_mask for e in encs], dtype=np.int64),
                 "token_type_ids": np.array([e.type_ids for e in encs], dtype=np.int64)}
        self.last_padded_length = feeds["input_ids"].shape[1]
        (logits,) = self.session.run(None, {k: v for k, v in feeds.items() if k in self.inputs})[:1]
        return np.asarray(logits, dtype=np.float32).reshape(len(docs), -1)[:, 0]


class SentenceTransformersContender(Contender):
    """sentence-transformers CrossEncoder (PyTorch fp32) in-process."""

    name = "sentence-transformers CrossEncoder (PyTorch fp32, batch 32)"
    notes = "random weights, same architecture as the served model"

    def __init__(self, checkpoint: Path, max_length: int, threads: int, batch_size: int = 32):
        import torch
        from sentence_transformers import CrossEncoder

        torch.set_num_threads(threads)
        self.batch_size = batch_size
        self.model = CrossEncoder(str(checkpoint), max_length=max_length, device="cpu")

    def score(self, query: str, docs: Sequence[str]) -> np.ndarray:
        out = self.model.predict([(query, d) for d in docs], batch_size=self.batch_size, show_progress_bar=False,
                                 convert_to_numpy=True)
        return np.asarray(out, dtype=np.float32).reshape(len(docs), -1)[:, 0]


class InfinityContender(Contender):
    """Infinity (`infinity_emb v2`, torch engine, fp32) over HTTP /rerank, from its own venv."""

    name = "Infinity (HTTP, PyTorch fp32)"
    notes = "random weights, same architecture; infinity_emb v2 --engine torch --device cpu"

    def __init__(self, venv: Path, checkpoint: Path, batch_size: int = 32, startup_timeout_s: float = 600.0):
        from bench.common import free_port

        self.port = free_port()
        self.model_id = str(checkpoint)
        self.log_path = Path(tempfile.mkstemp(prefix="bench-infinity-", suffix=".log")[1])
        exe = venv / "bin" / "infinity_emb"
        env = dict(os.environ, HF_HUB_OFFLINE="1", DO_NOT_TRACK="1", INFINITY_ANONYMOUS_USAGE_STATS="0")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([str(exe), "v2", "--model-id", self.model_id, "--engine", "torch",
                                          "--device", "cpu", "--dtype", "float32", "--batch-size", str(batch_size),
                                          "--no-model-warmup", "--host", "127.0.0.1", "--port", str(self.port)],
                                         stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"infinity exited ({self.proc.returncode}): {self.log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/models", timeout=2):
                    return
            except OSError:
                time.sleep(1.0)
        self.close()
        raise RuntimeError(f"infinity not ready after {startup_timeout_s:.0f} s (log {self.log_path})")

    def score(self, query: str, docs: Sequence[str]) -> np.ndarray:
        body = json.dumps({"query": query, "documents": list(docs), "model": self.model_id,
                           "return_documents": False}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/rerank", data=body,
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=900) as resp:
            data = json.loads(resp.read())
        scores = np.empty(len(docs), dtype=np.float32)
        for r in data["results"]:
            scores[r["index"]] = r["relevance_score"]
        return scores

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


# ------------------------------------------------------------------------------------ served model facts
@dataclass
class ServedCrossEncoder:
    directory: Path
    model_path: Path
    tokenizer_path: Path
    max_length: int
    manifest: dict[str, Any]
    shape: BertShape


def served_cross_encoder(models: Path) -> ServedCrossEncoder:
    from twostage.model.manifest import verify_model_dir

    md = verify_model_dir(models / "cross-encoder", "cross-encoder")
    return ServedCrossEncoder(md.path, md.model_path, md.tokenizer_path, int(md.manifest["max_length"]),
                              md.manifest, infer_bert_shape(md.model_path))


SOURCE_INT8 = "plain ORT int8 session, source model (padded to longest)"
SERVED_INT8 = "plain ORT int8 session, served graph (padded to longest)"


def pair_lengths(served: ServedCrossEncoder, spec: RerankRequestSpec) -> list[int]:
    """Token count of each pair as the server encodes it (its own tokenizer and truncation policy)."""
    from twostage.model.tokenization import ModelTokenizer, encode_pairs

    tok = _tokenizer_cache.get(served.tokenizer_path)
    if tok is None:
        tok = _tokenizer_cache[served.tokenizer_path] = ModelTokenizer.from_file(served.tokenizer_path)
    return [len(e) for e in encode_pairs(tok, spec.query, spec.docs, served.max_length)]


_tokenizer_cache: dict[Path, Any] = {}


# -------------------------------------------------------------------------------- part 1: contenders
def make_contenders(args: argparse.Namespace, served: ServedCrossEncoder, threads: int,
                    index_dir: Path) -> tuple[list[Contender], dict[str, str]]:
    """Start every contender that can run here; the second value says why the others are missing."""
    skipped: dict[str, str] = {}
    wanted = set(args.contenders.split(","))
    contenders: list[Contender] = [TwostageContender(args.models, index_dir, threads)]
    ref_dir = args.cache / f"reference-cross-encoder-{served.shape.layers}x{served.shape.hidden}"
    need_ref = wanted & {"pytorch", "onnx-fp32", "infinity"}
    if need_ref:
        try:
            build_random_cross_encoder(served.shape, served.tokenizer_path.parent, ref_dir)
        except ImportError as exc:
            for name in need_ref:
                skipped[name] = f"needs torch and transformers to build the reference model ({exc})"
            wanted -= need_ref
    if "pytorch" in wanted:
        try:
            contenders.append(SentenceTransformersContender(ref_dir, served.max_length, threads))
        except ImportError as exc:
            skipped["pytorch"] = f"sentence-transformers not installed ({exc})"
    if "onnx-fp32" in wanted:
        fp32 = export_fp32_onnx(ref_dir, args.cache / f"{ref_dir.name}.onnx")
        contenders.append(PlainOrtContender(
            "plain ORT fp32 session (padded to longest)", fp32, ref_dir / "tokenizer.json", served.max_length,
            threads, "random weights, same architecture; all pairs in one run padded to the longest"))
    if "onnx-int8-source" in wanted:
        source = source_onnx(served.manifest)
        if source is None:
            skipped["onnx-int8-source"] = "the served cross-encoder was not exported from an ONNX file found here"
        else:
            contenders.append(PlainOrtContender(
                SOURCE_INT8, source, served.tokenizer_path, served.max_length, threads,
                f"the model the export started from ({source}), as shipped; all pairs in one run padded to the "
                f"longest: the issue's reference 'plain padded session'"))
    if "onnx-int8" in wanted:
        contenders.append(PlainOrtContender(
            SERVED_INT8, served.model_path, served.tokenizer_path,
            served.max_length, threads,
            "the served int8 graph; all pairs in one run padded to the longest, no length sorting or batching"))
    if "infinity" in wanted:
        venv = args.infinity_venv
        if args.quick and not args.infinity_in_quick:
            skipped["infinity"] = "skipped in --quick (its start-up takes minutes)"
        elif not (venv / "bin" / "infinity_emb").is_file():
            skipped["infinity"] = (f"not installed: no {venv}/bin/infinity_emb (make a venv and "
                                   f"`pip install 'infinity-emb[torch,server]'`, then pass --infinity-venv)")
        else:
            try:
                contenders.append(InfinityContender(venv, ref_dir))
            except RuntimeError as exc:
                skipped["infinity"] = f"failed to start: {exc}"
    return contenders, skipped


def run_contenders(contenders: list[Contender], workload: list[RerankRequestSpec], warmup: RerankRequestSpec,
                   pause_s: float) -> dict[str, list[float]]:
    """Each request goes to every contender in turn (the order rotates per request); latencies in ms.
    Every contender first serves one untimed warm-up request."""
    for c in contenders:
        c.score(warmup.query, warmup.docs)
    if isinstance(contenders[0], TwostageContender):
        contenders[0].timings.clear()
    latencies: dict[str, list[float]] = {c.name: [] for c in contenders}
    for i, spec in enumerate(workload):
        order = contenders[i % len(contenders):] + contenders[:i % len(contenders)]
        for c in order:
            time.sleep(pause_s)  # let the previous contender's worker threads go idle
            t0 = time.perf_counter()
            scores = c.score(spec.query, spec.docs)
            latencies[c.name].append((time.perf_counter() - t0) * 1000.0)
            if len(scores) != len(spec.docs) or not np.all(np.isfinite(scores)):
                raise RuntimeError(f"{c.name}: bad scores for request {i} ({len(scores)} for {len(spec.docs)} docs)")
    return latencies


def agreement(a: Contender, b: Contender, workload: list[RerankRequestSpec]) -> dict[str, float]:
    """How closely two contenders running the same weights agree (sigmoid scores), over the workload's first requests."""
    from twostage.model.postprocess import sigmoid

    diffs, rank_corr = [], []
    for spec in workload[:3]:
        sa = np.asarray(a.score(spec.query, spec.docs))
        sb = sigmoid(np.asarray(b.score(spec.query, spec.docs)))
        diffs.append(float(np.max(np.abs(sa - sb))))
        ra, rb = np.argsort(np.argsort(-sa)), np.argsort(np.argsort(-sb))
        rank_corr.append(float(np.corrcoef(ra, rb)[0, 1]) if len(sa) > 1 else 1.0)
    return {"max_abs_score_diff": max(diffs), "mean_spearman": float(np.mean(rank_corr))}


def contender_section(name: str, contenders: list[Contender], workload: list[RerankRequestSpec],
                      warmup: RerankRequestSpec, served: ServedCrossEncoder, pause_s: float) -> dict[str, Any]:
    latencies = run_contenders(contenders, workload, warmup, pause_s)
    base = summarize(latencies[TWOSTAGE])
    rows = {}
    for c in contenders:
        s = summarize(latencies[c.name])
        rows[c.name] = {"latency_ms": s, "p50_vs_twostage": ratio(s["p50"], base["p50"]),
                        "pairs_per_s_at_p50": len(workload[0].docs) / (s["p50"] / 1000.0), "notes": c.notes}
    lengths = [pair_lengths(served, spec) for spec in workload]
    twostage = contenders[0]
    assert isinstance(twostage, TwostageContender)
    timings = twostage.timings[-len(workload):]
    section = {
        "workload": name, "requests": len(workload), "docs_per_request": len(workload[0].docs),
        "pair_tokens": summarize([n for ls in lengths for n in ls]),
        "longest_pair_tokens_per_request": summarize([max(ls) for ls in lengths]),
        "contenders": rows,
        "twostage_server_timing_ms": {k: summarize([t[k] for t in timings])["mean"]
                                      for k in ("total_ms", "queue_ms", "tokenize_ms", "inference_ms")},
        "twostage_batches_per_request": summarize([t["batches"] for t in timings])["mean"],
        "latencies_ms": latencies,
    }
    plain8 = next((c for c in contenders if c.name == SERVED_INT8), None)
    if plain8 is not None:
        section["twostage_vs_plain_int8_same_weights"] = agreement(twostage, plain8, workload)
    source8 = next((c for c in contenders if c.name == SOURCE_INT8), None)
    if source8 is not None:
        section["twostage_vs_source_model"] = agreement(twostage, source8, workload)
    return section


def print_contenders(section: dict[str, Any]) -> None:
    print(f"\n== {section['workload']}: {section['requests']} requests x {section['docs_per_request']} passages "
          f"(pair tokens p50 {section['pair_tokens'].get('p50', 0):.0f}, longest pair per request p50 "
          f"{section['longest_pair_tokens_per_request'].get('p50', 0):.0f})")
    rows = [[name, r["latency_ms"]["p50"], r["latency_ms"]["p95"], r["latency_ms"]["p99"], r["p50_vs_twostage"],
             r["pairs_per_s_at_p50"]] for name, r in section["contenders"].items()]
    print(format_table(["contender", "p50 ms", "p95 ms", "p99 ms", "p50 / twostage", "pairs/s"], rows))
    t = section["twostage_server_timing_ms"]
    print(f"twostage inside the server (mean): total {t['total_ms']:.1f} ms = tokenize {t['tokenize_ms']:.1f} + "
          f"queue {t['queue_ms']:.1f} + inference {t['inference_ms']:.1f} ms "
          f"({section['twostage_batches_per_request']:.1f} batches)")
    if "twostage_vs_source_model" in section:
        a = section["twostage_vs_source_model"]
        print(f"twostage vs the source model (re-quantized): max |score diff| {a['max_abs_score_diff']:.4f}, "
              f"rank correlation {a['mean_spearman']:.4f}")
    if "twostage_vs_plain_int8_same_weights" in section:
        a = section["twostage_vs_plain_int8_same_weights"]
        print(f"twostage vs plain int8 (same weights): max |score diff| {a['max_abs_score_diff']:.4f}, "
              f"rank correlation {a['mean_spearman']:.4f}")


# ---------------------------------------------------------------------------------- part 2: the sweep
@dataclass
class LevelResult:
    latencies_ms: list[float] = field(default_factory=list)
    timings: list[dict[str, float]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    wall_s: float = 0.0


def closed_loop(server: ServerProcess, workload: list[RerankRequestSpec], clients: int, per_client: int,
                docs: int) -> LevelResult:
    """`clients` threads, each sending `per_client` Rerank requests back to back, all starting together."""
    import grpc

    from twostage.v1 import twostage_pb2 as pb

    requests = [pb.RerankRequest(query=s.query, texts=s.docs[:docs]) for s in workload]
    stub = server.stub()
    result = LevelResult()
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)

    def client(c: int) -> None:
        barrier.wait()
        for j in range(per_client):
            req = requests[(c + j * clients) % len(requests)]
            t0 = time.perf_counter()
            try:
                resp = stub.Rerank(req, timeout=900)
            except grpc.RpcError as exc:  # record and go on; a sweep reports its errors
                with lock:
                    result.errors.append(f"{exc.code().name}: {exc.details()}")
                continue
            ms = (time.perf_counter() - t0) * 1000.0
            t = resp.timing
            with lock:
                result.latencies_ms.append(ms)
                result.timings.append({"client_ms": ms, "total_ms": t.total_ms, "queue_ms": t.rerank.queue_ms,
                                       "tokenize_ms": t.rerank.tokenize_ms, "inference_ms": t.rerank.inference_ms,
                                       "tokens": t.rerank.tokens, "items": t.rerank.items})

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    result.wall_s = time.perf_counter() - t0
    return result


def level_summary(res: LevelResult, before: dict, after: dict) -> dict[str, Any]:
    model = {"model": "cross-encoder"}
    pairs = sum(t["items"] for t in res.timings)
    real_tokens = sum(t["tokens"] for t in res.timings)
    batches = metric_delta(before, after, "twostage_batch_items_count", **model)
    padded_tokens = metric_delta(before, after, "twostage_batch_tokens_sum", **model)
    lat = summarize(res.latencies_ms)

    def mean(key: str) -> float:
        return float(np.mean([t[key] for t in res.timings])) if res.timings else 0.0

    return {
        "requests": len(res.latencies_ms), "errors": res.errors[:5], "error_count": len(res.errors),
        "wall_s": res.wall_s, "pairs": pairs, "pairs_per_s": pairs / res.wall_s if res.wall_s else 0.0,
        "latency_ms": lat, "p99_over_p50": ratio(lat.get("p99"), lat.get("p50")),
        "mean_ms": {"client": mean("client_ms"), "server_total": mean("total_ms"), "queue": mean("queue_ms"),
                    "tokenize": mean("tokenize_ms"), "inference": mean("inference_ms"),
                    "client_minus_server": mean("client_ms") - mean("total_ms")},
        "batches": batches,
        "mean_batch_items": ratio(metric_delta(before, after, "twostage_batch_items_sum", **model), batches),
        "mean_batch_padded_tokens": ratio(padded_tokens, batches),
        "mean_batch_padding_ratio": ratio(metric_delta(before, after, "twostage_batch_padding_ratio_sum", **model),
                                          metric_delta(before, after, "twostage_batch_padding_ratio_count", **model)),
        "real_tokens": real_tokens, "padded_tokens": padded_tokens,
        "padding_waste": 1.0 - real_tokens / padded_tokens if padded_tokens else None,
        "model_busy_fraction": ratio(metric_delta(before, after, "twostage_batch_inference_seconds_sum", **model),
                                     res.wall_s),
        "mean_queue_ms_metrics": 1000.0 * (ratio(metric_delta(before, after, "twostage_queue_seconds_sum", **model),
                                                 metric_delta(before, after, "twostage_queue_seconds_count", **model))
                                           or 0.0),
    }


def run_sweep(args: argparse.Namespace, workload: list[RerankRequestSpec], threads: int, index_root: Path,
              levels: list[int], docs_list: list[int], rounds: int) -> dict[str, Any]:
    servers = {True: ServerProcess(args.models, index_root / "on", **server_threads(threads), batching=True).start(),
               False: ServerProcess(args.models, index_root / "off", **server_threads(threads), batching=False).start()}
    out: dict[str, Any] = {"levels": levels, "requests_per_client_at_least": rounds,
                           "requests_per_level_at_least": args.sweep_min_requests, "workloads": []}
    try:
        for server in servers.values():  # warm both up on the sweep's own requests
            closed_loop(server, workload, 2, 1, max(docs_list))
        for docs in docs_list:
            entry: dict[str, Any] = {"docs_per_request": docs, "batching_on": {}, "batching_off": {}}
            for li, clients in enumerate(levels):
                for mode in ((True, False) if li % 2 == 0 else (False, True)):
                    server = servers[mode]
                    before = parse_metrics(server.metrics_text())
                    per_client = max(rounds, -(-args.sweep_min_requests // clients))
                    res = closed_loop(server, workload, clients, per_client, docs)
                    after = parse_metrics(server.metrics_text())
                    entry["batching_on" if mode else "batching_off"][str(clients)] = level_summary(res, before, after)
            entry["on_over_off_pairs_per_s"] = {
                str(c): ratio(entry["batching_on"][str(c)]["pairs_per_s"], entry["batching_off"][str(c)]["pairs_per_s"])
                for c in levels}
            out["workloads"].append(entry)
            print_sweep(entry, levels)
    finally:
        for server in servers.values():
            server.stop()
    return out


def print_sweep(entry: dict[str, Any], levels: list[int]) -> None:
    print(f"\n== concurrency sweep, {entry['docs_per_request']} passages per request")
    rows = []
    for c in levels:
        for label in ("batching_on", "batching_off"):
            r = entry[label][str(c)]
            m = r["mean_ms"]
            rows.append([c, label.split("_")[1], r["requests"], r["pairs_per_s"], r["latency_ms"].get("p50"),
                         r["latency_ms"].get("p99"), r["p99_over_p50"], m["queue"], m["tokenize"], m["inference"],
                         m["client_minus_server"], r["mean_batch_items"], r["padding_waste"], r["model_busy_fraction"],
                         r["error_count"]])
    print(format_table(["clients", "batching", "reqs", "pairs/s", "p50 ms", "p99 ms", "p99/p50", "queue ms",
                        "tok ms", "infer ms", "rpc ms", "items/batch", "pad waste", "busy", "errors"], rows))
    print("on/off pairs/s: " + ", ".join(f"{c} clients {v:.2f}x" for c, v in entry["on_over_off_pairs_per_s"].items()
                                          if v is not None))


def sweep_targets(result: dict[str, Any]) -> None:
    """Record the sweep's target figures (16 clients, or the nearest level run) beside the contender targets."""
    targets = result.setdefault("targets", {"measured": {}, "wanted": {}})
    levels = result["sweep"]["levels"]
    level = str(min(levels, key=lambda c: abs(c - 16)))
    for w in result["sweep"]["workloads"]:
        tag = f"sweep_{w['docs_per_request']}_docs_{level}_clients"
        targets["measured"][f"{tag}_on_over_off_pairs_per_s"] = w["on_over_off_pairs_per_s"][level]
        targets["measured"][f"{tag}_p99_over_p50_batching_on"] = w["batching_on"][level]["p99_over_p50"]
        targets["wanted"][f"{tag}_on_over_off_pairs_per_s"] = ">= 1.5 at 16 clients"
        targets["wanted"][f"{tag}_p99_over_p50_batching_on"] = "<= 3 at 16 clients"


# ---------------------------------------------------------------------------------- part 3: the floor
def _matmul_graph(m: int, k: int, n: int, dynamic: bool, seed: int = 0):
    """An ONNX graph multiplying [m, k] activations by a stored int8 [k, n] weight.

    dynamic=False: uint8 x int8 MatMulInteger (the bare int8 kernel). dynamic=True: fp32 input,
    DynamicQuantizeLinear, MatMulInteger, dequantize (what dynamic quantization puts in the served graph)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.integers(-127, 128, size=(k, n), dtype=np.int8), "W")
    nodes, inits = [], [w]
    if not dynamic:
        inp = helper.make_tensor_value_info("A", TensorProto.UINT8, [m, k])
        out = helper.make_tensor_value_info("Y", TensorProto.INT32, [m, n])
        nodes.append(helper.make_node("MatMulInteger", ["A", "W"], ["Y"]))
    else:
        inits += [numpy_helper.from_array(np.array(0, dtype=np.int8), "Wzp"),
                  numpy_helper.from_array(np.array(0.01, dtype=np.float32), "Ws")]
        inp = helper.make_tensor_value_info("A", TensorProto.FLOAT, [m, k])
        out = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [m, n])
        nodes += [helper.make_node("DynamicQuantizeLinear", ["A"], ["Aq", "As", "Azp"]),
                  helper.make_node("MatMulInteger", ["Aq", "W", "Azp", "Wzp"], ["Yi"]),
                  helper.make_node("Cast", ["Yi"], ["Yf"], to=TensorProto.FLOAT),
                  helper.make_node("Mul", ["As", "Ws"], ["S"]),
                  helper.make_node("Mul", ["Yf", "S"], ["Y"])]
    graph = helper.make_graph(nodes, "int8_matmul", [inp], [out], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def time_session(run: Callable[[], Any], min_seconds: float, min_runs: int = 3) -> float:
    """Median seconds per call after one warm-up call."""
    run()
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - started < min_seconds:
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def measure_floor(shape: BertShape, rows: int, threads: int, min_seconds: float) -> dict[str, Any]:
    """int8 GOPS of this CPU for the reranker's matrix shapes (rows = tokens in a batch), bare and dynamic."""
    import onnxruntime as ort

    mix = [((shape.hidden, shape.hidden), 4), ((shape.hidden, shape.intermediate), 1),
           ((shape.intermediate, shape.hidden), 1)]  # per encoder layer: Q, K, V, attention out; FFN in; FFN out
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    rng = np.random.default_rng(1)
    out: dict[str, Any] = {"rows": rows, "threads": threads, "shapes": {}}
    for dynamic in (False, True):
        label = "dynamic_quantized" if dynamic else "matmul_integer"
        total_ops = total_s = 0.0
        for (k, n), count in mix:
            model = _matmul_graph(rows, k, n, dynamic)
            sess = ort.InferenceSession(model.SerializeToString(), sess_options=opts,
                                        providers=["CPUExecutionProvider"])
            a = (rng.standard_normal((rows, k)).astype(np.float32) if dynamic
                 else rng.integers(0, 256, size=(rows, k), dtype=np.uint8))
            seconds = time_session(lambda: sess.run(None, {"A": a}), min_seconds)
            ops = 2.0 * rows * k * n
            out["shapes"].setdefault(f"{rows}x{k}x{n}", {})[label] = {"seconds": seconds, "gops": ops / seconds / 1e9}
            total_ops += ops * count
            total_s += seconds * count
        out[f"{label}_gops"] = total_ops / total_s / 1e9
    return out


def floor_section(floor: dict[str, Any], shape: BertShape, served: ServedCrossEncoder,
                  msmarco: dict[str, Any] | None, workload: list[RerankRequestSpec]) -> dict[str, Any]:
    """Ops the reranker does per request and the fraction of the int8 floor its latency amounts to."""
    section: dict[str, Any] = {"floor": floor, "model_shape": shape.as_dict(),
                               "encoder_matmul_params": shape.encoder_matmul_params}
    if msmarco is None:
        return section
    lengths = [pair_lengths(served, spec) for spec in workload]
    lat = msmarco["latencies_ms"]
    rows = {}
    for name, values in lat.items():
        padded = name.startswith("plain ORT") or name.startswith("sentence") or name.startswith("Infinity")
        per_request = []
        for ls, ms in zip(lengths, values):
            useful = pair_ops(shape, ls)
            per_request.append((useful["weight_matmul_ops"], useful["total_ops"], ms / 1000.0))
        weight_gops = [w / s / 1e9 for w, _, s in per_request]
        total_gops = [t / s / 1e9 for _, t, s in per_request]
        rows[name] = {"useful_weight_matmul_gops_p50": float(np.median(weight_gops)),
                      "useful_total_gops_p50": float(np.median(total_gops)),
                      "fraction_of_int8_floor": float(np.median(weight_gops)) / floor["matmul_integer_gops"],
                      "fraction_of_dynamic_int8_floor": float(np.median(weight_gops)) / floor["dynamic_quantized_gops"],
                      "pads_whole_request": padded}
    ops = [pair_ops(shape, ls) for ls in lengths]
    padded_ops = [pair_ops(shape, ls, padded_to=max(ls)) for ls in lengths]
    section["workload_ops_per_request"] = {
        "useful_weight_matmul_gop": float(np.mean([o["weight_matmul_ops"] for o in ops]) / 1e9),
        "useful_attention_gop": float(np.mean([o["attention_ops"] for o in ops]) / 1e9),
        "padded_to_longest_total_gop": float(np.mean([o["total_ops"] for o in padded_ops]) / 1e9),
        "time_at_floor_ms": float(np.mean([o["weight_matmul_ops"] for o in ops]) / (floor["matmul_integer_gops"] * 1e9)
                                  * 1000.0)}
    section["contenders"] = rows
    return section


def print_floor(section: dict[str, Any]) -> None:
    f = section["floor"]
    print(f"\n== compute floor ({f['threads']} threads, {f['rows']} rows): MatMulInteger {f['matmul_integer_gops']:.0f} "
          f"GOPS, dynamic-quantized MatMul {f['dynamic_quantized_gops']:.0f} GOPS (reranker's shape mix)")
    if "workload_ops_per_request" in section:
        w = section["workload_ops_per_request"]
        print(f"MS MARCO request: {w['useful_weight_matmul_gop']:.1f} GOP in weight matmuls + "
              f"{w['useful_attention_gop']:.1f} GOP attention (useful tokens); padded to longest "
              f"{w['padded_to_longest_total_gop']:.1f} GOP; weight matmuls alone at the floor: "
              f"{w['time_at_floor_ms']:.0f} ms")
        rows = [[n, r["useful_weight_matmul_gops_p50"], r["fraction_of_int8_floor"],
                 r["fraction_of_dynamic_int8_floor"]] for n, r in section["contenders"].items()]
        print(format_table(["contender", "useful int8-matmul GOPS", "of MatMulInteger floor",
                            "of dynamic floor"], rows))


# --------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=None, help="MS MARCO requests per contender (default 20; quick 2)")
    p.add_argument("--long-requests", type=int, default=None,
                   help="SciFact (long document) requests per contender (default 5; quick 1; 0 = skip)")
    p.add_argument("--docs", type=int, default=None, help="passages per request (default 100; quick 6)")
    p.add_argument("--contenders", default="pytorch,onnx-fp32,onnx-int8-source,onnx-int8,infinity",
                   help="comma-separated contenders besides twostage: pytorch, onnx-fp32, onnx-int8-source (the "
                        "exported-from ONNX file as shipped), onnx-int8 (the served graph), infinity")
    p.add_argument("--infinity-venv", type=Path, default=Path(os.environ.get("TWOSTAGE_BENCH_INFINITY_VENV",
                                                                            "/tmp/venv-infinity")),
                   help="venv with infinity-emb[torch,server] installed")
    p.add_argument("--infinity-in-quick", action="store_true", help="also start Infinity in --quick runs")
    p.add_argument("--sweep-clients", default=None, help="client counts (default 1,4,16,64; quick 1,2)")
    p.add_argument("--sweep-docs", default=None,
                   help="passages per request in the sweep, comma-separated (default 100,10,1; quick 4)")
    p.add_argument("--sweep-rounds", type=int, default=None,
                   help="requests per client per level, at least (default 2; quick 1); every level sends at least "
                        "--sweep-min-requests requests in all")
    p.add_argument("--sweep-min-requests", type=int, default=None,
                   help="requests per level at least, spread over its clients (default 16; quick 1)")
    p.add_argument("--floor-rows", type=int, default=None, help="rows (tokens) of the floor matmuls (default 4096)")
    p.add_argument("--pause-ms", type=float, default=None, help="pause before each contender call (default 200)")
    p.add_argument("--skip", default="", help="parts to skip, comma-separated: contenders, sweep, floor")
    args = finish_common_args(p.parse_args(argv))
    q = args.quick
    args.requests = args.requests if args.requests is not None else (2 if q else 20)
    args.long_requests = args.long_requests if args.long_requests is not None else (1 if q else 5)
    args.docs = args.docs if args.docs is not None else (6 if q else 100)
    args.sweep_clients = [int(x) for x in (args.sweep_clients or ("1,2" if q else "1,4,16,64")).split(",")]
    args.sweep_docs = [int(x) for x in (args.sweep_docs or ("4" if q else "100,10,1")).split(",")]
    args.sweep_rounds = args.sweep_rounds if args.sweep_rounds is not None else (1 if q else 2)
    args.sweep_min_requests = args.sweep_min_requests if args.sweep_min_requests is not None else (1 if q else 16)
    args.floor_rows = args.floor_rows if args.floor_rows is not None else (256 if q else 4096)
    args.pause_ms = args.pause_ms if args.pause_ms is not None else (0.0 if q else 200.0)
    args.skip = set(filter(None, args.skip.split(",")))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = resolve_threads(args.threads)
    args.cache.mkdir(parents=True, exist_ok=True)
    served = served_cross_encoder(args.models)
    msmarco = load_dataset(args.data, "trec-dl-2019-subset")
    scifact = load_dataset(args.data, "scifact") if args.long_requests else None
    warm_ms, *work_ms = build_workload(msmarco, args.docs, args.requests + 1)
    result: dict[str, Any] = {
        "config": {k: (sorted(v) if isinstance(v, set) else v) for k, v in vars(args).items()},
        "threads": threads, "served_cross_encoder": {
            "name": served.manifest.get("name"), "quantization": served.manifest.get("quantization"),
            "shape": served.shape.as_dict(), "max_length": served.max_length},
        "notes": [
            "PyTorch, fp32-ONNX and Infinity contenders run a BertForSequenceClassification with the served "
            "model's architecture (read from its graph) and random weights: no fp32 checkpoint of the served "
            "cross-encoder exists offline; compute cost does not depend on the weight values.",
            "The plain int8 contender runs the served graph itself; its scores are compared with twostage's.",
            "Contenders take turns request by request (the order rotates), in one run on the same machine.",
        ]}
    tmp = Path(tempfile.mkdtemp(prefix="bench-rerank-"))
    try:
        if "contenders" not in args.skip:
            contenders, skipped = make_contenders(args, served, threads, tmp / "index")
            result["skipped_contenders"] = skipped
            try:
                sections = [contender_section("MS MARCO passages (trec-dl-2019-subset)", contenders, work_ms,
                                              warm_ms, served, args.pause_ms / 1000.0)]
                print_contenders(sections[0])
                if scifact is not None:
                    warm_long, *work_long = build_workload(scifact, args.docs, args.long_requests + 1)
                    sections.append(contender_section("SciFact abstracts (long documents)", contenders, work_long,
                                                      warm_long, served, args.pause_ms / 1000.0))
                    print_contenders(sections[-1])
            finally:
                for c in contenders:
                    c.close()
            for name, why in skipped.items():
                print(f"(contender {name}: {why})")
            result["contender_runs"] = sections
            ms = sections[0]
            tw = ms["contenders"][TWOSTAGE]["latency_ms"]["p50"]
            targets = {"twostage_p50_ms": tw}
            for key, prefix in (("plain_int8_over_twostage", SOURCE_INT8),
                                ("plain_served_int8_over_twostage", SERVED_INT8),
                                ("sentence_transformers_over_twostage", "sentence-transformers")):
                match = [r for n, r in ms["contenders"].items() if n.startswith(prefix)]
                targets[key] = match[0]["p50_vs_twostage"] if match else None
            result["targets"] = {"measured": targets, "wanted": {"twostage_p50_ms": "<= 900",
                                                                 "plain_int8_over_twostage": ">= 3",
                                                                 "plain_served_int8_over_twostage": "(no target)",
                                                                 "sentence_transformers_over_twostage": ">= 5"}}
        if "sweep" not in args.skip:
            result["sweep"] = run_sweep(args, build_workload(msmarco, max(args.sweep_docs), 64), threads,
                                        tmp / "sweep", args.sweep_clients, args.sweep_docs, args.sweep_rounds)
            sweep_targets(result)
        if "floor" not in args.skip:
            floor = measure_floor(served.shape, args.floor_rows, threads, 0.05 if args.quick else 1.0)
            msm = result.get("contender_runs", [None])[0]
            result["compute_floor"] = floor_section(floor, served.shape, served, msm, work_ms)
            print_floor(result["compute_floor"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if result.get("targets"):
        print("\n== targets")
        print(format_table(["figure", "measured", "wanted"],
                           [[k, v, result["targets"]["wanted"].get(k, "")] for k, v in result["targets"]["measured"].items()]))
    path = save_result("rerank", result, args.out)
    print(f"\nsaved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
