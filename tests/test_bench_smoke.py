"""Smoke runs of every benchmark (`--quick`) on a tiny model set and tiny datasets written here (the quality
measures they compute are tested in test_ir_metrics.py). No timing assertions: these check that each script runs
end to end through the real server and writes a result file of the documented shape with sane values."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import onnxruntime as ort
import pytest

from twostage.export.manifest import write_manifest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.reference_models import infer_bert_shape, pair_ops  # noqa: E402

pytestmark = pytest.mark.slow

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)]
TOPICS = {
    "bees": "bees collect nectar from flowers and turn it into honey inside the hive",
    "rivers": "a river carries rain water downhill until it reaches the sea",
    "volcano": "a volcano erupts when molten rock rises through cracks in the crust",
    "bread": "bread dough rises because yeast produces gas while it ferments",
    "orbit": "the moon stays in orbit because gravity bends its path around the earth",
    "tides": "ocean tides follow the pull of the moon on the water",
    "rust": "iron turns to rust when oxygen and water attack its surface",
    "sleep": "deep sleep helps the brain store memories from the day",
}
QUERIES = {
    "bees": "how do bees make honey",
    "rivers": "where does river water go",
    "volcano": "why does a volcano erupt",
    "bread": "what makes bread dough rise",
    "orbit": "why does the moon orbit the earth",
}
FILLER = "some extra words about many things that people write every day in long notes".split()
VOCAB = SPECIALS + LETTERS + ["##" + c for c in LETTERS] + sorted(
    {w for text in list(TOPICS.values()) + list(QUERIES.values()) + FILLER for w in text.split()})
MAX_POSITIONS = 128


# --------------------------------------------------------------------------- reference model arithmetic
def test_pair_ops_counts_weights_per_token_and_attention_per_square():
    from bench.reference_models import BertShape

    shape = BertShape(layers=2, hidden=8, heads=2, intermediate=16, vocab=10, max_position=32, type_vocab=2, num_labels=1)
    assert shape.encoder_matmul_params == 2 * (4 * 64 + 2 * 128)
    ops = pair_ops(shape, [3, 5])
    assert ops["weight_matmul_ops"] == 2 * shape.encoder_matmul_params * 8
    assert ops["attention_ops"] == 2 * 2 * 2 * (9 + 25) * 8
    assert pair_ops(shape, [3, 5], padded_to=5)["weight_matmul_ops"] == 2 * shape.encoder_matmul_params * 10


# ------------------------------------------------------------------------------------------- fixtures
def write_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A:0 [SEP]:0", pair="[CLS] $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", VOCAB.index("[CLS]")), ("[SEP]", VOCAB.index("[SEP]"))])
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": MAX_POSITIONS,
        "cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]", "unk_token": "[UNK]", "mask_token": "[MASK]"}))


def export_tiny(directory: Path, role: str, seed: int) -> None:
    """Random BERT (hidden 32, 2 layers) -> fp32 ONNX -> dynamic int8 model.onnx, tokenizer, manifest."""
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    directory.mkdir(parents=True)
    cfg = BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=37, max_position_embeddings=MAX_POSITIONS, num_labels=1)
    torch.manual_seed(seed)
    cross = role == "cross-encoder"
    net = (BertForSequenceClassification(cfg) if cross else BertModel(cfg)).eval()
    output = "logits" if cross else "last_hidden_state"
    inputs = ("input_ids", "attention_mask", "token_type_ids")

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, *tensors):
            return getattr(self.net(**dict(zip(inputs, tensors))), output)

    fp32 = directory / "model_fp32.onnx" if not cross else directory.parent / f"{role}-fp32.onnx"
    axes = {name: {0: "batch", 1: "sequence"} for name in inputs}
    axes[output] = {0: "batch"} if cross else {0: "batch", 1: "sequence"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Wrapper(), tuple(torch.ones(2, 6, dtype=torch.long) for _ in inputs), str(fp32),
                          input_names=list(inputs), output_names=[output], dynamic_axes=axes, opset_version=17,
                          dynamo=False)
        quantize_dynamic(str(fp32), str(directory / "model.onnx"), weight_type=QuantType.QInt8)
    write_tokenizer(directory)
    write_manifest(directory, {
        "role": role, "task": "rerank" if cross else "embedding", "name": f"tiny-{role}",
        "source": {"kind": "checkpoint", "id": "tiny-random-bert", "path": None, "revision": str(seed)},
        "model_file": "model.onnx", "fp32_file": None if cross else "model_fp32.onnx", "tokenizer_file": "tokenizer.json",
        "inputs": list(inputs), "output": output, "max_length": MAX_POSITIONS, "dimension": 1 if cross else 32,
        "pooling": None if cross else "mean", "normalize": not cross, "labels": ["relevance"] if cross else [],
        "positive_label": 0, "quantization": {"mode": "dynamic-int8"}, "opset": 17,
        "onnxruntime_version": ort.__version__, "gate": {},
    })


def write_dataset(root: Path, name: str, graded: bool) -> None:
    """A BEIR-layout dataset of text written here: 5 documents per topic, judged queries for 5 topics."""
    d = root / name
    (d / "qrels").mkdir(parents=True)
    docs, qrels = [], []
    for t, (topic, text) in enumerate(TOPICS.items()):
        for i in range(5):
            words = text.split()
            extra = " ".join(FILLER[(i * 3 + j) % len(FILLER)] for j in range(4 + 6 * i))
            doc_id = f"{topic}-{i}"
            docs.append({"_id": doc_id, "title": topic if name == "scifact" else "",
                         "text": " ".join(words[i % 3:]) + " " + extra, "metadata": {}})
            if topic in QUERIES and i < 3:
                qrels.append((f"q{t}", doc_id, (3 - i) if graded else 1))
    (d / "corpus.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    queries = [{"_id": f"q{t}", "text": QUERIES[topic]} for t, topic in enumerate(TOPICS) if topic in QUERIES]
    queries.append({"_id": "unjudged", "text": "a query nobody judged"})
    (d / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (d / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{c}\t{s}\n" for q, c, s in qrels))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bench")
    export_tiny(root / "models" / "bi-encoder", "bi-encoder", seed=1)
    export_tiny(root / "models" / "cross-encoder", "cross-encoder", seed=2)
    write_dataset(root / "data", "scifact", graded=False)
    write_dataset(root / "data", "trec-dl-2019-subset", graded=True)
    return {"models": root / "models", "data": root / "data", "out": root / "results", "cache": root / "cache"}


def run_bench(name: str, tiny: dict[str, Path], *extra: str) -> dict:
    cmd = [sys.executable, "-m", f"bench.{name}", "--quick", "--threads", "1", "--models", str(tiny["models"]),
           "--data", str(tiny["data"]), "--out", str(tiny["out"]), "--cache", str(tiny["cache"]), *extra]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, f"{' '.join(cmd)}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-6000:]}"
    assert f"saved {tiny['out'] / (name + '.json')}" in proc.stdout  # the table was printed, then the file saved
    data = json.loads((tiny["out"] / f"{name}.json").read_text())
    assert data["benchmark"] == name and data["environment"]["cpus_available"] >= 1
    return data


def between(x, lo: float = 0.0, hi: float = 1.0) -> bool:
    return x is not None and lo <= x <= hi


# ------------------------------------------------------------------------------------------- smoke runs
def test_reference_shape_is_read_from_the_served_graph(tiny):
    shape = infer_bert_shape(tiny["models"] / "cross-encoder" / "model.onnx")
    assert (shape.layers, shape.hidden, shape.heads, shape.intermediate) == (2, 32, 2, 37)
    assert (shape.vocab, shape.max_position, shape.num_labels) == (len(VOCAB), MAX_POSITIONS, 1)


def test_rerank_bench(tiny):
    data = run_bench("rerank", tiny, "--contenders", "pytorch,onnx-fp32,onnx-int8", "--floor-rows", "64")
    ms, long = data["contender_runs"]
    names = list(ms["contenders"])
    has_st = importlib.util.find_spec("sentence_transformers") is not None  # an optional bench package
    assert names[0].startswith("twostage") and len(names) == (4 if has_st else 3)
    assert any(n.startswith("plain ORT fp32") for n in names) and any(n.startswith("plain ORT int8") for n in names)
    assert has_st or "pytorch" in data["skipped_contenders"]
    for section in (ms, long):
        for name, row in section["contenders"].items():
            assert row["latency_ms"]["n"] == data["config"]["requests" if section is ms else "long_requests"]
            assert row["latency_ms"]["p50"] > 0 and row["p50_vs_twostage"] > 0
        agree = section["twostage_vs_plain_int8_same_weights"]  # same int8 graph, same pairs
        assert agree["max_abs_score_diff"] < 0.05
    assert ms["contenders"][names[0]]["p50_vs_twostage"] == pytest.approx(1.0)
    assert data["targets"]["measured"]["twostage_p50_ms"] == ms["contenders"][names[0]]["latency_ms"]["p50"]
    sweep = data["sweep"]["workloads"][0]
    for mode in ("batching_on", "batching_off"):
        for clients in ("1", "2"):
            level = sweep[mode][clients]
            assert level["error_count"] == 0 and level["requests"] == int(clients)
            assert level["pairs"] == 4 * int(clients) and level["pairs_per_s"] > 0
            assert level["padded_tokens"] >= level["real_tokens"] > 0 and between(level["padding_waste"])
    floor = data["compute_floor"]
    assert floor["floor"]["matmul_integer_gops"] > 0 and floor["floor"]["dynamic_quantized_gops"] > 0
    assert floor["model_shape"]["layers"] == 2 and set(floor["contenders"]) == set(names)


def test_search_bench(tiny):
    data = run_bench("search", tiny, "--n", "1500", "--queries", "12", "--dtypes", "f32,i8", "--docindex-n", "300")
    contenders = data["synthetic"]["contenders"]
    assert {"usearch-f32", "usearch-i8", "exact-numpy-f32"} <= set(contenders)
    for name, c in contenders.items():
        for ef, e in c["expansion_search"].items():
            assert between(e["recall_at_100"]) and e["latency_ms"]["p50"] > 0
    assert contenders["usearch-f32"]["expansion_search"]["64"]["recall_at_100"] > 0.8
    assert contenders["usearch-f32"]["build"]["file_bytes"] > 1500 * 384 * 4 * 0.9  # f32 vectors are in the file
    assert set(data["document_index"]) == {"f32", "i8"}
    assert data["document_index"]["f32"]["documents"] == 300
    sci = data["scifact"]
    assert sci["documents"] == 40 and between(sci["recall_at_100"]) and sci["search_rpc_latency_ms"]["p50"] > 0
    assert sci["rpc_hits_equal_in_process_ann"] == 1.0  # the RPC returns what the index finds for the same vector
    exact = sci["contenders"]["exact-numpy-f32"]["expansion_search"]["-"]
    assert exact["recall_at_100"] == 1.0 and sci["contenders"]["usearch-f32"]["expansion_search"]["64"]["recall_at_100"] == 1.0
    # a second run reuses the cached vectors and indexes
    again = run_bench("search", tiny, "--n", "1500", "--queries", "12", "--dtypes", "f32", "--docindex-n", "0",
                      "--no-faiss", "--no-scifact")
    assert again["synthetic"]["data"]["cached"] and again["synthetic"]["contenders"]["usearch-f32"]["build"]["cached"]


def test_quality_bench(tiny):
    data = run_bench("quality", tiny, "--max-queries", "4")
    by_name = {d["dataset"]: d for d in data["datasets"]}
    assert set(by_name) == {"scifact", "trec-dl-2019-subset"}
    for d in by_name.values():
        m = d["methods"]
        assert d["facts"]["queries"] == 4 and d["facts"]["documents"] == 40
        assert {"bi-encoder int8", "bi-encoder fp32", "two-stage (int8 bi-encoder + int8 cross-encoder)",
                "two-stage (fp32 bi-encoder + int8 cross-encoder)"} <= set(m)
        for r in m.values():
            assert between(r["ndcg@10"]) and between(r["recall@100"]) and r["queries"] == 4
        # reranking the stage-1 top 100 reorders it and cannot change what is in it: 40 documents, all retrieved
        assert m["bi-encoder int8"]["recall@100"] == pytest.approx(1.0)
        assert m["two-stage (int8 bi-encoder + int8 cross-encoder)"]["recall@100"] == pytest.approx(1.0)
        assert d["facts"]["search_vs_rerank_max_abs_score_diff"] < 0.05
    assert by_name["scifact"]["reference"]["all-MiniLM-L6-v2 ndcg@10 (MTEB)"] == 0.645


def test_hybrid_bench(tiny):
    data = run_bench("hybrid", tiny, "--modes", "dense", "--rerank-mode", "dense", "--tune")
    by_name = {d["dataset"]["name"]: d for d in data["datasets"]}
    assert set(by_name) == {"scifact", "trec-dl-2019-subset"}
    for d in by_name.values():
        rows = d["rows"]
        assert [r["label"].split(" ")[0] for r in rows] == ["dense", "dense", "tuned:", "tuned:"]
        for r in rows:
            assert between(r["ndcg@10"]) and r["queries"] == d["dataset"]["queries"]
        assert rows[0]["recall@100"] == pytest.approx(1.0)  # 40 documents, all in the first 100
        assert not set(d["tune"]["query_ids"]) & set(d["dataset"]["query_ids"])


def test_memory_bench(tiny):
    data = run_bench("memory", tiny, "--n", "1500", "--queries", "12", "--dtypes", "f32,i8", "--server-docs", "200")
    raw = data["raw_index"]
    assert raw["f32"]["file_bytes"] > raw["i8"]["file_bytes"] > 0  # i8 stores a quarter of the vector bytes
    assert raw["f32"]["loaded"]["size"] == 1500
    server = data["server"]
    assert server["empty_index"]["rss_after_requests"] > 10 * 2**20
    assert server["with_documents"]["documents"] == 200 and server["with_documents"]["index_directory_bytes"] > 0
    est = data["estimate_at_n"]["dtypes"]["f32"]
    assert est["server_rss_bytes"] > server["empty_index"]["rss_after_requests"]


def test_bi_encoders_bench(tiny):
    bi = str(tiny["models"] / "bi-encoder")
    data = run_bench("bi_encoders", tiny, "--model", f"first={bi}", "--model", f"second={bi}")
    assert set(data["query_latency_ms"]) == {"first", "second"}  # no query_prefix: no "+prefix" contender
    assert all(v["n"] == 5 and len(v["raw"]) == 5 and v["p50"] > 0 for v in data["query_latency_ms"].values())
    assert set(data["document_throughput"]) == {f"first@{MAX_POSITIONS}", f"second@{MAX_POSITIONS}"}
    assert all(v["documents"] == 16 and v["docs_per_s"] > 0 and v["real_tokens"] > 16
               for v in data["document_throughput"].values())
    assert data["models"]["first"]["public_ndcg_at_10"] is None  # the tiny model has no public figures


def test_lexical_index_bench(tiny):
    data = run_bench("lexical_index", tiny, "--repeats", "1", "--scale", "2")
    assert data["config"]["documents"] == 40
    assert set(data["build"]) == {"triggers", "no-lexical", "rebuild"}
    assert all(b["seconds_median"] > 0 for b in data["build"].values())
    assert data["build"]["rebuild"]["runs"][0]["rebuild_seconds"] > 0
    sizes = data["table_bytes"]
    assert sizes["documents"] > sizes["lexical (FTS5)"] > 0 and sizes["file"] >= sizes["documents"]
    assert set(data["latency"]) == {"top100", "top100_optimized", "top100_filter_tenth", "top100_no_stop_words"}
    assert all(v["wall_ms"]["n"] == 5 for v in data["latency"].values())  # one per judged test query
    assert set(data["quality"]) == {"test_stop_words", "test_no_stop_words"}  # no train judgments here
    assert all(between(v["ndcg@10"]) and v["ndcg@10"] > 0 for v in data["quality"].values())
    scaled = data["scaled"]
    assert scaled["documents"] == 80 and scaled["matches_per_query"]["p50"] == 2 * data["matches_per_query"]["p50"]


def test_budget_bench(tiny):
    data = run_bench("budget", tiny)
    first, second = data["datasets"]
    assert (first["dataset"], second["dataset"]) == ("trec-dl-2019-subset", "scifact")
    for d in (first, second):
        assert d["documents"] == 40 and d["queries"] == 4
        assert list(d["sweep"]) == ["stage 1 only", "budget 50 ms", "budget 200 ms", "full rerank"]
        for setting, row in d["sweep"].items():
            assert row["requests"] == 4 and row["latency_ms"]["p50"] > 0 and between(row["ndcg@10"])
        assert d["sweep"]["stage 1 only"]["pairs_reranked"]["max"] == 0
        assert d["sweep"]["full rerank"]["pairs_reranked"]["min"] == 40    # every candidate of the tiny corpus
        assert d["sweep"]["budget 200 ms"]["p99_over_budget"] > 0
        c = d["concurrent"]
        assert c["requests"] == 16 and c["clients"] == 4 and between(c["share_with_a_pair_reranked"])
    hol = first["head_of_line"]
    for kind in ("stage 1 only", "budget 50 ms"):
        assert hol[kind]["idle_ms"]["n"] == 4 and hol[kind]["during_rerank_ms"]["n"] >= 0
    assert "head_of_line" not in second and "flood" not in second
    flood = first["flood"]
    assert sum(flood["codes"].values()) == 8 and flood["alone_pairs_per_s"] > 0
    unbudgeted = first["unbudgeted"]
    assert set(unbudgeted["pairs_per_s"]) == {"defaults", "bound and warm-up off"} and unbudgeted["ratio_median"] > 0
    assert set(data["targets"]) == {"one_client", "concurrent", "head_of_line", "flood", "unbudgeted"}


def test_paired_bench(tiny):
    # this interpreter's build as its own baseline: the two servers and the pairing run, figures aside
    data = run_bench("paired", tiny, "--baseline-python", sys.executable)
    lat, tp = data["latency"], data["throughput"]
    assert lat["pairs"] == 2 and lat["speed_ratio_median"] > 0
    for name in ("baseline", "this tree"):
        assert lat["ms"][name]["n"] == 2 and lat["ms"][name]["p50"] > 0
        assert len(tp["pairs_per_s"][name]) == 1 and tp["pairs_per_s"][name][0] > 0
    assert tp["ratio_median"] == pytest.approx(tp["pairs_per_s"]["this tree"][0] / tp["pairs_per_s"]["baseline"][0])


def test_milvus_parity_bench(tiny):
    pytest.importorskip("milvus_lite")
    data = run_bench("milvus_parity", tiny)
    assert data["facts"]["documents"] == 40 and data["facts"]["queries"] == 5
    assert data["facts"]["build"]["embedded"]["documents"] == data["facts"]["build"]["milvus"]["documents"] == 40
    for backend in ("embedded", "milvus"):
        for mode in ("dense", "dense + rerank"):
            r = data["quality"][backend][mode]
            assert between(r["ndcg@10"]) and r["recall@100"] == pytest.approx(1.0) and r["queries"] == 5
    # 40 documents, both searched exhaustively: the same candidates, so the same rankings
    assert data["agreement"]["dense"]["top100_overlap_min"] == 1.0
    assert data["largest_ndcg10_difference"] == pytest.approx(0.0) and data["within_0_005"]
    # the embedded backend's reranked order, computed from the scores, is what its own reranked Search returns
    run = data["facts"]["queries_run"]
    assert run["checked_queries"] == 5 and run["checked_queries_differing"] == 0
    assert run["stage1_differs_from_skip_rerank"] == 0
    # a second run finds every query in the journal of the first and reports the same figures
    (journal,) = (tiny["cache"] / "milvus-parity").glob("*.jsonl")
    assert len(journal.read_text().splitlines()) == 5
    again = run_bench("milvus_parity", tiny)
    assert again["quality"] == data["quality"] and len(journal.read_text().splitlines()) == 5


def test_replicas_bench(tiny):
    pytest.importorskip("milvus_lite")
    data = run_bench("replicas", tiny, "--clients", "4")
    (run,) = data["runs"]
    assert run["down_s"] == 2.0 and run["failures"] == []
    assert run["served"]["down"]["replica-0"] == 0 and run["served"]["rejoin"]["replica-0"] > 0
    assert run["total_served_ok"] > 0 and run["restart_to_first_call_s"] >= run["restart_to_serving_s"] > 0
