/**
 * worker_web/contract.js against the golden files of the wire contract (tests/golden/, written
 * by the Python reference: tests/golden/make_golden.py). Run: `node --test worker_web/test/`.
 * tests/test_js_contract.py runs this file from pytest and adds cross-language property checks.
 */
import assert from "node:assert/strict";
import { readdirSync, readFileSync } from "node:fs";
import { createHash } from "node:crypto";
import { describe, test } from "node:test";

import * as C from "../contract.js";

const GOLDEN = new URL("../../tests/golden/", import.meta.url);
const bin = (name) => new Uint8Array(readFileSync(new URL(name, GOLDEN)));
const json = (name) => JSON.parse(readFileSync(new URL(name, GOLDEN), "utf8"));
const text = (name) => readFileSync(new URL(name, GOLDEN), "utf8");
// every golden delta with its expectation: delta_<codec> (the sample) and edge_<name> (corner cases)
const DELTAS = readdirSync(GOLDEN).filter((f) => /^(delta|edge)_.+\.json$/.test(f)).map((f) => f.slice(0, -5)).sort();

/** The ContractError a call throws (fails the test if it throws nothing or something else). */
function errorOf(call) {
  try {
    call();
  } catch (e) {
    assert.ok(e instanceof C.ContractError, `expected a ContractError, got ${e?.stack ?? e}`);
    assert.ok(e instanceof Error);
    assert.equal(e.message, `${e.field}: expected ${e.expected}, got ${e.message.split(", got ").slice(1).join(", got ")}`);
    return e;
  }
  assert.fail("expected a ContractError, nothing was thrown");
}
const fieldOf = (call) => errorOf(call).field;

/** float32 values compare bit for bit (so -0 and 0 differ). */
function assertSameFloats(actual, expected, what) {
  const a = new Uint32Array(Float32Array.from(actual).buffer);
  const b = new Uint32Array(Float32Array.from(expected).buffer);
  assert.equal(a.length, b.length, `${what}: length`);
  for (let i = 0; i < a.length; i++) assert.equal(a[i], b[i], `${what}[${i}]: ${actual[i]} != ${expected[i]}`);
}

/** Golden "input"/"decoded" JSON -> Map name -> {shape, data: number[]} (header order). */
const tensorsOf = (obj) => new Map(Object.entries(obj).map(([k, v]) => [k, { shape: v.shape, data: v.values }]));

describe("golden deltas", () => {
  test("the golden deltas are all here", () => {
    for (const name of ["delta_fp32", "delta_fp16", "delta_int8", "delta_topk", "edge_fp16", "edge_int8", "edge_topk"]) {
      assert.ok(DELTAS.includes(name), name);
    }
  });

  for (const name of DELTAS) {
    test(`${name}.bin decodes to ${name}.json`, async () => {
      const expected = json(`${name}.json`);
      const data = bin(`${name}.bin`);
      assert.equal(data.length, expected.bytes);
      assert.equal(await C.blobId(data), expected.sha256);
      const spec = new Map(Object.entries(expected.decoded).map(([k, v]) => [k, [v.shape, "float32"]]));
      for (const out of [C.decodeDelta(data), C.decodeDelta(data, spec, expected.codec), C.decodeDelta(data.buffer)]) {
        assert.ok(out instanceof Map);
        assert.deepEqual([...out.keys()], Object.keys(expected.decoded));
        for (const [k, v] of Object.entries(expected.decoded)) {
          assert.deepEqual(out.get(k).shape, v.shape);
          assert.ok(out.get(k).data instanceof Float32Array);
          assertSameFloats(out.get(k).data, v.values, `${name} ${k}`);
        }
      }
    });

    test(`encoding the golden input gives ${name}.bin byte for byte`, () => {
      const expected = json(`${name}.json`);
      const golden = bin(`${name}.bin`);
      const asNumbers = tensorsOf(expected.input);
      const asFloat32 = new Map([...asNumbers].map(([k, v]) => [k, { shape: v.shape, data: Float32Array.from(v.data) }]));
      const asFloat64 = new Map([...asNumbers].map(([k, v]) => [k, { shape: v.shape, data: Float64Array.from(v.data) }]));
      for (const input of [asNumbers, asFloat32, asFloat64]) {
        assert.deepEqual(C.encodeDelta(expected.codec, input), golden);
      }
      assert.deepEqual(C.encodeDelta(C.parseCodec(expected.codec), asNumbers), golden);
      // a decoded delta re-encodes (fp32 and topk are exact, so they reproduce their own bytes)
      if (expected.codec === "fp32") assert.deepEqual(C.encodeDelta("fp32", C.decodeDelta(golden)), golden);
    });
  }

  test("a wrong codec restriction names delta.codec", () => {
    assert.equal(fieldOf(() => C.decodeDelta(bin("delta_fp32.bin"), null, "int8")), "delta.codec");
    assert.equal(fieldOf(() => C.decodeDelta(bin("delta_topk.bin"), null, "fp32")), "delta.codec");
    C.decodeDelta(bin("delta_topk.bin"), null, "topk:0.5");    // a codec string names its id
  });
});

describe("golden invalid files", () => {
  for (const c of json("invalid.json")) {
    const label = c.spec ? `${c.file} with spec ${JSON.stringify(c.spec)}` : c.file;
    test(`${label} is refused naming ${c.field}`, () => {
      const data = bin(c.file);
      const e = errorOf(() => C.decodeDelta(data, c.spec ?? null));
      assert.equal(e.field, c.field);
      assert.equal(e.code, "invalid");
      assert.ok(e.message.startsWith(`${c.field}: expected `));
    });
  }

  test("every file in tests/golden/invalid/ is listed", () => {
    const listed = new Set(json("invalid.json").map((c) => c.file));
    for (const f of ["bad_json", "bad_magic", "header_length", "int8_minus128", "nan", "short", "topk_unsorted",
      "trailing", "truncated", "unknown_codec"]) assert.ok(listed.has(`invalid/${f}.bin`), f);
  });
});

describe("delta container", () => {
  const container = (header, payload = 16) => {
    const raw = typeof header === "string" ? new TextEncoder().encode(header) : new TextEncoder().encode(JSON.stringify(header));
    const out = new Uint8Array(8 + raw.length + ((4 - ((8 + raw.length) % 4)) % 4) + payload);
    out.set(new TextEncoder().encode("CTD1"));
    new DataView(out.buffer).setUint32(4, raw.length, true);
    out.set(raw, 8);
    return out;
  };
  const good = { codec: "fp32", tensors: [{ name: "w", shape: [4], dtype: "float32" }] };
  const tensor = good.tensors[0];

  test("a hand-made container decodes", () => {
    assert.deepEqual([...C.decodeDelta(container(good)).get("w").data], [0, 0, 0, 0]);
  });

  test("bad headers and entries name the field (as test_contract.py)", () => {
    const cases = [
      ['{"codec":"fp32","codec":"fp32","tensors":[]}', "delta.header"],
      ["[1]", "delta.header"],
      [JSON.stringify({ ...good, extra: 1 }), "delta.header"],
      ['{"codec":"fp32","tensors":[{"name":"w","shape":[4],"dtype":"float32"}],"x":NaN}', "delta.header"],
      ['\ufeff{"codec":"fp32","tensors":[{"name":"w","shape":[4],"dtype":"float32"}]}', "delta.header"],
      [{ ...good, tensors: [{ ...tensor, shape: [-4] }] }, "delta.tensors[w].shape"],
      [{ ...good, tensors: [{ ...tensor, shape: [2 ** 20, 2 ** 20] }] }, "delta.tensors[w].shape"],
      [{ ...good, tensors: [{ ...tensor, dtype: "float64" }] }, "delta.tensors[w].dtype"],
      [{ ...good, tensors: [{ ...tensor, name: "a b" }] }, "delta.tensors[0].name"],
      [{ ...good, tensors: [{ ...tensor, scale: 1 }] }, "delta.tensors[0]"],
      [{ ...good, tensors: [tensor, tensor] }, "delta.tensors[w]"],
      [{ ...good, tensors: [] }, "delta.tensors"],
      [{ codec: "topk", tensors: [{ ...tensor, k: 5 }] }, "delta.tensors[w].k"],
      [{ codec: 7, tensors: [tensor] }, "delta.codec"],
    ];
    for (const [header, field] of cases) assert.equal(fieldOf(() => C.decodeDelta(container(header))), field, JSON.stringify(header));
    // floats are not integers: [4.0] and k 1.0 are refused although JSON.parse could not tell
    assert.equal(fieldOf(() => C.decodeDelta(container(JSON.stringify(good).replace("[4]", "[4.0]")))), "delta.tensors[w].shape");
    const topk = JSON.stringify({ codec: "topk", tensors: [{ ...tensor, k: 1 }] }).replace('"k":1', '"k":1.0');
    assert.equal(fieldOf(() => C.decodeDelta(container(topk, 8))), "delta.tensors[w].k");
    const bad = container(good);
    bad[8] = 0xff;                                 // invalid UTF-8
    assert.equal(fieldOf(() => C.decodeDelta(bad)), "delta.header");
  });

  test("malformed containers of every codec name the field (as test_contract.py)", () => {
    const a = new Map([["conv.weight", { shape: [8, 3, 3, 3], data: Float32Array.from({ length: 216 }, (_, i) => Math.sin(i)) }],
      ["fc.bias", { shape: [10], data: Float32Array.from({ length: 10 }, (_, i) => i - 4.5) }],
      ["bn.scale", { shape: [5], data: new Float32Array(5).fill(0.25) }]]);
    const spec = new Map([...a].map(([k, v]) => [k, [v.shape, "float32"]]));
    for (const codec of C.CODEC_IDS) {
      const data = C.encodeDelta(codec, a);
      const concat = (x, y) => { const o = new Uint8Array(x.length + y.length); o.set(x); o.set(y, x.length); return o; };
      assert.equal(fieldOf(() => C.decodeDelta(data.subarray(0, -1))), "delta");
      assert.equal(fieldOf(() => C.decodeDelta(data.subarray(0, -4))), "delta");
      assert.equal(fieldOf(() => C.decodeDelta(concat(data, new Uint8Array(4)))), "delta");
      assert.equal(fieldOf(() => C.decodeDelta(concat(new TextEncoder().encode("XTD1"), data.subarray(4)))), "delta.magic");
      assert.equal(fieldOf(() => C.decodeDelta(data.subarray(0, 3))), "delta");
      assert.equal(fieldOf(() => C.decodeDelta("text")), "delta");
      assert.equal(fieldOf(() => C.decodeDelta(data, new Map([...spec, ["fc.bias", [[11], "float32"]]]))), "delta.tensors[fc.bias].shape");
      assert.equal(fieldOf(() => C.decodeDelta(data, new Map([...spec, ["fc.bias", [[10], "float16"]]]))), "delta.tensors[fc.bias].dtype");
      assert.equal(fieldOf(() => C.decodeDelta(data, new Map([...spec, ["extra", [[1], "float32"]]]))), "delta.tensors[extra]");
      assert.equal(fieldOf(() => C.decodeDelta(data, new Map([...spec].filter(([k]) => k !== "bn.scale")))), "delta.tensors[bn.scale]");
      assert.equal(fieldOf(() => C.decodeDelta(data, null, codec === "fp32" ? "fp16" : "fp32")), "delta.codec");
      // spec forms: object of {shape}, object of shapes
      C.decodeDelta(data, Object.fromEntries([...a].map(([k, v]) => [k, { shape: v.shape }])));
      C.decodeDelta(data, Object.fromEntries([...a].map(([k, v]) => [k, v.shape])));
    }
  });

  test("NaN, Inf, non-zero padding, -128 and bad topk indices are refused", () => {
    const data = C.encodeDelta("fp32", { w: Float32Array.of(0, 1, 2, 3) });
    for (const bad of [NaN, Infinity, -Infinity]) {
      const copy = data.slice();
      new DataView(copy.buffer).setFloat32(copy.length - 12, bad, true);
      assert.equal(fieldOf(() => C.decodeDelta(copy)), "delta.tensors[w].values");
    }
    const padded = C.encodeDelta("fp32", { abc: Float32Array.of(1) });
    const headEnd = 8 + new DataView(padded.buffer).getUint32(4, true);
    assert.ok(headEnd % 4 !== 0);
    padded[headEnd] = 1;
    assert.equal(fieldOf(() => C.decodeDelta(padded)), "delta.padding");
    const half = C.encodeDelta("fp16", { w: Float32Array.of(1, 2, 3) });
    half[half.length - 1] = 7;                                     // the padding after 3 halves
    assert.equal(fieldOf(() => C.decodeDelta(half)), "delta.padding");
    const halfInf = C.encodeDelta("fp16", { w: Float32Array.of(1, 2) });
    new DataView(halfInf.buffer).setUint16(halfInf.length - 2, 0x7c00, true);
    assert.equal(fieldOf(() => C.decodeDelta(halfInf)), "delta.tensors[w].values");
    const int8 = C.encodeDelta("int8", { w: Float32Array.of(1, -1, 0.5, 0) });
    new DataView(int8.buffer).setFloat32(int8.length - 8, -1, true);
    assert.equal(fieldOf(() => C.decodeDelta(int8)), "delta.tensors[w].scale");
    const topk = C.encodeDelta("topk:0.5", { w: Float32Array.of(5, 0, 0, 6) });
    const view = new DataView(topk.buffer);
    view.setUint32(topk.length - 16, 9, true);                     // index 9 of 4
    assert.equal(fieldOf(() => C.decodeDelta(topk)), "delta.tensors[w].indices");
    view.setUint32(topk.length - 16, 3, true);                     // [3, 3]: not strictly increasing
    assert.equal(fieldOf(() => C.decodeDelta(topk)), "delta.tensors[w].indices");
  });

  test("random corruption throws nothing but ContractError, and what decodes is finite", () => {
    let seed = 5;
    const rand = (n) => { seed = (seed * 1103515245 + 12345) % 2 ** 31; return seed % n; };
    const a = { "conv.weight": Float32Array.from({ length: 54 }, (_, i) => Math.cos(i) / 10), "fc.bias": Float32Array.of(0.5, -0.25, 0.1, -1) };
    const blobs = C.CODEC_IDS.map((c) => C.encodeDelta(c, a));
    let decoded = 0;
    for (let t = 0; t < 600; t++) {
      let data = blobs[rand(blobs.length)].slice();
      for (let j = 0, m = 1 + rand(3); j < m; j++) data[rand(data.length)] = rand(256);
      if (rand(10) < 3) data = data.slice(0, rand(data.length));
      let out;
      try {
        out = C.decodeDelta(data);
      } catch (e) {
        assert.ok(e instanceof C.ContractError, e.stack);
        continue;
      }
      decoded += 1;
      // never NaN (an int8 scale near the float32 maximum can give ±Infinity, in Python as here)
      for (const { data: v } of out.values()) assert.ok(v.every((x) => !Number.isNaN(x)));
    }
    assert.ok(decoded > 0);
  });
});

describe("codecs", () => {
  const a = new Map([["w", { shape: [2, 5], data: Float32Array.of(0.1, -0.7, 0.3, 0, -0, 1e-8, 7, -7, 3.5, -2.25) }]]);

  test("fp32 is exact and fp16 rounds to nearest even", () => {
    assertSameFloats(C.decodeDelta(C.encodeDelta("fp32", a)).get("w").data, a.get("w").data, "fp32");
    // 1 + 2^-11 is halfway between two halves: it rounds to even (1); 1 + 3*2^-11 rounds up
    const ties = Float32Array.of(1 + 2 ** -11, 1 + 3 * 2 ** -11, 2 ** -25, 3 * 2 ** -25, 65504, -65519.99, 2 ** -24);
    assertSameFloats(C.decodeDelta(C.encodeDelta("fp16", { t: ties })).get("t").data,
      [1, 1 + 2 ** -9, 0, 2 ** -23, 65504, -65504, 2 ** -24], "fp16");
    assert.equal(fieldOf(() => C.encodeDelta("fp16", { w: Float32Array.of(1, 65520) })), "delta[w]");
    assert.equal(fieldOf(() => C.encodeDelta("fp16", { w: Float32Array.of(1e6) })), "delta[w]");
  });

  test("int8 rounds half to even and stays within half a step", () => {
    const out = C.decodeDelta(C.encodeDelta("int8", { x: Float32Array.of(127, 0.5, 1.5, 2.5, -0.5, -2.5, -127) })).get("x").data;
    assert.deepEqual([...out], [127, 0, 2, 2, -0, -2, -127].map((v) => v + 0));
    const x = a.get("w").data;
    const got = C.decodeDelta(C.encodeDelta("int8", a)).get("w").data;
    const scale = 7 / 127;
    x.forEach((v, i) => assert.ok(Math.abs(got[i] - v) <= (scale / 2) * (1 + 1e-5)));
    assertSameFloats(C.decodeDelta(C.encodeDelta("int8", { z: new Float32Array(3) })).get("z").data, [0, 0, 0], "zeros");
  });

  test("topk keeps the largest |x|, ties to the lower index (as test_contract.py)", () => {
    const x = Float32Array.of(1, -3, 2, 3, -2, 3);
    const kept = (fraction) => [...C.decodeDelta(C.encodeDelta(`topk:${fraction}`, { x })).get("x").data]
      .flatMap((v, i) => (v !== 0 ? [i] : []));
    assert.deepEqual(kept(2 / 6), [1, 3]);
    assert.deepEqual(kept(4 / 6), [1, 2, 3, 5]);
    assert.deepEqual(kept(1), [0, 1, 2, 3, 4, 5]);
    assert.equal(C.topkCount(54, 0.125), 7);
    assert.equal(C.topkCount(4, 0.125), 1);
    assert.equal(C.topkCount(0, 0.5), 0);
    assert.equal(C.topkCount(100, 0.07), 7);                      // 7.000000000000001 - 1e-9 -> 7
  });

  test("empty and scalar tensors round-trip in every codec", () => {
    const t = new Map([["empty", { shape: [0, 3], data: new Float32Array(0) }], ["scalar", -2.5]]);
    for (const codec of C.CODEC_IDS) {
      const out = C.decodeDelta(C.encodeDelta(codec, t), { empty: [[0, 3], "float32"], scalar: [[], "float32"] });
      assert.deepEqual(out.get("empty").shape, [0, 3]);
      assert.equal(out.get("empty").data.length, 0);
      assert.deepEqual(out.get("scalar").shape, []);
      assert.deepEqual([...out.get("scalar").data], [-2.5]);
    }
  });

  test("encode refuses bad input naming the field (as test_contract.py)", () => {
    assert.equal(fieldOf(() => C.encodeDelta("fp32", {})), "delta");
    assert.equal(fieldOf(() => C.encodeDelta("fp32", new Map())), "delta");
    assert.equal(fieldOf(() => C.encodeDelta("fp32", { w: Int32Array.of(1, 2, 3) })), "delta[w]");
    assert.equal(fieldOf(() => C.encodeDelta("int8", { w: Float32Array.of(1, NaN) })), "delta[w]");
    assert.equal(fieldOf(() => C.encodeDelta("fp32", { w: Float64Array.of(1e39) })), "delta[w]");  // inf as float32
    assert.equal(fieldOf(() => C.encodeDelta("fp32", { "bad name": Float32Array.of(1) })), "delta");
    assert.equal(fieldOf(() => C.encodeDelta("fp32", { w: { shape: [2, 2], data: Float32Array.of(1, 2, 3) } })), "delta[w]");
    assert.equal(fieldOf(() => C.encodeDelta("zip", { w: Float32Array.of(1) })), "codec");
    assert.equal(fieldOf(() => C.encodeDelta("topk:2", { w: Float32Array.of(1) })), "codec.fraction");
  });

  test("parseCodec mirrors get_codec", () => {
    assert.deepEqual({ ...C.parseCodec("int8") }, { id: "int8", fraction: null, name: "int8", ratio: 0.25 });
    assert.deepEqual({ ...C.parseCodec("topk") }, { id: "topk", fraction: 0.01, name: "topk", ratio: 0.02 });
    assert.equal(C.parseCodec("topk:0.05").name, "topk:0.05");
    assert.equal(C.parseCodec("topk:0.01").name, "topk");
    assert.equal(C.parseCodec("topk:1").name, "topk:1.0");
    assert.equal(C.parseCodec("topk: 0.2_5 ").fraction, 0.25);
    assert.equal(C.parseCodec("topk:.5e-1").fraction, 0.05);
    for (const [s, field] of [["zip", "codec"], ["int8:3", "codec"], ["topk:", "codec"], ["topk:0x1", "codec"],
      ["topk:2", "codec.fraction"], ["topk:0", "codec.fraction"], ["topk:nan", "codec.fraction"], ["topk:-inf", "codec.fraction"],
      [5, "codec"]]) assert.equal(fieldOf(() => C.parseCodec(s)), field, String(s));
  });
});

describe("messages", () => {
  const unitText = text("unit.json");
  const unit = JSON.parse(unitText);
  /** unit.json with changes; a value given as {raw: "2.0"} is written into the JSON text as is. */
  function variant(changes) {
    const raws = [];
    const obj = { ...unit };
    for (const [k, v] of Object.entries(changes)) {
      if (v === undefined) delete obj[k];
      else if (v && typeof v === "object" && "raw" in v) { raws.push(v.raw); obj[k] = `@@raw${raws.length - 1}@@`; }
      else obj[k] = v;
    }
    return raws.reduce((t, raw, i) => t.replace(`"@@raw${i}@@"`, raw), JSON.stringify(obj));
  }

  test("unit.json validates, as text, bytes and object", () => {
    for (const input of [unitText, new TextEncoder().encode(unitText), unit]) {
      const u = C.checkUnit(input);
      assert.deepEqual(Object.keys(u), Object.keys(unit));
      assert.deepEqual(u, unit);
    }
  });

  const broken = [
    [{ hyper: { lr: NaN } }, "unit.hyper.lr"],
    [{ hyper: { momentum: 0.9 } }, "unit.hyper.lr"],
    [{ hyper: { lr: 0.1, momentum: 1.0 } }, "unit.hyper.momentum"],
    [{ hyper: { lr: 0.1, loss: "mse" } }, "unit.hyper.loss"],
    [{ hyper: { lr: 0.1, flip: 1 } }, "unit.hyper.flip"],
    [{ hyper: { lr: 0.1, crop_reflect: "yes" } }, "unit.hyper.crop_reflect"],
    [{ hyper: { lr: 0.1, warmup: 0.2 } }, "unit.hyper.warmup"],
    [{ hyper: { lr: 0.1, toString: 1 } }, "unit.hyper.toString"],
    [{ hyper: [] }, "unit.hyper"],
    [{ local_steps: 0 }, "unit.local_steps"],
    [{ local_steps: { raw: "2.0" } }, "unit.local_steps"],
    [{ batch_size: true }, "unit.batch_size"],
    [{ seed: 2 ** 31 }, "unit.seed"],
    [{ seed: -1 }, "unit.seed"],
    [{ base_step: { raw: "9007199254740993" } }, "unit.base_step"],
    [{ codec: "zip" }, "unit.codec"],
    [{ codec: "topk:2" }, "unit.codec"],
    [{ codec: "int8:3" }, "unit.codec"],
    [{ model_version: "ABC" }, "unit.model_version"],
    [{ shard_ids: [] }, "unit.shard_ids"],
    [{ shard_ids: ["0".repeat(64), "xyz"] }, "unit.shard_ids[1]"],
    [{ unit_id: "a/b" }, "unit.unit_id"],
    [{ lease: "" }, "unit.lease"],
    [{ lease: "has space" }, "unit.lease"],
    [{ deadline: Infinity }, "unit.deadline"],
    [{ deadline: { raw: "1" + "0".repeat(400) } }, "unit.deadline"],
    [{ deadline: { raw: "1e400" } }, "unit.deadline"],
    [{ deadline: "soon" }, "unit.deadline"],
    [{ base_step: -1 }, "unit.base_step"],
    [{ colour: "red" }, "unit.colour"],
    [{ lease: undefined }, "unit.lease"],
    [{ job: null }, "unit.job"],
  ];
  for (const [changes, field] of broken) {
    test(`a unit with ${JSON.stringify(changes)} is refused naming ${field}`, () => {
      const asText = variant(changes);
      const e = errorOf(() => C.checkUnit(asText));
      assert.equal(e.field, field);
      assert.equal(e.code, "invalid");
      const raw = Object.values(changes).some((v) => v && typeof v === "object" && "raw" in v);
      if (!raw) {     // the same change in an already parsed object
        const obj = { ...unit, ...changes };
        for (const [k, v] of Object.entries(changes)) if (v === undefined) delete obj[k];
        assert.equal(fieldOf(() => C.checkUnit(obj)), field);
      }
    });
  }

  test("protocol comes first and has its own code", () => {
    for (const protocol of [2, { raw: "1.0" }, "1", true, undefined]) {
      const e = errorOf(() => C.checkUnit(variant({ protocol, colour: "red" })));
      assert.deepEqual([e.field, e.code], ["unit.protocol", "unsupported_protocol"]);
    }
    assert.equal(fieldOf(() => C.checkUnit("[]")), "unit");
    assert.equal(fieldOf(() => C.checkUnit("{")), "unit");
    assert.equal(fieldOf(() => C.checkUnit([])), "unit");
    assert.equal(errorOf(() => C.checkUnit(variant({ lease: undefined }))).message, "unit.lease: expected a value (required field), got nothing");
    assert.equal(errorOf(() => C.checkUnit({ ...unit, hyper: { lr: -1 } })).message, "unit.hyper.lr: expected a finite number > 0, got -1");
    assert.deepEqual(C.errorBody(errorOf(() => C.checkUnit({ ...unit, seed: -1 }))),
      { error: { code: "invalid", field: "unit.seed", message: "unit.seed: expected an integer in [0, 2147483647], got -1" } });
  });

  test("a unit request validates and fills defaults", () => {
    assert.deepEqual(C.checkRequest({ protocol: 1, worker_id: "w1", backend: "browser" }),
      { protocol: 1, worker_id: "w1", backend: "browser", codecs: ["fp32", "fp16", "int8", "topk"], models: [] });
    assert.equal(fieldOf(() => C.checkRequest({ protocol: 1, worker_id: "w1", backend: "gpu" })), "request.backend");
    assert.equal(fieldOf(() => C.checkRequest({ protocol: 1, worker_id: "w1", backend: "python", codecs: ["gzip"] })), "request.codecs");
    assert.equal(errorOf(() => C.checkRequest({ worker_id: "w1", backend: "python" })).code, "unsupported_protocol");
  });
});

describe("result body", () => {
  const golden = bin("result.bin");
  const delta = bin("delta_int8.bin");

  test("result.bin unpacks to result.json and delta_int8.bin", () => {
    const { meta, delta: d } = C.unpackResult(golden);
    assert.deepEqual(meta, json("result.json"));
    assert.deepEqual(Object.keys(meta), Object.keys(json("result.json")));
    assert.deepEqual(d, delta);
    C.decodeDelta(d, null, "int8");
  });

  test("packing result.json with the delta gives result.bin byte for byte", () => {
    assert.deepEqual(C.packResult(json("result.json"), delta), golden);
    assert.deepEqual(C.packResult(C.unpackResult(golden).meta, delta), golden);
    assert.deepEqual(C.packResult(JSON.parse(text("result.json")), delta.buffer), golden);
  });

  test("a failed unit packs to result_error.bin and unpacks with an empty delta", () => {
    const failed = json("result_error.json");
    const body = C.packResult(failed, new Uint8Array(0));
    assert.deepEqual(body, bin("result_error.bin"));
    const meta = new TextDecoder().decode(body.subarray(8, 8 + new DataView(body.buffer).getUint32(4, true)));
    assert.equal(meta, JSON.stringify(failed).replace('"loss_before":0,"loss_after":0', '"loss_before":0.0,"loss_after":0.0'));
    const back = C.unpackResult(body);
    assert.deepEqual(back.meta, failed);
    assert.equal(back.delta.length, 0);
    assert.equal(fieldOf(() => C.packResult(failed, delta)), "result.delta");
    assert.equal(fieldOf(() => C.packResult(json("result.json"), new Uint8Array(0))), "result.delta");
    assert.equal(fieldOf(() => C.packResult({ ...failed, error: "" }, new Uint8Array(0))), "result.error");
    assert.equal(fieldOf(() => C.packResult({ ...failed, error: "x".repeat(2001) }, new Uint8Array(0))), "result.error");
    C.packResult({ ...failed, error: "\u{1F600}".repeat(2000) }, new Uint8Array(0));   // 2000 code points
  });

  test("numbers are written as Python writes them", () => {
    const meta = { ...json("result.json"), loss_before: 3, loss_after: 1e-5, compute_seconds: 1e16, num_samples: 0 };
    const body = C.packResult(meta, delta);
    const text = new TextDecoder().decode(body.subarray(8, 8 + new DataView(body.buffer).getUint32(4, true)));
    assert.ok(text.includes('"loss_before":3.0,"loss_after":1e-05,"num_samples":0,"compute_seconds":1e+16,'), text);
    const cases = [[0.1, "0.1"], [-0.0, "-0.0"], [123456789012345680, "1.2345678901234568e+17"], [1234567890123456, "1234567890123456.0"],
      [0.0001, "0.0001"], [0.00012, "0.00012"], [5e-324, "5e-324"], [1.7976931348623157e308, "1.7976931348623157e+308"], [2.302585, "2.302585"]];
    for (const [x, repr] of cases) assert.equal(C.pyFloatRepr(x), repr);
  });

  test("malformed bodies name the field (as test_contract.py)", () => {
    const length = new DataView(golden.buffer, golden.byteOffset).getUint32(4, true);
    const bad = (f) => { const b = golden.slice(); f(b); return b; };
    assert.equal(fieldOf(() => C.unpackResult(bad((b) => { b[3] = 0x32; }))), "result.magic");
    assert.equal(fieldOf(() => C.unpackResult(golden.subarray(0, 10))), "result.metadata_length");
    assert.equal(fieldOf(() => C.unpackResult(golden.subarray(0, 6))), "result");
    assert.equal(fieldOf(() => C.unpackResult(bad((b) => b.fill(0x7b, 8, 8 + length)))), "result.metadata");
    const pad = new Uint8Array(8 + length + 8).fill(1);
    pad.set(golden.subarray(0, 8 + length));
    assert.ok(["result.padding", "result.delta"].includes(fieldOf(() => C.unpackResult(pad))));
    const dup = new TextEncoder().encode('{"protocol":1,"protocol":1}');
    const body = new Uint8Array(8 + 28);
    body.set(new TextEncoder().encode("CTR1"));
    new DataView(body.buffer).setUint32(4, 27, true);
    body.set(dup, 8);
    assert.equal(fieldOf(() => C.unpackResult(body)), "result.metadata");
    const meta = json("result.json");
    const pack = (m) => { const t = new TextEncoder().encode(JSON.stringify(m)); const o = new Uint8Array(8 + t.length + ((4 - (t.length % 4)) % 4) + delta.length); o.set(new TextEncoder().encode("CTR1")); new DataView(o.buffer).setUint32(4, t.length, true); o.set(t, 8); o.set(delta, o.length - delta.length); return o; };
    assert.equal(fieldOf(() => C.unpackResult(pack({ ...meta, delta: "AAAA" }))), "result.delta");
    assert.equal(fieldOf(() => C.unpackResult(pack({ ...meta, num_samples: -1 }))), "result.num_samples");
    assert.equal(fieldOf(() => C.unpackResult(pack({ ...meta, loss_after: -0.5 }))), "result.loss_after");
    assert.equal(fieldOf(() => C.unpackResult(pack({ ...meta, worker_id: "" }))), "result.worker_id");
    assert.equal(errorOf(() => C.unpackResult(pack({ ...meta, protocol: 2 }))).code, "unsupported_protocol");
    const { error, ...noError } = meta;
    assert.equal(C.unpackResult(pack(noError)).meta.error, null);
  });
});

describe("shards and blobs", () => {
  function shard(n, h, w, label = (i) => i % 10) {
    const out = new Uint8Array(16 + n * (3 * h * w + 1));
    out.set(new TextEncoder().encode("CTS1"));
    const view = new DataView(out.buffer);
    [n, h, w].forEach((v, i) => view.setUint32(4 + 4 * i, v, true));
    for (let i = 16; i < 16 + n * 3 * h * w; i++) out[i] = (i * 31) % 256;
    for (let i = 0; i < n; i++) out[16 + n * 3 * h * w + i] = label(i);
    return out;
  }

  test("a shard decodes to views of its pixels and labels", () => {
    const data = shard(7, 32, 32);
    const { n, h, w, x, y } = C.decodeShard(data);
    assert.deepEqual([n, h, w], [7, 32, 32]);
    assert.equal(x.length, 7 * 3 * 32 * 32);
    assert.equal(x[0], (16 * 31) % 256);
    assert.deepEqual([...y], [0, 1, 2, 3, 4, 5, 6]);
    assert.equal(x.buffer, data.buffer);
  });

  test("malformed shards name the field (as test_contract.py)", () => {
    const data = shard(2, 4, 4, (i) => i + 1);
    const with_ = (f) => { const b = data.slice(); f(b); return b; };
    const longer = new Uint8Array(data.length + 1);
    longer.set(data);
    assert.equal(fieldOf(() => C.decodeShard(data.subarray(0, -1))), "shard");
    assert.equal(fieldOf(() => C.decodeShard(longer)), "shard");
    assert.equal(fieldOf(() => C.decodeShard(with_((b) => b.set([88, 88, 88, 88])))), "shard.magic");
    assert.equal(fieldOf(() => C.decodeShard(with_((b) => { b[b.length - 1] = 10; }))), "shard.labels");
    assert.equal(fieldOf(() => C.decodeShard(with_((b) => b.fill(0, 4, 8)))), "shard.shape");
    assert.equal(fieldOf(() => C.decodeShard(data.subarray(0, 10))), "shard");
  });

  test("blobId is the sha256 hex of the bytes", async () => {
    assert.equal(await C.blobId(new Uint8Array(0)), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    const data = bin("result.bin");
    assert.equal(await C.blobId(data), createHash("sha256").update(data).digest("hex"));
    assert.equal(await C.blobId(new TextEncoder().encode("example model blob")), json("unit.json").model_version);
    assert.ok(C.isBlobId(json("unit.json").model_version) && !C.isBlobId("ABC"));
  });
});

describe("unit requests", () => {
  const golden = json("requests.json");
  test("a runtime note is made as Python makes it", () => {
    for (const c of golden.notes) assert.equal(C.runtimeNote(c.text), c.note, JSON.stringify(c.text));
  });
  for (const [i, c] of golden.cases.entries()) {
    test(`case ${i}: ${JSON.stringify(c.body).slice(0, 60)}`, () => {
      for (const input of [JSON.stringify(c.body), c.body]) {
        if ("request" in c) {
          assert.deepEqual(C.checkRequest(input), c.request);
          assert.deepEqual(C.checkRequest(c.request), c.request);
        } else {
          const e = errorOf(() => C.checkRequest(input));
          assert.deepEqual([e.field, e.code], [c.field, c.code]);
        }
      }
    });
  }
});

describe("display-name requests", () => {
  const golden = json("names.json");

  test("the limit is Python's", () => assert.equal(C.NAME_MAX_CHARS, golden.max_chars));

  for (const [i, c] of golden.cases.entries()) {
    test(`case ${i}: ${JSON.stringify(c.body).slice(0, 60)}`, () => {
      for (const input of [JSON.stringify(c.body), c.body]) {
        if (typeof input !== "string" && typeof c.body === "string") continue;   // a bare JS string is JSON text
        if ("name" in c) {
          assert.deepEqual(C.checkNameRequest(input), { protocol: 1, name: c.name });
        } else {
          const e = errorOf(() => C.checkNameRequest(input));
          assert.deepEqual([e.field, e.code], [c.field, c.code]);
        }
      }
    });
  }
});

describe("version deltas", () => {
  const golden = json("version_delta.json");
  const held = () => C.decodeDelta(bin(golden.held));
  const asyncFieldOf = async (promise) => {
    try {
      await promise;
    } catch (e) {
      assert.ok(e instanceof C.ContractError, `expected a ContractError, got ${e?.stack ?? e}`);
      return e.field;
    }
    assert.fail("expected a ContractError, nothing was thrown");
  };

  test("the golden delta rebuilds the reconstruction bit for bit and its hash checks", async () => {
    const blob = bin("version_delta.bin");
    assert.equal(await C.blobId(blob), golden.sha256);
    const state = await C.reconstructBase(held(), blob, golden.reconstruction_sha256);
    assert.deepEqual([...state.keys()], Object.keys(golden.reconstructed));
    for (const [name, t] of state) {
      assert.deepEqual(t.shape, golden.reconstructed[name].shape);
      assertSameFloats(t.data, golden.reconstructed[name].values, name);
    }
    assert.equal(await C.blobId(C.encodeDelta("fp32", state)), golden.reconstruction_sha256);
  });

  test("malformed deltas and a held version that is not the one named are refused naming the field", async () => {
    for (const c of golden.invalid) {
      const from = c.held ? C.decodeDelta(bin(c.held)) : held();
      const got = await asyncFieldOf(C.reconstructBase(from, Uint8Array.from(Buffer.from(c.hex, "hex")),
        golden.reconstruction_sha256));
      assert.equal(got, c.field, c.name);
    }
    assert.equal(await asyncFieldOf(C.inflate(bin("version_delta.bin"), 10)), "version_delta");   // a zip bomb
  });
});
