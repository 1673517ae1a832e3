/**
 * Command-line bridge to worker_web/contract.js for the cross-language tests
 * (tests/test_js_contract.py): `node worker_web/test/codec_cli.mjs <requests.json | ->`.
 *
 * Input: a JSON list of operations; output (stdout): a JSON list with one answer per operation,
 * `{"ok": ...}` or `{"error": {"field", "code", "message"}}` for a ContractError. Binary data
 * travels as base64 (float32/float64 little-endian arrays, container bytes), so no value is
 * rounded on the way. Operations:
 *
 *   {"op": "encode", "codec": "int8", "tensors": [[name, shape, "f4" | "f8", b64], ...]} -> b64 container
 *   {"op": "decode", "data": b64, "spec": [[name, shape, dtype], ...]?, "codec": str?} -> [[name, shape, b64 f4], ...]
 *   {"op": "pack", "meta": JSON text (parsed with JSON.parse, as a worker would), "delta": b64} -> b64 body
 *   {"op": "unpack", "data": b64} -> {"meta": {...}, "delta": b64}
 *   {"op": "unit", "text": JSON text} -> the validated unit
 *   {"op": "codec", "text": codec string} -> {id, fraction, name, ratio}
 *   {"op": "shard", "data": b64} -> {n, h, w, x: b64, y: b64}
 *   {"op": "feedback", "codec": str, "deltas": [[[name, shape, kind, b64], ...], ...]}
 *       -> {"sent": [b64 container, ...], "residual": [[name, b64 f4], ...]}: error feedback (../feedback.js)
 *          over the deltas in turn, each step's residual kept (feedbackStep)
 *   {"op": "lie", "kind": str, "seed": int?, "deltas": [[[name, shape, kind, b64], ...], ...]}
 *       -> [[[name, shape, b64 f4], ...], ...]: what one liar of ../lies.mjs sends for each delta in turn
 *   {"op": "lies"} -> [str, ...]: the lies ../lies.mjs tells (LIES)
 *   {"op": "worker_key", "keys": [str, ...]} -> {header, fresh: a newWorkerKey(), valid: [bool, ...]}
 *   {"op": "label_flip", "data": b64 shard} -> {"y": b64}: the labels a label_flip tab trains on: the
 *       line of ../worker.js that ../lies.mjs flipLabelsSource rewrites, run as rewritten on that shard
 *
 * Run without arguments (as `node --test worker_web/test/` does with every file here) it does nothing.
 */
import { readFileSync } from "node:fs";
import * as contract from "../contract.js";
import { feedbackStep } from "../feedback.js";
import { flipLabelsSource, LIES, makeLiar, SHARD_DECODE } from "../lies.mjs";

const b64 = (bytes) => Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString("base64");

function fromB64(text, kind) {
  const buf = Buffer.from(text, "base64");
  const bytes = new Uint8Array(buf.length);
  bytes.set(buf);
  if (kind === "f4") return new Float32Array(bytes.buffer);
  if (kind === "f8") return new Float64Array(bytes.buffer);
  return bytes;
}

const OPS = {
  encode: (r) => b64(contract.encodeDelta(r.codec,
    new Map(r.tensors.map(([name, shape, kind, data]) => [name, { shape, data: fromB64(data, kind) }])))),
  decode: (r) => {
    const spec = r.spec ? new Map(r.spec.map(([name, shape, dtype]) => [name, [shape, dtype]])) : null;
    return [...contract.decodeDelta(fromB64(r.data), spec, r.codec ?? null)].map(([name, t]) => [name, t.shape, b64(t.data)]);
  },
  pack: (r) => b64(contract.packResult(JSON.parse(r.meta), fromB64(r.delta))),
  unpack: (r) => {
    const { meta, delta } = contract.unpackResult(fromB64(r.data));
    return { meta, delta: b64(delta) };
  },
  unit: (r) => contract.checkUnit(r.text),
  codec: (r) => ({ ...contract.parseCodec(r.text) }),
  feedback: (r) => {
    let residual = null;
    const sent = [];
    for (const tensors of r.deltas) {
      const delta = new Map(tensors.map(([name, shape, kind, data]) => [name, { shape, data: fromB64(data, kind) }]));
      const [bytes, next] = feedbackStep(r.codec, delta, residual);
      sent.push(b64(bytes));
      residual = next;
    }
    return { sent, residual: [...(residual ?? new Map())].map(([name, x]) => [name, b64(x)]) };
  },
  lie: (r) => {
    const liar = makeLiar(r.kind, r.seed ?? 1);
    return r.deltas.map((tensors) => [...liar.rewrite(new Map(tensors.map(([name, shape, kind, data]) =>
      [name, { shape, data: fromB64(data, kind) }])))].map(([name, t]) => [name, t.shape, b64(t.data)]));
  },
  lies: () => LIES,
  worker_key: (r) => ({ header: contract.WORKER_KEY_HEADER, fresh: contract.newWorkerKey(),
    valid: r.keys.map((k) => contract.WORKER_KEY_RE.test(k)) }),
  label_flip: async (r) => {
    const source = flipLabelsSource(readFileSync(new URL("../worker.js", import.meta.url), "utf8"));
    const line = source.split("\n").find((l) => l.includes("S.shards.set(id,"));
    if (line.includes(SHARD_DECODE)) throw new Error("label_flip: the line was not rewritten");
    const S = { shards: new Map() };
    const run = new Function("S", "contract", "blob", "id", `return (async () => { ${line} })();`);
    await run(S, contract, async () => fromB64(r.data), "shard");
    return { y: b64(S.shards.get("shard").y) };
  },
  shard: (r) => {
    const { n, h, w, x, y } = contract.decodeShard(fromB64(r.data));
    return { n, h, w, x: b64(x), y: b64(y) };
  },
};

async function answer(request) {
  try {
    return { ok: await OPS[request.op](request) };
  } catch (e) {
    if (e instanceof contract.ContractError) return { error: { field: e.field, code: e.code, message: e.message } };
    return { crash: `${e?.name}: ${e?.message}` };     // anything but a ContractError is a bug
  }
}

const source = process.argv[2];
if (source !== undefined) {
  const requests = JSON.parse(readFileSync(source === "-" ? 0 : source, "utf8"));
  process.stdout.write(JSON.stringify(await Promise.all(requests.map(answer))));
}
