#!/usr/bin/env node
// Calls a running twostage server from Node.js and checks its answers.
//
// It loads ONLY protos/twostage/v1/twostage.proto at run time (no generated code): this is what any
// language gets from the contract. google/protobuf/struct.proto comes with protobufjs.
//
//   TWOSTAGE_TARGET=127.0.0.1:50051 node check_server.js
//
// Environment: TWOSTAGE_TARGET (required), TWOSTAGE_API_KEY (optional, sent as a Bearer token),
// TWOSTAGE_QUERIES and TWOSTAGE_CORPUS (default: the packaged sample files; the server must have that
// corpus indexed). Prints one JSON report; exits 1 when any check fails, 2 when it cannot run.
'use strict';

const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const REPO = path.resolve(__dirname, '..', '..');
const PROTO_ROOT = path.join(REPO, 'protos');
const PROTO_FILE = path.join(PROTO_ROOT, 'twostage', 'v1', 'twostage.proto');
const DATA = path.join(REPO, 'client', 'data');
const DEADLINE_MS = 60000;
const ANSWER_WITHIN = 3; // the known right answer must rank in the top 3 after reranking

function loadService() {
  const definition = protoLoader.loadSync(PROTO_FILE, {
    includeDirs: [PROTO_ROOT],
    keepCase: true, // field names exactly as in the .proto (snake_case)
    longs: Number, // uint64 index_size as a JS number
    enums: String, // enum values by name, e.g. "SCORE_KIND_NORMALIZED"
    defaults: true, // unset scalars come back as 0 / "" / false
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).twostage.v1.TwoStage;
}

// google.protobuf.Struct <-> plain JS objects. Note: proto-loader takes the well-known types from
// protobufjs's bundled descriptors, whose field names stay camelCase (stringValue, ...) even with
// keepCase: true, while this service's own fields keep their snake_case names.
function toValue(v) {
  if (v === null) return { nullValue: 'NULL_VALUE' };
  if (typeof v === 'number') return { numberValue: v };
  if (typeof v === 'string') return { stringValue: v };
  if (typeof v === 'boolean') return { boolValue: v };
  if (Array.isArray(v)) return { listValue: { values: v.map(toValue) } };
  return { structValue: toStruct(v) };
}

function toStruct(obj) {
  const fields = {};
  for (const [k, v] of Object.entries(obj)) fields[k] = toValue(v);
  return { fields };
}

function fromValue(v) {
  switch (v.kind) {
    case 'nullValue': return null;
    case 'numberValue': return v.numberValue;
    case 'stringValue': return v.stringValue;
    case 'boolValue': return v.boolValue;
    case 'listValue': return (v.listValue.values || []).map(fromValue);
    case 'structValue': return fromStruct(v.structValue);
    default: return undefined;
  }
}

function fromStruct(s) {
  const out = {};
  for (const [k, v] of Object.entries((s && s.fields) || {})) out[k] = fromValue(v);
  return out;
}

function readJsonl(file) {
  return fs.readFileSync(file, 'utf8').split('\n').filter((l) => l.trim()).map((l) => JSON.parse(l));
}

function call(client, method, request, metadata) {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + DEADLINE_MS);
    client[method](request, metadata, { deadline }, (err, response) => (err ? reject(err) : resolve(response)));
  });
}

async function main() {
  const target = process.env.TWOSTAGE_TARGET;
  if (!target) {
    console.error('set TWOSTAGE_TARGET=host:port of a running twostage server');
    return 2;
  }
  const queries = readJsonl(process.env.TWOSTAGE_QUERIES || path.join(DATA, 'sample_queries.jsonl'));
  const corpus = new Map(
    readJsonl(process.env.TWOSTAGE_CORPUS || path.join(DATA, 'sample_corpus.jsonl')).map((d) => [d._id, d]));
  const TwoStage = loadService();
  const client = new TwoStage(target, grpc.credentials.createInsecure());
  const metadata = new grpc.Metadata();
  if (process.env.TWOSTAGE_API_KEY) metadata.set('authorization', `Bearer ${process.env.TWOSTAGE_API_KEY}`);

  const checks = [];
  const check = (name, ok, detail) => checks.push({ name, ok: Boolean(ok), detail });

  // 1. Search: every sample query finds its known answer near the top after reranking.
  for (const q of queries) {
    const res = await call(client, 'Search', { query: q.text, top_k: 5, candidates: 50 }, metadata);
    const ids = res.hits.map((h) => h.id);
    const rank = ids.findIndex((id) => q.relevant.includes(id)) + 1;
    const sorted = res.hits.every((h, i) => i === 0 || res.hits[i - 1].score >= h.score);
    check(`search ${q._id}`, rank >= 1 && rank <= ANSWER_WITHIN && sorted && res.score_kind === 'SCORE_KIND_NORMALIZED',
      { query: q.text, relevant: q.relevant, rank, ids, score_kind: res.score_kind, reranked: res.reranked });
  }

  // 2. Stage 1 only: similarity scores, nothing reranked, documents carry their metadata.
  const first = queries[0];
  const plain = await call(client, 'Search', { query: first.text, top_k: 5, candidates: 50, skip_rerank: true }, metadata);
  const topic0 = plain.hits.length ? fromStruct(plain.hits[0].document.metadata).topic : undefined;
  check('search skip_rerank', plain.score_kind === 'SCORE_KIND_SIMILARITY' && plain.reranked === 0 &&
    plain.hits.length === 5 && plain.hits.every((h) => !h.reranked) && typeof topic0 === 'string',
  { score_kind: plain.score_kind, reranked: plain.reranked, ids: plain.hits.map((h) => h.id), topic_of_first: topic0 });

  // 3. Metadata filter (a google.protobuf.Struct built here): every hit has the topic asked for.
  const answer = corpus.get(first.relevant[0]);
  const topic = answer.metadata.topic;
  const filtered = await call(client, 'Search',
    { query: first.text, top_k: 5, candidates: 50, filter: toStruct({ topic }) }, metadata);
  const topics = filtered.hits.map((h) => fromStruct(h.document.metadata).topic);
  check('search filter', filtered.hits.length > 0 && topics.every((t) => t === topic) &&
    filtered.hits.some((h) => first.relevant.includes(h.id)), { topic, topics, ids: filtered.hits.map((h) => h.id) });

  // 4. Rerank texts: the right answer beats the distractor that stage 1 ranked above it.
  const distractor = plain.hits.map((h) => h.id).find((id) => !first.relevant.includes(id));
  const texts = [corpus.get(distractor).text, answer.text, 'Completely unrelated: a recipe for tomato soup.'];
  const byText = await call(client, 'Rerank', { query: first.text, texts, return_documents: true }, metadata);
  check('rerank texts', byText.results.length === 3 && byText.results[0].index === 1 &&
    byText.results[0].text === answer.text && byText.results[2].index === 2 &&
    byText.score_kind === 'SCORE_KIND_NORMALIZED' &&
    byText.results.every((r) => r.score >= 0 && r.score <= 1),
  { order: byText.results.map((r) => r.index), scores: byText.results.map((r) => r.score) });

  // 5. Rerank stored documents by id, raw logits, top_n.
  const byId = await call(client, 'Rerank',
    { query: first.text, document_ids: [distractor, answer._id], raw_scores: true, top_n: 1 }, metadata);
  check('rerank document_ids', byId.results.length === 1 && byId.results[0].id === answer._id &&
    byId.results[0].index === 1 && byId.score_kind === 'SCORE_KIND_RAW', { results: byId.results });

  // 6. Errors come back as gRPC status codes with a message naming the field.
  let status = null;
  try {
    await call(client, 'Search', { query: '   ' }, metadata);
  } catch (err) {
    status = { code: err.code, details: err.details };
  }
  check('invalid argument', status && status.code === grpc.status.INVALID_ARGUMENT && /query/.test(status.details), status);

  // 7. Info: models and the indexed corpus.
  const info = await call(client, 'Info', {}, metadata);
  check('info', info.index.size >= corpus.size && info.bi_encoder.role === 'bi-encoder' &&
    info.cross_encoder.role === 'cross-encoder',
  { server_version: info.server_version, index_size: info.index.size, bi_encoder: info.bi_encoder.name,
    cross_encoder: info.cross_encoder.name });

  client.close();
  const ok = checks.every((c) => c.ok);
  console.log(JSON.stringify({ target, ok, passed: checks.filter((c) => c.ok).length, failed: checks.filter((c) => !c.ok).length, checks }, null, 2));
  return ok ? 0 : 1;
}

main().then((code) => { process.exitCode = code; }, (err) => {
  console.error(`check_server: ${err.code !== undefined ? `gRPC status ${err.code}: ${err.details}` : err.stack}`);
  process.exitCode = 2;
});
