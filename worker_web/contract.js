/**
 * The wire contract of crowdtrain, in JavaScript: the twin of the Python package `contract/`.
 *
 * One dependency-free ES module that runs in a browser Web Worker and in Node 20 (no `node:`
 * imports; TextEncoder/TextDecoder, DataView and crypto.subtle only). It reads and writes the
 * same bytes as the Python reference and refuses the same malformed input with the same error
 * `field` (docs/protocol.md is the spec, tests/golden/ the shared test vectors):
 *
 * - `decodeDelta` / `encodeDelta`: the `CTD1` delta container and its codecs fp32, fp16, int8,
 *   topk[:fraction]. Encoding is byte-identical to Python's `encode_delta` (same JSON header
 *   text, fp16 round-to-nearest-even, int8 scale and rounding as numpy does them in float32,
 *   topk selection with ties going to the lower index).
 * - `packResult` / `unpackResult`: the `CTR1` result body (JSON metadata + delta), metadata
 *   serialised as Python's `json.dumps(separators=(",", ":"), ensure_ascii=False)` does.
 * - `checkUnit`, `checkRequest`, `checkResult`, `checkNameRequest`: the JSON messages, with the field rules and error
 *   field names of contract/units.py (`protocol` first -> code `unsupported_protocol`).
 * - `decodeShard`: the `CTS1` data-shard blob. `blobId`: sha256 hex (async).
 *
 * Python draws a line between the JSON numbers `2` (int) and `2.0` (float), and so does this
 * module when it parses JSON text itself (`unpackResult`, and `checkUnit` given text or bytes).
 * A plain JS object cannot tell them apart: there, an integral number counts as an integer.
 *
 * Every violation throws `ContractError(field, expected, got)` with `.code` "invalid" (or
 * "unsupported_protocol"); the message reads `<field>: expected <what>, got <value>`.
 */

// --- constants (as in contract/*.py) -------------------------------------------------------------

export const PROTOCOL_VERSION = 1;
export const CODEC_IDS = Object.freeze(["fp32", "fp16", "int8", "topk"]);
export const DEFAULT_TOPK_FRACTION = 0.01;    // fraction of each tensor's entries that "topk" keeps
export const DTYPE = "float32";               // the only logical tensor dtype
export const DELTA_MAGIC = "CTD1";
export const RESULT_MAGIC = "CTR1";
export const SHARD_MAGIC = "CTS1";
export const ALIGN = 4;                       // every delta payload starts at a multiple of 4 bytes
export const MAX_HEADER_BYTES = 2 ** 20;      // JSON header of a delta container, bytes
export const MAX_ELEMENTS = 2 ** 28;          // elements a delta container may declare in all
export const MAX_META_BYTES = 2 ** 16;        // JSON metadata of a result body, bytes
export const MAX_ERROR_CHARS = 2000;          // a failed unit's error text (code points)
export const MAX_LOCAL_STEPS = 100000;
export const MAX_BATCH_SIZE = 65536;
export const MAX_HELD = 4;                    // model versions a unit request may say it holds
export const MAX_IMAGES = 2 ** 20;            // images in one data shard
export const NUM_CLASSES = 10;
export const BACKENDS = Object.freeze(["python", "browser"]);
export const RUNTIMES = Object.freeze(["cpu", "cuda", "wasm", "webgpu"]);   // UnitRequest.runtime
export const CHECK_OUTCOMES = Object.freeze(["passed", "failed"]);         // UnitRequest.webgpu_check
export const LOSSES = Object.freeze(["ce", "focal"]);

const NAME_RE = /^[A-Za-z0-9_.:/-]{1,256}$/;   // tensor names
const ID_RE = /^[A-Za-z0-9_.-]{1,128}$/;       // job, unit and worker ids
const MODEL_RE = /^[A-Za-z0-9_.-]{1,64}$/;     // model names
const HEX_RE = /^[0-9a-f]{64}$/;               // sha256 blob ids
const NOTE_RE = /^[\x20-\x7e]{1,200}$/;         // UnitRequest.runtime_note: one line of printable ASCII
const LEASE_RE = /^[\x21-\x7e]{1,1024}$/;      // printable ASCII, no spaces
const ID_PATTERN = "[A-Za-z0-9_.\\-]{1,128}";   // as Python prints the patterns in messages
const MODEL_PATTERN = "[A-Za-z0-9_.\\-]{1,64}";
const NAME_PATTERN = "[A-Za-z0-9_.:/\\-]{1,256}";
const MAX_INT_DIGITS = 4300;                  // Python refuses to parse longer integers (ValueError)
const MAX_JSON_DEPTH = 900;                   // about where Python's json.loads hits RecursionError

const LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;
const UTF8 = new TextEncoder();
const UTF8_STRICT = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true });

// --- errors ------------------------------------------------------------------------------------

/** Sentinel `got` for a required field that is absent; shows as `nothing`. */
export const MISSING = Object.freeze({ toString: () => "nothing" });

/** A `got` value that is a description, shown without quotes (`got 12 bytes`). */
export class Said {
  constructor(text) { this.text = String(text); }
  toString() { return this.text; }
}

/**
 * A message or delta that breaks the wire contract (Python: `contract.errors.ContractError`).
 * `field` is a dotted path (`unit.hyper.lr`, `delta.tensors[fc.bias].shape`), `expected` what
 * the contract wants, `got` the offending value (or a `Said` description), `code` the
 * machine-readable code of the HTTP error body ("invalid" or "unsupported_protocol").
 */
export class ContractError extends Error {
  constructor(field, expected, got, { code = "invalid" } = {}) {
    super(`${field}: expected ${expected}, got ${show(got)}`);
    this.name = "ContractError";
    this.field = field;
    this.expected = expected;
    this.got = toPlain(got);      // JSON-parsed values as plain JS (Maps -> objects, floats -> numbers)
    this.code = code;
  }

  /** The `error` object of an HTTP error body: `{code, field, message}`. */
  toDict() {
    return { code: this.code, field: this.field, message: this.message };
  }
}

/** `{"error": {code, field, message}}`: the JSON body of a 4xx response. */
export function errorBody(err) {
  return { error: err.toDict() };
}

const GOT_CHARS = 80;

/** Short rendering of an offending value (Python's `repr`, roughly), never a whole payload. */
function show(value) {
  if (value instanceof ArrayBuffer || ArrayBuffer.isView(value)) return `${value.byteLength} bytes`;
  const text = pyRepr(value);
  return text.length <= GOT_CHARS ? text : text.slice(0, GOT_CHARS - 3) + "...";
}

function pyRepr(value) {
  if (value === MISSING || value instanceof Said) return String(value);
  if (value === null || value === undefined) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (value instanceof JsonFloat) return pyFloatRepr(value.value);
  if (typeof value === "number") return Number.isInteger(value) ? String(value) : pyFloatRepr(value);
  if (typeof value === "bigint") return value.toString();
  if (typeof value === "string") {
    const quote = value.includes("'") && !value.includes('"') ? '"' : "'";
    const body = value.replace(/[\\\n\r\t]|[\x00-\x1f\x7f]/g, (c) =>
      ({ "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t" })[c] ?? `\\x${c.charCodeAt(0).toString(16).padStart(2, "0")}`);
    return quote + (quote === "'" ? body.replaceAll("'", "\\'") : body) + quote;
  }
  if (Array.isArray(value)) return `[${value.map(pyRepr).join(", ")}]`;
  if (ArrayBuffer.isView(value) || value instanceof ArrayBuffer) return `${value.byteLength} bytes`;
  if (isObject(value)) return `{${entriesOf(value).map(([k, v]) => `${pyRepr(k)}: ${pyRepr(v)}`).join(", ")}}`;
  return String(value);
}

/** Python's `type(x).__name__` for the JSON-like values a message may hold. */
function pyTypeName(value) {
  if (value === null || value === undefined) return "NoneType";
  if (typeof value === "boolean") return "bool";
  if (typeof value === "bigint" || (typeof value === "number" && Number.isInteger(value))) return "int";
  if (typeof value === "number" || value instanceof JsonFloat) return "float";
  if (typeof value === "string") return "str";
  if (Array.isArray(value)) return "list";
  if (ArrayBuffer.isView(value) || value instanceof ArrayBuffer) return "bytes";
  if (isObject(value)) return "dict";
  return typeof value;
}

function need(ok, field, expected, got) {
  if (!ok) throw new ContractError(field, expected, got);
}

// --- Python-compatible JSON --------------------------------------------------------------------

/** A JSON number written with a fraction or exponent: Python's `float`, even when integral (`2.0`). */
class JsonFloat {
  constructor(value) { this.value = value; }
}

/**
 * Python's `repr(float)`: shortest round-trip digits (as JS), but `1e-05`, `1e+16`, `2.0`.
 * Scientific notation when the decimal point would sit more than 16 digits right or 4 left.
 */
export function pyFloatRepr(x) {
  if (Number.isNaN(x)) return "nan";
  if (!Number.isFinite(x)) return x > 0 ? "inf" : "-inf";
  if (x === 0) return Object.is(x, -0) ? "-0.0" : "0.0";
  const sign = x < 0 ? "-" : "";
  const [mantissa, exponent = "0"] = String(Math.abs(x)).split("e");
  const [intPart, fracPart = ""] = mantissa.split(".");
  let digits = intPart + fracPart;
  let point = intPart.length + Number(exponent);          // value = 0.<digits> * 10^point
  const lead = digits.length - digits.replace(/^0+/, "").length;
  digits = digits.slice(lead).replace(/0+$/, "");
  point -= lead;
  if (point <= -4 || point > 16) {
    const e = point - 1;
    const mant = digits.length > 1 ? `${digits[0]}.${digits.slice(1)}` : digits;
    return `${sign}${mant}e${e < 0 ? "-" : "+"}${String(Math.abs(e)).padStart(2, "0")}`;
  }
  if (point <= 0) return `${sign}0.${"0".repeat(-point)}${digits}`;
  if (point >= digits.length) return `${sign}${digits}${"0".repeat(point - digits.length)}.0`;
  return `${sign}${digits.slice(0, point)}.${digits.slice(point)}`;
}

const WS = /[ \t\n\r]*/y;
const NUMBER = /-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?/y;
const PLAIN_CHARS = /[^"\\\x00-\x1f]*/y;
const ESCAPES = { '"': '"', "\\": "\\", "/": "/", b: "\b", f: "\f", n: "\n", r: "\r", t: "\t" };

/**
 * Parse UTF-8 JSON as Python's `contract.codecs.strict_json` does: strict UTF-8 (a BOM is an
 * error), no duplicate keys, no NaN/Infinity, integers kept apart from floats. Objects become
 * Maps (key order kept), floats `JsonFloat`, integers numbers (BigInt beyond 2^53).
 * Any problem is `ContractError(field, ...)`.
 */
function parseJsonTree(raw, field) {
  let text;
  try {
    text = typeof raw === "string" ? raw : UTF8_STRICT.decode(raw);
  } catch {
    throw new ContractError(field, "UTF-8 JSON", new Said("invalid UTF-8"));
  }
  let i = 0;
  const fail = (why) => { throw new ContractError(field, "UTF-8 JSON", new Said(`${why} at char ${i}`)); };
  const ws = () => { WS.lastIndex = i; WS.test(text); i = WS.lastIndex; };
  const constant = (token) => { throw new ContractError(field, "JSON numbers (no NaN/Infinity)", new Said(token)); };

  function string() {
    i += 1;                                       // the opening quote
    let out = "";
    for (;;) {
      PLAIN_CHARS.lastIndex = i;
      PLAIN_CHARS.test(text);
      out += text.slice(i, PLAIN_CHARS.lastIndex);
      i = PLAIN_CHARS.lastIndex;
      const c = text[i];
      if (c === '"') { i += 1; return out; }
      if (c !== "\\") fail(c === undefined ? "unterminated string" : "invalid control character");
      const e = text[i + 1];
      if (e in ESCAPES) { out += ESCAPES[e]; i += 2; continue; }
      if (e === "u" && /^[0-9a-fA-F]{4}$/.test(text.slice(i + 2, i + 6))) {
        out += String.fromCharCode(parseInt(text.slice(i + 2, i + 6), 16));
        i += 6;
        continue;
      }
      fail("invalid \\escape");
    }
  }

  function number() {
    NUMBER.lastIndex = i;
    const m = NUMBER.exec(text);
    if (!m) fail("expecting value");
    const token = m[0];
    i = NUMBER.lastIndex;
    if (m[1] !== undefined || m[2] !== undefined) return new JsonFloat(Number(token));
    if (token.replace("-", "").length > MAX_INT_DIGITS) fail("integer with too many digits");
    const value = Number(token);
    return Number.isSafeInteger(value) ? (Object.is(value, -0) ? 0 : value) : BigInt(token);
  }

  function value(depth) {
    if (depth > MAX_JSON_DEPTH) fail("too deeply nested");
    ws();
    const c = text[i];
    if (c === "{") {
      i += 1;
      const obj = new Map();
      ws();
      if (text[i] === "}") { i += 1; return obj; }
      for (;;) {
        ws();
        if (text[i] !== '"') fail("expecting property name in double quotes");
        const key = string();
        ws();
        if (text[i] !== ":") fail("expecting ':' delimiter");
        i += 1;
        const v = value(depth + 1);
        if (obj.has(key)) {
          throw new ContractError(field, "JSON without duplicate keys", new Said(`key ${pyRepr(key)} twice`));
        }
        obj.set(key, v);
        ws();
        if (text[i] === ",") { i += 1; continue; }
        if (text[i] === "}") { i += 1; return obj; }
        fail("expecting ',' delimiter");
      }
    }
    if (c === "[") {
      i += 1;
      const arr = [];
      ws();
      if (text[i] === "]") { i += 1; return arr; }
      for (;;) {
        arr.push(value(depth + 1));
        ws();
        if (text[i] === ",") { i += 1; continue; }
        if (text[i] === "]") { i += 1; return arr; }
        fail("expecting ',' delimiter");
      }
    }
    if (c === '"') return string();
    for (const [word, v] of [["true", true], ["false", false], ["null", null]]) {
      if (text.startsWith(word, i)) { i += word.length; return v; }
    }
    for (const token of ["NaN", "Infinity", "-Infinity"]) {
      if (text.startsWith(token, i)) constant(token);
    }
    return number();
  }

  const out = value(0);
  ws();
  if (i !== text.length) fail("extra data");
  return out;
}

/** A parsed tree as plain JS: Maps become objects, JsonFloat and BigInt become numbers. */
function toPlain(node) {
  if (node instanceof JsonFloat) return node.value;
  if (typeof node === "bigint") return Number(node);
  if (Array.isArray(node)) return node.map(toPlain);
  if (node instanceof Map) {
    const obj = {};
    for (const [k, v] of node) {   // defineProperty: a "__proto__" key stays an ordinary key
      Object.defineProperty(obj, k, { value: toPlain(v), enumerable: true, writable: true, configurable: true });
    }
    return obj;
  }
  return node;
}

/**
 * Serialise like Python's `json.dumps(value, separators=(",", ":"), ensure_ascii=False)`.
 * Numbers: integral ones as ints, others (and every key in `floatKeys`) as Python float repr.
 */
function pyJsonDumps(value, floatKeys = new Set(), key = null) {
  if (value === null || value === undefined) return "null";
  if (value === true || value === false) return String(value);
  if (value instanceof JsonFloat) return pyFloatRepr(value.value);
  if (typeof value === "bigint") return value.toString();
  if (typeof value === "number") {
    if (!Number.isFinite(value)) throw new ContractError(key ?? "json", "finite numbers", value);
    return floatKeys.has(key) || !Number.isInteger(value) ? pyFloatRepr(value) : String(Object.is(value, -0) ? 0 : value);
  }
  if (typeof value === "string") {
    // JSON.stringify escapes exactly what Python escapes with ensure_ascii=False (", \, < 0x20),
    // except lone surrogates, which Python cannot encode to UTF-8 at all.
    need(!/[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]/.test(value),
      key ?? "json", "text without lone surrogates", value);
    return JSON.stringify(value);
  }
  if (Array.isArray(value)) return `[${value.map((v) => pyJsonDumps(v, floatKeys)).join(",")}]`;
  return `{${entriesOf(value).map(([k, v]) => `${pyJsonDumps(String(k))}:${pyJsonDumps(v, floatKeys, k)}`).join(",")}}`;
}

// --- helpers: JSON-like values, bytes -------------------------------------------------------------

function isObject(v) {
  return v instanceof Map || (v !== null && typeof v === "object" && !Array.isArray(v) && !(v instanceof JsonFloat)
    && !ArrayBuffer.isView(v) && !(v instanceof ArrayBuffer) && v !== MISSING && !(v instanceof Said));
}

function entriesOf(v) { return v instanceof Map ? [...v.entries()] : Object.entries(v); }
function keysOf(v) { return v instanceof Map ? [...v.keys()] : Object.keys(v); }
function hasKey(v, k) { return v instanceof Map ? v.has(k) : Object.prototype.hasOwnProperty.call(v, k); }
function getKey(v, k) { return v instanceof Map ? v.get(k) : v[k]; }

/** Python's `type(v) is int` (a plain JS number counts when integral; never a boolean). */
function isInt(v) { return typeof v === "bigint" || (typeof v === "number" && Number.isInteger(v)); }

/** Python's `type(v) in (int, float)`. */
function isNumber(v) { return typeof v === "number" || typeof v === "bigint" || v instanceof JsonFloat; }

function numberOf(v) { return v instanceof JsonFloat ? v.value : Number(v); }

function isBytes(v) { return v instanceof ArrayBuffer || ArrayBuffer.isView(v); }

/** A plain Uint8Array view of bytes (Uint8Array, Buffer, ArrayBuffer, any ArrayBufferView), no copy. */
function asBytes(v) {
  if (v.constructor === Uint8Array) return v;       // not a Node Buffer: its slice() does not copy
  if (v instanceof ArrayBuffer) return new Uint8Array(v);
  return new Uint8Array(v.buffer, v.byteOffset, v.byteLength);
}

function latin1(bytes) { return String.fromCharCode(...bytes); }

function padding(n) { return (ALIGN - (n % ALIGN)) % ALIGN; }

function allZero(bytes, start, end) {
  for (let i = start; i < end; i++) if (bytes[i] !== 0) return false;
  return true;
}

function product(shape) {
  if (shape.some((d) => d === 0)) return 0;
  let n = 1;
  for (const d of shape) n *= d;     // every d >= 1: once above MAX_ELEMENTS it stays above
  return n;
}

// --- codecs ------------------------------------------------------------------------------------

/** Entries "topk" keeps of an n-element tensor: ceil(fraction * n), at least 1, at most n. */
export function topkCount(n, fraction) {
  if (n === 0) return 0;
  return Math.min(n, Math.max(1, Math.ceil(fraction * n - 1e-9)));
}

/**
 * Python's `float(text)` for ASCII text: surrounding whitespace, sign, underscores between
 * digits, `inf`/`infinity`/`nan`. Returns undefined where Python raises ValueError (and for
 * non-ASCII digits or spaces, which Python would accept: the one deliberate difference).
 */
function pyParseFloat(text) {
  const s = text.replace(/^[ \t\n\v\f\r\x1c-\x1f]+|[ \t\n\v\f\r\x1c-\x1f]+$/g, "");
  const digits = "[0-9](?:_?[0-9])*";
  const decimal = new RegExp(`^[+-]?(?:${digits}(?:\\.(?:${digits})?)?|\\.${digits})(?:[eE][+-]?${digits})?$`);
  if (decimal.test(s)) return Number(s.replaceAll("_", ""));
  const special = /^([+-]?)(inf|infinity|nan)$/i.exec(s);
  if (!special) return undefined;
  if (special[2].toLowerCase() === "nan") return NaN;
  return special[1] === "-" ? -Infinity : Infinity;
}

/**
 * The codec of a codec string (Python: `get_codec`): a codec id, or "topk:<fraction>".
 * Returns `{id, fraction, name, ratio}`: `id` is what the container header carries, `name` the
 * canonical codec string (Python's `codec.name`), `fraction` null except for topk.
 */
export function parseCodec(text) {
  const ids = CODEC_IDS.join(", ");
  need(typeof text === "string", "codec", `one of ${ids}`, text);
  const colon = text.indexOf(":");
  const id = colon < 0 ? text : text.slice(0, colon);
  need(CODEC_IDS.includes(id) && (colon < 0 || id === "topk"), "codec", `one of ${ids} (or topk:<fraction>)`, text);
  if (id !== "topk") return Object.freeze({ id, fraction: null, name: id, ratio: { fp32: 1, fp16: 0.5, int8: 0.25 }[id] });
  let fraction = DEFAULT_TOPK_FRACTION;
  if (colon >= 0) {
    fraction = pyParseFloat(text.slice(colon + 1));
    need(fraction !== undefined, "codec", "topk:<fraction> with a fraction in (0, 1]", text);
    need(Number.isFinite(fraction) && fraction > 0 && fraction <= 1, "codec.fraction", "a number in (0, 1]",
      new JsonFloat(fraction));
  }
  const name = fraction === DEFAULT_TOPK_FRACTION ? "topk" : `topk:${pyFloatRepr(fraction)}`;
  return Object.freeze({ id, fraction, name, ratio: 2 * fraction });
}

/** float32 bit pattern -> IEEE binary16 bit pattern, rounding to nearest even (as numpy). */
function halfBits(f32bits) {
  const sign = (f32bits >>> 16) & 0x8000;
  const exp = (f32bits >>> 23) & 0xff;
  const mant = f32bits & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (mant ? 0x200 : 0);
  const e = exp - 127 + 15;
  if (e >= 31) return sign | 0x7c00;                     // overflow: infinity
  if (e <= 0) {                                         // subnormal half (or zero)
    if (e < -10) return sign;                           // below half the smallest subnormal
    const m = mant | 0x800000;
    const shift = 14 - e;
    let h = m >>> shift;
    const rest = m & ((1 << shift) - 1);
    const half = 1 << (shift - 1);
    if (rest > half || (rest === half && (h & 1))) h += 1;
    return sign | h;
  }
  let h = (e << 10) | (mant >>> 13);
  const rest = mant & 0x1fff;
  if (rest > 0x1000 || (rest === 0x1000 && (h & 1))) h += 1;   // may carry into infinity
  return sign | h;
}

/** IEEE binary16 bit pattern -> its (exact) value. */
function halfValueOf(bits) {
  const sign = bits & 0x8000 ? -1 : 1;
  const exp = (bits >>> 10) & 0x1f;
  const mant = bits & 0x3ff;
  if (exp === 0) return sign * mant * 2 ** -24;
  if (exp === 0x1f) return mant ? NaN : sign * Infinity;
  return sign * (1024 + mant) * 2 ** (exp - 25);
}

let HALF_VALUES = null;   // all 65536 binary16 values as float32, built on first use

function halfValues() {
  HALF_VALUES ??= Float32Array.from({ length: 65536 }, (_, bits) => halfValueOf(bits));
  return HALF_VALUES;
}

/** numpy's rint: round half to even. */
function roundHalfEven(v) {
  const f = Math.floor(v);
  const d = v - f;
  if (d < 0.5) return f;
  if (d > 0.5) return f + 1;
  return f % 2 === 0 ? f : f + 1;
}

/**
 * The value at position m of the sorted values (numpy's `partition(a, m)[m]`), reordering `a`:
 * quickselect with a random pivot and a three-way partition (many equal values stay cheap).
 */
function nthSmallest(a, m) {
  let lo = 0;
  let hi = a.length - 1;
  while (hi > lo) {
    const pivot = a[lo + Math.floor(Math.random() * (hi - lo + 1))];   // the result does not depend on it
    let lt = lo;
    let gt = hi;
    let i = lo;
    while (i <= gt) {                    // [lo, lt) < pivot, [lt, gt] == pivot, (gt, hi] > pivot
      const v = a[i];
      if (v < pivot) { a[i] = a[lt]; a[lt] = v; lt += 1; i += 1; }
      else if (v > pivot) { a[i] = a[gt]; a[gt] = v; gt -= 1; }
      else i += 1;
    }
    if (m < lt) hi = lt - 1;
    else if (m > gt) lo = gt + 1;
    else return pivot;
  }
  return a[m];
}

/** Sorted indices of the k largest |x| (ties: lower index first), as Python's `top_indices`. */
function topIndices(x, k) {
  const n = x.length;
  if (k >= n) return Uint32Array.from({ length: n }, (_, i) => i);
  if (k <= 0) return new Uint32Array(0);
  const a = new Float32Array(n);
  for (let i = 0; i < n; i++) a[i] = Math.abs(x[i]);
  const threshold = nthSmallest(a.slice(), n - k);
  let above = 0;
  for (let i = 0; i < n; i++) if (a[i] > threshold) above += 1;
  let ties = k - above;
  const out = new Uint32Array(k);
  let j = 0;
  for (let i = 0; i < n; i++) {
    if (a[i] > threshold || (a[i] === threshold && ties-- > 0)) out[j++] = i;
  }
  return out;
}

function checkFinite(name, values) {
  for (let i = 0; i < values.length; i++) {
    if (!Number.isFinite(values[i])) {
      throw new ContractError(`delta.tensors[${name}].values`, "finite numbers", new Said(`NaN or Inf at element ${i}`));
    }
  }
}

function float32At(bytes, offset, n) {
  if (LITTLE_ENDIAN) return new Float32Array(bytes.slice(offset, offset + 4 * n).buffer);
  const view = new DataView(bytes.buffer, bytes.byteOffset);
  return Float32Array.from({ length: n }, (_, i) => view.getFloat32(offset + 4 * i, true));
}

/**
 * Per codec: payload size, pack (flat finite Float32Array -> {extra header keys, bytes}), unpack,
 * and the check of the codec's own header keys. The twin of the Codec classes in codecs.py.
 */
const CODECS = {
  fp32: {
    params: [],
    size: (n) => 4 * n,
    pack(name, x) {
      const out = new Uint8Array(4 * x.length);
      if (LITTLE_ENDIAN) out.set(new Uint8Array(x.buffer, x.byteOffset, 4 * x.length));
      else { const v = new DataView(out.buffer); x.forEach((f, i) => v.setFloat32(4 * i, f, true)); }
      return { extra: {}, payload: out };
    },
    unpack(name, bytes, offset, n) {
      const out = float32At(bytes, offset, n);
      checkFinite(name, out);
      return out;
    },
  },
  fp16: {
    params: [],
    size: (n) => 2 * n,
    pack(name, x) {
      const bits = new Uint32Array(x.buffer, x.byteOffset, x.length);
      const out = new Uint8Array(2 * x.length);
      const view = new DataView(out.buffer);
      let peak = 0;
      let overflow = false;
      for (let i = 0; i < x.length; i++) {
        const h = halfBits(bits[i]);
        if ((h & 0x7c00) === 0x7c00) overflow = true;
        peak = Math.max(peak, Math.abs(x[i]));
        view.setUint16(2 * i, h, true);
      }
      if (overflow) {
        throw new ContractError(`delta[${name}]`, "values within the fp16 range (|x| <= 65504)",
          new Said(`max |x| = ${pyFloatRepr(peak)}`));
      }
      return { extra: {}, payload: out };
    },
    unpack(name, bytes, offset, n) {
      const table = halfValues();
      const out = new Float32Array(n);
      if (LITTLE_ENDIAN) {
        const halves = new Uint16Array(bytes.slice(offset, offset + 2 * n).buffer);
        for (let i = 0; i < n; i++) out[i] = table[halves[i]];
      } else {
        const view = new DataView(bytes.buffer, bytes.byteOffset);
        for (let i = 0; i < n; i++) out[i] = table[view.getUint16(offset + 2 * i, true)];
      }
      checkFinite(name, out);
      return out;
    },
  },
  int8: {
    // scale = float32(max|x|) / 127 in float32; q = rint(x / scale) in float32, clipped to ±127.
    // (A float64 operation on float32 inputs rounded once to float32 equals the float32 operation.)
    params: [],
    size: (n) => 4 + n,
    pack(name, x) {
      let peak = 0;
      for (let i = 0; i < x.length; i++) peak = Math.max(peak, Math.abs(x[i]));
      const scale = Math.fround(peak / 127);
      const out = new Uint8Array(4 + x.length);
      new DataView(out.buffer).setFloat32(0, scale, true);
      if (scale > 0) {
        const q = new Int8Array(out.buffer, 4, x.length);
        for (let i = 0; i < x.length; i++) q[i] = Math.min(127, Math.max(-127, roundHalfEven(Math.fround(x[i] / scale))));
        checkFinite(name, Float32Array.from(q, (v) => v * scale));   // what decode gives must be finite too
      }
      return { extra: {}, payload: out };
    },
    unpack(name, bytes, offset, n) {
      const scale = new DataView(bytes.buffer, bytes.byteOffset).getFloat32(offset, true);
      need(Number.isFinite(scale) && scale >= 0, `delta.tensors[${name}].scale`, "a finite number >= 0",
        new JsonFloat(scale));
      const q = new Int8Array(bytes.buffer, bytes.byteOffset + offset + 4, n);
      if (q.includes(-128)) throw new ContractError(`delta.tensors[${name}].values`, "int8 values in [-127, 127]", -128);
      const out = new Float32Array(n);
      for (let i = 0; i < n; i++) out[i] = q[i] * scale;   // exact in float64, one rounding to float32
      checkFinite(name, out);   // as Python: a scale near the float32 maximum can overflow to ±Infinity
      return out;
    },
  },
  topk: {
    params: ["k"],
    size: (n, entry) => 8 * Number(getKey(entry, "k")),
    pack(name, x, codec) {
      const idx = topIndices(x, topkCount(x.length, codec.fraction));
      const k = idx.length;
      const out = new Uint8Array(8 * k);
      const view = new DataView(out.buffer);
      for (let j = 0; j < k; j++) {
        view.setUint32(4 * j, idx[j], true);
        view.setFloat32(4 * k + 4 * j, x[idx[j]], true);
      }
      return { extra: { k }, payload: out };
    },
    checkEntry(name, n, entry) {
      const k = getKey(entry, "k");
      need(isInt(k) && k >= 0 && k <= n, `delta.tensors[${name}].k`, `an integer in [0, ${n}]`, k);
    },
    unpack(name, bytes, offset, n, entry) {
      const k = getKey(entry, "k");
      const view = new DataView(bytes.buffer, bytes.byteOffset);
      const idx = Array.from({ length: k }, (_, j) => view.getUint32(offset + 4 * j, true));
      for (let j = 0; j < k; j++) {
        if (idx[j] >= n || (j > 0 && idx[j] <= idx[j - 1])) {
          throw new ContractError(`delta.tensors[${name}].indices`, `strictly increasing indices < ${n}`,
            new Said(`[${idx.slice(0, 8).join(", ")}]...`));
        }
      }
      const values = float32At(bytes, offset + 4 * k, k);
      checkFinite(name, values);
      const out = new Float32Array(n);
      for (let j = 0; j < k; j++) out[idx[j]] = values[j];
      return out;
    },
  },
};

function checkName(field, name) {
  need(typeof name === "string" && NAME_RE.test(name), field, `a tensor name matching ${NAME_PATTERN}`, name);
  return name;
}

/** [name, value] pairs of a Map or a plain object (a Map keeps any key order; objects put "0"-like keys first). */
function tensorEntries(tensors, field) {
  need(isObject(tensors) && keysOf(tensors).length > 0, field, "a non-empty dict of name -> float array",
    new Said(pyTypeName(tensors)));
  return entriesOf(tensors);
}

/** {shape, data: Float32Array} of one encodeDelta input value. */
function tensorOf(name, value) {
  const field = `delta[${name}]`;
  let shape;
  let data;
  if (typeof value === "number") [shape, data] = [[], [value]];
  else if (Array.isArray(value) || ArrayBuffer.isView(value)) [shape, data] = [null, value];
  else if (isObject(value)) [shape, data] = [getKey(value, "shape"), getKey(value, "data")];
  else throw new ContractError(field, "a floating-point array", new Said(pyTypeName(value)));
  const floats = data instanceof Float32Array || data instanceof Float64Array
    || (Array.isArray(data) && data.every((v) => typeof v === "number"));
  const kind = ArrayBuffer.isView(data) ? data.constructor.name : pyTypeName(data);
  need(floats, field, "a floating-point array", new Said(kind));
  shape ??= [data.length];
  need(Array.isArray(shape) && shape.every((d) => Number.isSafeInteger(d) && d >= 0) && product(shape) === data.length,
    field, `{shape, data} with product(shape) = ${data.length} elements`, shape);
  const x = data instanceof Float32Array ? data : Float32Array.from(data);   // float64 -> float32: round to nearest even
  for (let i = 0; i < x.length; i++) {
    if (!Number.isFinite(x[i])) throw new ContractError(field, "finite values (no NaN/Inf)", new Said("a NaN or Inf"));
  }
  return { shape: shape.map(Number), x };
}

/**
 * Encode tensors as a `CTD1` container, byte-identical to Python's `get_codec(codec).encode(...)`.
 *
 * `codec`: a codec string ("fp32", "fp16", "int8", "topk", "topk:0.05") or a `parseCodec` result.
 * `tensors`: a Map (keeps its order; preferred) or plain object, name -> one of
 *   `{shape: number[], data: Float32Array | Float64Array | number[]}` (what decodeDelta returns),
 *   a Float32Array / Float64Array / number[] (shape [length]), or a number (shape []).
 * Float64 input is rounded to float32 first, as numpy's astype does. Returns a Uint8Array.
 * Throws ContractError: "codec"/"codec.fraction" (bad codec string), "delta" (empty, bad name,
 * too many elements), "delta[<name>]" (not float, shape mismatch, NaN/Inf, fp16 overflow).
 */
export function encodeDelta(codec, tensors) {
  const c = parseCodec(typeof codec === "string" ? codec : codec?.name);
  const impl = CODECS[c.id];
  const entries = [];
  const payloads = [];
  let total = 0;
  for (const [name, value] of tensorEntries(tensors, "delta")) {
    checkName("delta", name);
    const { shape, x } = tensorOf(name, value);
    total += x.length;
    need(total <= MAX_ELEMENTS, "delta", `at most ${MAX_ELEMENTS} elements in all`, new Said(`${total} or more`));
    const { extra, payload } = impl.pack(name, x, c);
    entries.push({ name, shape, dtype: DTYPE, ...extra });
    payloads.push(payload);
  }
  const head = UTF8.encode(JSON.stringify({ codec: c.id, tensors: entries }));   // ASCII only: as Python's json.dumps
  let size = 8 + head.length + padding(8 + head.length);
  for (const p of payloads) size += p.length + padding(p.length);
  const out = new Uint8Array(size);
  out.set(UTF8.encode(DELTA_MAGIC), 0);
  new DataView(out.buffer).setUint32(4, head.length, true);
  out.set(head, 8);
  let offset = 8 + head.length + padding(8 + head.length);
  for (const p of payloads) {
    out.set(p, offset);
    offset += p.length + padding(p.length);
  }
  return out;
}

/** name -> {shape, dtype} of a spec: Map or object of `{shape, dtype?}`, `[shape, dtype]` or a shape array. */
function specEntries(spec) {
  return entriesOf(spec).map(([name, s]) => {
    if (Array.isArray(s) && Array.isArray(s[0])) return [name, { shape: s[0], dtype: s[1] ?? DTYPE }];
    if (Array.isArray(s)) return [name, { shape: s, dtype: DTYPE }];
    return [name, { shape: getKey(s, "shape"), dtype: getKey(s, "dtype") ?? DTYPE }];
  });
}

const FLOAT32_NAMES = new Set(["float32", "f4", "<f4", "=f4", "single"]);

function checkSpec(spec, shapes) {
  for (const [name, { shape, dtype }] of specEntries(spec)) {
    need(shapes.has(name), `delta.tensors[${name}]`, "present (the model has this tensor)", MISSING);
    need(FLOAT32_NAMES.has(dtype), `delta.tensors[${name}].dtype`, pyRepr(String(dtype)), DTYPE);
    const got = shapes.get(name);
    need(shape.length === got.length && shape.every((d, i) => Number(d) === got[i]),
      `delta.tensors[${name}].shape`, `[${shape.join(", ")}]`, got);
  }
  const names = new Set(specEntries(spec).map(([name]) => name));
  for (const name of shapes.keys()) {
    need(names.has(name), `delta.tensors[${name}]`, "only tensors the model has", new Said("an unknown tensor"));
  }
}

/** Validate one header tensor entry (Python: `_check_entry`); returns {name, shape, n}. */
function checkEntry(codecId, i, entry, seen) {
  const keys = ["name", "shape", "dtype", ...CODECS[codecId].params];
  const ok = entry instanceof Map && entry.size === keys.length && keys.every((k) => entry.has(k));
  need(ok, `delta.tensors[${i}]`, `an object with exactly the keys ${keys.join(", ")}`,
    entry instanceof Map ? [...entry.keys()].sort() : entry);
  const name = checkName(`delta.tensors[${i}].name`, entry.get("name"));
  need(!seen.has(name), `delta.tensors[${name}]`, "a name used once", new Said("a repeated name"));
  seen.add(name);
  const shape = entry.get("shape");
  need(Array.isArray(shape) && shape.every((d) => typeof d === "number" && Number.isInteger(d) && d >= 0 && d < 2 ** 31),
    `delta.tensors[${name}].shape`, "a list of integers >= 0", shape);
  need(entry.get("dtype") === DTYPE, `delta.tensors[${name}].dtype`, pyRepr(DTYPE), entry.get("dtype"));
  const n = product(shape);
  need(n <= MAX_ELEMENTS, `delta.tensors[${name}].shape`, `at most ${MAX_ELEMENTS} elements`, n);
  CODECS[codecId].checkEntry?.(name, n, entry);
  return { name, shape, n };
}

/**
 * Decode a `CTD1` container (Python: `decode_delta`) with the same checks, in the same order.
 *
 * `bytes`: Uint8Array / Buffer / ArrayBuffer / any ArrayBufferView.
 * `spec` (optional): Map or object name -> `[shape, dtype]`, `{shape, dtype?}` or a shape array;
 *   the container must hold exactly these tensors with these shapes (dtype float32).
 * `codec` (optional): a codec id or codec string the container must use ("fp32" for model blobs).
 * Returns a Map, in header order: name -> {shape: number[], data: Float32Array} (data owned,
 * C order, length = product(shape)). Throws ContractError naming the field.
 */
export function decodeDelta(bytes, spec = null, codec = null) {
  need(isBytes(bytes), "delta", "bytes", new Said(pyTypeName(bytes)));
  const data = asBytes(bytes);
  need(data.length >= 8, "delta", "at least 8 bytes (magic + header length)", data);
  const magic = latin1(data.subarray(0, 4));
  need(magic === DELTA_MAGIC, "delta.magic", pyRepr(DELTA_MAGIC), new Said(pyRepr(magic)));
  const length = new DataView(data.buffer, data.byteOffset).getUint32(4, true);
  need(length <= MAX_HEADER_BYTES && 8 + length <= data.length, "delta.header_length",
    `at most ${Math.min(MAX_HEADER_BYTES, data.length - 8)}`, length);

  const header = parseJsonTree(data.subarray(8, 8 + length), "delta.header");
  const headerOk = header instanceof Map && header.size === 2 && header.has("codec") && header.has("tensors");
  need(headerOk, "delta.header", "an object with exactly the keys codec, tensors",
    header instanceof Map ? [...header.keys()].sort() : new Said(pyTypeName(header)));
  const codecId = header.get("codec");
  need(typeof codecId === "string" && CODEC_IDS.includes(codecId), "delta.codec", `one of ${CODEC_IDS.join(", ")}`, codecId);
  if (codec !== null && codec !== undefined) {
    const want = parseCodec(codec).id;
    need(codecId === want, "delta.codec", pyRepr(want), codecId);
  }
  const tensors = header.get("tensors");
  need(Array.isArray(tensors) && tensors.length > 0, "delta.tensors", "a non-empty list", tensors);
  const seen = new Set();
  const checked = tensors.map((entry, i) => checkEntry(codecId, i, entry, seen));
  need(checked.reduce((sum, t) => sum + t.n, 0) <= MAX_ELEMENTS, "delta.tensors",
    `at most ${MAX_ELEMENTS} elements in all`, new Said("more"));
  if (spec !== null && spec !== undefined) checkSpec(spec, new Map(checked.map((t) => [t.name, t.shape])));

  const impl = CODECS[codecId];
  const offsets = [];
  let end = 8 + length + padding(8 + length);
  tensors.forEach((entry, i) => {
    const size = impl.size(checked[i].n, entry);
    offsets.push([end, size]);
    end += size + padding(size);
  });
  if (data.length !== end) {
    const what = data.length < end ? "truncated" : "trailing bytes";
    throw new ContractError("delta", `${end} bytes (as the header says)`, new Said(`${data.length} bytes (${what})`));
  }
  const gaps = [[8 + length, offsets[0][0]], ...offsets.map(([o, s]) => [o + s, o + s + padding(s)])];
  need(gaps.every(([a, b]) => allZero(data, a, b)), "delta.padding", "zero bytes", new Said("non-zero padding"));

  const out = new Map();
  tensors.forEach((entry, i) => {
    const { name, shape, n } = checked[i];
    out.set(name, { shape: [...shape], data: impl.unpack(name, data, offsets[i][0], n, entry) });
  });
  return out;
}

// --- data shards -------------------------------------------------------------------------------

/**
 * Decode a `CTS1` data shard (Python: `contract.shards.decode_shard`).
 * Returns `{n, h, w, x, y}`: `x` Uint8Array of n*3*h*w pixels (NCHW, RGB planes, row-major),
 * `y` Uint8Array of n labels (0..9). Both are views into `bytes` (no copy).
 * Throws ContractError: "shard" (size), "shard.magic", "shard.shape", "shard.labels".
 */
export function decodeShard(bytes) {
  need(isBytes(bytes), "shard", "bytes", new Said(pyTypeName(bytes)));
  const data = asBytes(bytes);
  need(data.length >= 16, "shard", "at least 16 bytes", new Said(`${data.length} bytes`));
  const magic = latin1(data.subarray(0, 4));
  need(magic === SHARD_MAGIC, "shard.magic", SHARD_MAGIC, new Said(pyRepr(magic)));
  const view = new DataView(data.buffer, data.byteOffset);
  const [n, h, w] = [4, 8, 12].map((o) => view.getUint32(o, true));
  need(n >= 1 && n <= MAX_IMAGES && h >= 1 && h <= 1024 && w >= 1 && w <= 1024, "shard.shape",
    `1..${MAX_IMAGES} images of at most 1024x1024`, new Said(`(${n}, ${h}, ${w})`));
  const pixels = n * 3 * h * w;
  const size = 16 + pixels + n;
  need(data.length === size, "shard", `exactly ${size} bytes for ${n} images of ${h}x${w}`,
    new Said(`${data.length} bytes`));
  const x = data.subarray(16, 16 + pixels);
  const y = data.subarray(16 + pixels, size);
  let most = 0;
  for (const label of y) most = Math.max(most, label);
  need(most < NUM_CLASSES, "shard.labels", `labels in 0..${NUM_CLASSES - 1}`, most);
  return { n, h, w, x, y };
}

// --- blobs -------------------------------------------------------------------------------------

/** Content address of a blob: lowercase sha256 hex (async, crypto.subtle). */
export async function blobId(bytes) {
  need(isBytes(bytes), "blob", "bytes", new Said(pyTypeName(bytes)));
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", asBytes(bytes)));
  return Array.from(digest, (b) => b.toString(16).padStart(2, "0")).join("");
}

export function isBlobId(text) {
  return typeof text === "string" && HEX_RE.test(text);
}

// --- version deltas (Python: contract/versions.py) -----------------------------------------------

/**
 * Inflate a zlib stream (RFC 1950; `DecompressionStream("deflate")`) to at most `limit` bytes.
 * Throws ContractError "version_delta" for anything that is not one whole zlib stream, or too long.
 */
export async function inflate(bytes, limit) {
  need(isBytes(bytes), "version_delta", "bytes", new Said(pyTypeName(bytes)));
  const reader = new Blob([asBytes(bytes)]).stream().pipeThrough(new DecompressionStream("deflate")).getReader();
  const chunks = [];
  let total = 0;
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      total += value.length;
      if (total > limit) {
        reader.cancel().catch(() => {});
        throw new ContractError("version_delta", `at most ${limit} bytes inflated`, new Said("more"));
      }
      chunks.push(value);
    }
  } catch (e) {
    if (e instanceof ContractError) throw e;
    throw new ContractError("version_delta", "one complete zlib stream", new Said(String(e?.message ?? e).slice(0, 60)));
  }
  const out = new Uint8Array(total);
  let at = 0;
  for (const c of chunks) { out.set(c, at); at += c.length; }
  return out;
}

/**
 * A unit's base rebuilt from a held model version and the unit's version delta blob (Python:
 * `reconstruct_checked`): `held` (a Map as `decodeDelta` gives) plus the delta's values, added in
 * float32 (a Float32Array store rounds the exact double sum once: float32 addition), in the delta's
 * tensor order. With `want` (the unit's `model_version`), the fp32 container of the result must hash
 * to it. Throws ContractError: "version_delta..." (malformed, other tensors), "unit.model_version".
 */
export async function reconstructBase(held, blob, want = null) {
  need(held instanceof Map && held.size > 0, "version_delta.from", "a held model version", new Said("none"));
  let limit = 8 + MAX_HEADER_BYTES + 4;
  const spec = new Map();
  for (const [name, t] of held) {
    limit += 4 * t.data.length + 4;
    spec.set(name, [t.shape, DTYPE]);
  }
  const delta = decodeDelta(await inflate(blob, limit), spec);
  const out = new Map();
  for (const [name, d] of delta) {
    const h = held.get(name).data, x = d.data, sum = new Float32Array(x.length);
    for (let i = 0; i < x.length; i++) sum[i] = h[i] + x[i];
    for (let i = 0; i < sum.length; i++) {
      if (!Number.isFinite(sum[i])) throw new ContractError(`version_delta.tensors[${name}]`, "finite sums", new Said("an overflow"));
    }
    out.set(name, { shape: [...d.shape], data: sum });
  }
  if (want !== null) {
    const got = await blobId(encodeDelta("fp32", out));
    need(got === want, "unit.model_version", `the reconstruction's hash ${want.slice(0, 12)}...`,
      new Said(`${got.slice(0, 12)}... (the held version is not the one named, or the delta is corrupt)`));
  }
  return out;
}

// --- messages ----------------------------------------------------------------------------------

function checkStr(field, value, re, expected) {
  need(typeof value === "string" && re.test(value), field, expected, value);
  return value;
}

function checkInt(field, value, lo, hi) {
  const inRange = typeof value === "bigint" ? value >= BigInt(lo) && value <= BigInt(hi) : value >= lo && value <= hi;
  need(isInt(value) && inRange, field, `an integer in [${lo}, ${hi}]`, value);
  return Number(value);
}

/** Python's `_num`: an int or float (never bool), finite, within bounds; returns the number. */
function checkNum(field, value, { lo = -Infinity, loOpen = false, hi = Infinity, hiOpen = false,
  expected = "a finite number" } = {}) {
  const x = isNumber(value) ? numberOf(value) : NaN;
  const ok = Number.isFinite(x) && (loOpen ? x > lo : x >= lo) && (hiOpen ? x < hi : x <= hi);
  need(ok, field, expected, value);
  return x;
}

function checkBool(field, value) {
  need(typeof value === "boolean", field, "true or false", value);
  return value;
}

function checkChoice(field, value, options) {
  need(options.includes(value), field, `one of ${options.join(", ")}`, value);
  return value;
}

function checkProtocol(prefix, value) {
  if (!(isInt(value) && Number(value) === PROTOCOL_VERSION)) {
    throw new ContractError(`${prefix}.protocol`, String(PROTOCOL_VERSION), value, { code: "unsupported_protocol" });
  }
  return PROTOCOL_VERSION;
}

const HYPER = {
  lr: (f, v) => checkNum(f, v, { lo: 0, loOpen: true, expected: "a finite number > 0" }),
  momentum: (f, v) => checkNum(f, v, { lo: 0, hi: 1, hiOpen: true, expected: "a number in [0, 1)" }),
  nesterov: checkBool,
  weight_decay: (f, v) => checkNum(f, v, { lo: 0, expected: "a finite number >= 0" }),
  label_smoothing: (f, v) => checkNum(f, v, { lo: 0, hi: 1, hiOpen: true, expected: "a number in [0, 1)" }),
  loss: (f, v) => checkChoice(f, v, LOSSES),
  focal_gamma: (f, v) => checkNum(f, v, { lo: 0, expected: "a finite number >= 0" }),
  crop_pad: (f, v) => checkInt(f, v, 0, 16),
  crop_reflect: checkBool,   // crops padded by reflection instead of zeros (sent only when true)
  flip: checkBool,
  flip_parity: (f, v) => checkInt(f, v, 0, 1),   // flips alternate per epoch: mirror when the image's coin xor this
};
export const HYPER_KEYS = Object.freeze(Object.keys(HYPER));

/** A validated copy of a unit's `hyper` (known keys only, `lr` required), as Python's check_hyper. */
function checkHyper(prefix, hyper) {
  need(isObject(hyper), prefix, "an object of hyperparameters", hyper);
  for (const key of keysOf(hyper)) {
    need(Object.hasOwn(HYPER, key), `${prefix}.${key}`, `a known hyperparameter (${HYPER_KEYS.join(", ")})`,
      new Said("unknown"));
  }
  need(hasKey(hyper, "lr"), `${prefix}.lr`, "a finite number > 0", MISSING);
  return Object.fromEntries(entriesOf(hyper).map(([key, value]) => [key, HYPER[key](`${prefix}.${key}`, value)]));
}

/** Python's `_from_json`: a JSON object; `protocol` first; no unknown keys; no missing required keys. */
function fromJson(prefix, d, names, optional = []) {
  need(isObject(d), prefix, "a JSON object", new Said(pyTypeName(d)));
  checkProtocol(prefix, hasKey(d, "protocol") ? getKey(d, "protocol") : MISSING);
  for (const key of keysOf(d)) {
    need(names.includes(key), `${prefix}.${key}`, `a known field (${names.join(", ")})`, new Said("an unknown field"));
  }
  for (const key of names) {
    need(hasKey(d, key) || optional.includes(key), `${prefix}.${key}`, "a value (required field)", MISSING);
  }
  return (key) => getKey(d, key);
}

/** JSON text or bytes -> parsed tree (ints apart from floats); anything else is taken as is. */
function messageOf(input, prefix) {
  if (typeof input === "string") return parseJsonTree(input, prefix);
  return isBytes(input) ? parseJsonTree(asBytes(input), prefix) : input;
}

const UNIT_FIELDS = ["job", "unit_id", "model", "model_version", "base_step", "shard_ids", "local_steps", "batch_size",
  "hyper", "seed", "codec", "lease", "deadline", "base_delta", "error_feedback", "compute_as", "protocol"];

/**
 * Validate a WorkUnit (Python: `WorkUnit.from_json`), the body of `POST /api/v1/units/next`.
 *
 * `input`: the JSON text (string or bytes: exact Python semantics, `2.0` is not an integer) or
 * an already parsed object. Returns a plain object with the keys in Python's `to_json()` order
 * (job, unit_id, model, model_version, base_step, shard_ids, local_steps, batch_size, hyper,
 * seed, codec, lease, deadline, [base_delta], [error_feedback: true], [compute_as], protocol). Throws ContractError: field "unit.<key>" (e.g.
 * "unit.hyper.lr", "unit.shard_ids[1]", "unit.codec"); `unit.protocol` has code "unsupported_protocol".
 */
export function checkUnit(input) {
  const p = "unit";
  const d = messageOf(input, p);
  const get = fromJson(p, d, UNIT_FIELDS, ["base_delta", "error_feedback", "compute_as"]);
  const idRule = `an id matching ${ID_PATTERN}`;
  const unit = { job: null, unit_id: null, model: null, model_version: null, base_step: null, shard_ids: null,
    local_steps: null, batch_size: null, hyper: null, seed: null, codec: null, lease: null, deadline: null,
    protocol: checkProtocol(p, get("protocol")) };
  unit.job = checkStr(`${p}.job`, get("job"), ID_RE, idRule);
  unit.unit_id = checkStr(`${p}.unit_id`, get("unit_id"), ID_RE, idRule);
  unit.model = checkStr(`${p}.model`, get("model"), MODEL_RE, `a model name matching ${MODEL_PATTERN}`);
  unit.model_version = checkStr(`${p}.model_version`, get("model_version"), HEX_RE, "a sha256 hex blob id");
  unit.base_step = checkInt(`${p}.base_step`, get("base_step"), 0, 2 ** 53);
  const shards = get("shard_ids");
  need(Array.isArray(shards) && shards.length > 0, `${p}.shard_ids`, "a non-empty list of blob ids", shards);
  unit.shard_ids = shards.map((s, i) => checkStr(`${p}.shard_ids[${i}]`, s, HEX_RE, "a sha256 hex blob id"));
  unit.local_steps = checkInt(`${p}.local_steps`, get("local_steps"), 1, MAX_LOCAL_STEPS);
  unit.batch_size = checkInt(`${p}.batch_size`, get("batch_size"), 1, MAX_BATCH_SIZE);
  unit.hyper = checkHyper(`${p}.hyper`, get("hyper"));
  unit.seed = checkInt(`${p}.seed`, get("seed"), 0, 2 ** 31 - 1);
  try {
    parseCodec(get("codec"));
  } catch (e) {
    if (e instanceof ContractError) throw new ContractError(`${p}.codec`, e.expected, get("codec"));
    throw e;
  }
  unit.codec = get("codec");
  unit.lease = checkStr(`${p}.lease`, get("lease"), LEASE_RE, "a token of 1..1024 printable ASCII characters");
  unit.deadline = checkNum(`${p}.deadline`, get("deadline"), { lo: 0, loOpen: true, expected: "unix seconds > 0" });
  const bd = hasKey(d, "base_delta") ? get("base_delta") : null;
  if (bd !== null) {   // only a unit cut from a version delta carries it (and then with an object)
    need(isObject(bd), `${p}.base_delta`, 'null or an object {"from", "blob"}', bd);
    for (const key of keysOf(bd)) {
      need(key === "from" || key === "blob", `${p}.base_delta.${key}`, "a known field (from, blob)", new Said("an unknown field"));
    }
    const [from, blob] = ["from", "blob"].map((k) =>
      checkStr(`${p}.base_delta.${k}`, hasKey(bd, k) ? getKey(bd, k) : MISSING, HEX_RE, "a sha256 hex blob id"));
    const { protocol } = unit;
    delete unit.protocol;
    Object.assign(unit, { base_delta: { from, blob }, protocol });   // Python's to_json() order
  }
  // only a unit for a worker that said it keeps an error-feedback residual carries it (true)
  if (checkBool(`${p}.error_feedback`, hasKey(d, "error_feedback") ? get("error_feedback") : false)) {
    const { protocol } = unit;
    delete unit.protocol;
    Object.assign(unit, { error_feedback: true, protocol });
  }
  // only a replica for a worker of another backend carries it: compute the unit as that backend does
  const as = hasKey(d, "compute_as") ? get("compute_as") : null;
  if (as !== null) {
    checkChoice(`${p}.compute_as`, as, BACKENDS);
    const { protocol } = unit;
    delete unit.protocol;
    Object.assign(unit, { compute_as: as, protocol });
  }
  return unit;
}

/**
 * Validate a UnitRequest (Python: `UnitRequest.from_json`), the body the worker POSTs to
 * `/api/v1/units/next`. Returns a plain object in Python's `to_json()` order: {protocol, worker_id, backend,
 * codecs, models} (defaults filled in), then the optional keys that are set.
 */
export function checkRequest(input) {
  const p = "request";
  const d = messageOf(input, p);
  const optional = ["codecs", "models", "held", "error_feedback", "computes", "runtime", "webgpu_check",
    "runtime_note"];
  const get = fromJson(p, d, ["worker_id", "backend", ...optional, "protocol"], optional);
  const has = (k) => hasKey(d, k);
  const protocol = checkProtocol(p, get("protocol"));
  const workerId = checkStr(`${p}.worker_id`, get("worker_id"), ID_RE, `an id matching ${ID_PATTERN}`);
  const backend = checkChoice(`${p}.backend`, get("backend"), BACKENDS);
  const codecs = has("codecs") ? get("codecs") : [...CODEC_IDS];
  need(Array.isArray(codecs) && codecs.length > 0, `${p}.codecs`, "a non-empty list of codec ids", codecs);
  codecs.forEach((c) => checkChoice(`${p}.codecs`, c, CODEC_IDS));
  const models = has("models") ? get("models") : [];
  need(Array.isArray(models), `${p}.models`, "a list of model names", models);
  models.forEach((m) => checkStr(`${p}.models`, m, MODEL_RE, `a model name matching ${MODEL_PATTERN}`));
  const held = has("held") ? get("held") : [];
  need(Array.isArray(held) && held.length <= MAX_HELD, `${p}.held`, `a list of at most ${MAX_HELD} blob ids`, held);
  held.forEach((b, i) => checkStr(`${p}.held[${i}]`, b, HEX_RE, "a sha256 hex blob id"));
  const feedback = checkBool(`${p}.error_feedback`, has("error_feedback") ? get("error_feedback") : false);
  const computes = has("computes") ? get("computes") : [];
  need(Array.isArray(computes) && computes.length <= BACKENDS.length, `${p}.computes`,
    `a list of at most ${BACKENDS.length} backends`, computes);
  computes.forEach((b) => checkChoice(`${p}.computes`, b, BACKENDS));
  const set = (k) => has(k) && get(k) !== null;   // (null reads as not set, as Python's None)
  const runtime = set("runtime") ? checkChoice(`${p}.runtime`, get("runtime"), RUNTIMES) : null;
  const check = set("webgpu_check") ? checkChoice(`${p}.webgpu_check`, get("webgpu_check"), CHECK_OUTCOMES) : null;
  const note = set("runtime_note")
    ? checkStr(`${p}.runtime_note`, get("runtime_note"), NOTE_RE, "1 to 200 printable ASCII characters") : null;
  return { protocol, worker_id: workerId, backend, codecs: [...codecs], models: [...models],
    ...(held.length ? { held: [...held] } : {}), ...(feedback ? { error_feedback: true } : {}),
    ...(computes.length ? { computes: [...computes] } : {}), ...(runtime !== null ? { runtime } : {}),
    ...(check !== null ? { webgpu_check: check } : {}), ...(note !== null ? { runtime_note: note } : {}) };
}

/** `text` as a UnitRequest `runtime_note` (Python: `runtime_note`): runs of ASCII whitespace as one space, none at
 * either end, every other character outside printable ASCII (a code point) as "?", at most 200 characters; null
 * when nothing is left. */
export function runtimeNote(text) {
  const spaced = String(text).replace(/[\t\n\v\f\r ]+/g, " ").replace(/^ | $/g, "");
  return Array.from(spaced, (c) => (c >= " " && c <= "~" ? c : "?")).join("").slice(0, 200) || null;
}

// --- worker keys (Python: contract/units.py WORKER_KEY_HEADER, WORKER_KEY_RE) ----------------------

/** The header a worker sends its secret key in (unit requests, name changes): the coordinator binds a worker id
 * to the key of its first request that carries one, and then answers that id only with that key. */
export const WORKER_KEY_HEADER = "Crowdtrain-Worker-Key";
export const WORKER_KEY_RE = /^[A-Za-z0-9_-]{22,128}$/;   // base64url, at least 128 bits

/** A tab's new anonymous worker id: "web-" + 16 hex digits. */
export function newWorkerId() {
  const b = crypto.getRandomValues(new Uint8Array(8));
  return "web-" + Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}

/** A new random worker key: 24 random bytes, base64url (32 characters). */
export function newWorkerKey() {
  const bytes = crypto.getRandomValues(new Uint8Array(24));
  return btoa(String.fromCharCode(...bytes)).replaceAll("+", "-").replaceAll("/", "_").replace(/=+$/, "");
}

// --- display names (Python: contract/names.py) ---------------------------------------------------

export const NAME_MAX_CHARS = 32;
const NAME_FORBIDDEN_RE = /[\x00-\x1f\x7f-\x9f\u00ad\u061c\u180e\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff\ufff9-\ufffb\ufffe\uffff\ud800-\udfff]/u;
const NAME_SPACES = " \u00a0\u1680\u2000-\u200a\u202f\u205f\u3000";
const NAME_EDGE_RE = new RegExp(`^[${NAME_SPACES}]|[${NAME_SPACES}]$`, "u");
const NAME_RULE = `null or 1 to ${NAME_MAX_CHARS} printable characters (no control, format or invisible characters), ` +
  "not starting or ending with a space";

/** A display name (or null: no name), as Python's `contract.names.check_name`; throws ContractError naming `field`. */
export function checkDisplayName(field, value) {
  if (value === null) return null;
  const ok = typeof value === "string" && codePoints(value) >= 1 && codePoints(value) <= NAME_MAX_CHARS &&
    !NAME_FORBIDDEN_RE.test(value) && !NAME_EDGE_RE.test(value);
  need(ok, field, NAME_RULE, value);
  return value;
}

/**
 * Validate a display-name request (Python: `NameRequest.from_json`), the body a worker POSTs to
 * `/api/v1/workers/<worker_id>/name`: {protocol, name} (`name` null clears it). Returns it in
 * Python's `to_json()` order. Throws ContractError "name_request.<key>".
 */
export function checkNameRequest(input) {
  const p = "name_request";
  const d = messageOf(input, p);
  const get = fromJson(p, d, ["name", "protocol"]);
  const protocol = checkProtocol(p, get("protocol"));
  return { protocol, name: checkDisplayName(`${p}.name`, get("name")) };
}

const RESULT_FIELDS = ["unit_id", "lease", "worker_id", "base_version", "loss_before", "loss_after", "num_samples",
  "compute_seconds", "error", "protocol"];
const RESULT_FLOATS = new Set(["loss_before", "loss_after", "compute_seconds"]);

/** Python's code-point length (a JS string's .length counts UTF-16 units). */
function codePoints(text) {
  let n = 0;
  for (const _ of text) n += 1;   // eslint-disable-line no-unused-vars
  return n;
}

/**
 * Validate result metadata and its delta (Python: `UnitResult.from_json(meta, delta)`).
 * `meta`: parsed tree or plain object; `delta`: bytes (a CTD1 container, empty for a failed
 * unit: only its magic is checked here). Returns the metadata as Python's `to_json()` gives it:
 * {protocol, unit_id, lease, worker_id, base_version, loss_before, loss_after, num_samples,
 * compute_seconds, error} (`error` null when absent). Throws ContractError "result.<key>".
 */
export function checkResult(meta, delta) {
  const p = "result";
  const get = fromJson(p, meta, RESULT_FIELDS, ["error"]);
  const protocol = checkProtocol(p, get("protocol"));
  const idRule = `an id matching ${ID_PATTERN}`;
  const unitId = checkStr(`${p}.unit_id`, get("unit_id"), ID_RE, idRule);
  const lease = checkStr(`${p}.lease`, get("lease"), LEASE_RE, "a token of 1..1024 printable ASCII characters");
  const workerId = checkStr(`${p}.worker_id`, get("worker_id"), ID_RE, idRule);
  const baseVersion = checkStr(`${p}.base_version`, get("base_version"), HEX_RE, "a sha256 hex blob id");
  const nonNegative = { lo: 0, expected: "a finite number >= 0" };
  const lossBefore = checkNum(`${p}.loss_before`, get("loss_before"), nonNegative);
  const lossAfter = checkNum(`${p}.loss_after`, get("loss_after"), nonNegative);
  const computeSeconds = checkNum(`${p}.compute_seconds`, get("compute_seconds"), nonNegative);
  const numSamples = checkInt(`${p}.num_samples`, get("num_samples"), 0, 2 ** 53);
  const error = hasKey(meta, "error") ? get("error") : null;
  need(error === null || (typeof error === "string" && error.length > 0 && codePoints(error) <= MAX_ERROR_CHARS),
    `${p}.error`, `null or a text of 1..${MAX_ERROR_CHARS} characters`, error);
  need(isBytes(delta), `${p}.delta`, "bytes", new Said(pyTypeName(delta)));
  const bytes = asBytes(delta);
  if (error === null) need(latin1(bytes.subarray(0, 4)) === DELTA_MAGIC, `${p}.delta`, "a CTD1 delta container", bytes);
  else need(bytes.length === 0, `${p}.delta`, "no delta for a failed unit", bytes);
  return { protocol, unit_id: unitId, lease, worker_id: workerId, base_version: baseVersion, loss_before: lossBefore,
    loss_after: lossAfter, num_samples: numSamples, compute_seconds: computeSeconds, error };
}

/**
 * The `CTR1` body of `POST /api/v1/units/<unit_id>/result` (Python: `pack_result`).
 *
 * `meta`: the result metadata (plain object or Map) with `protocol: 1` and the fields of
 * UnitResult; validated with `checkResult` first. It is serialised in the key order given,
 * exactly as Python's json.dumps(separators=(",", ":"), ensure_ascii=False) writes the same
 * values: loss_before, loss_after, compute_seconds as floats (`0.0`, `12.5`, `1e-05`),
 * num_samples and protocol as ints. `delta`: the CTD1 bytes (empty Uint8Array for a failed unit).
 * Returns a Uint8Array; for the Python key order pass `checkResult(meta, delta)`'s return value.
 */
export function packResult(meta, delta) {
  checkResult(meta, delta);
  const body = UTF8.encode(pyJsonDumps(meta, RESULT_FLOATS));
  const deltaBytes = asBytes(delta);
  const start = 8 + body.length + padding(body.length);
  const out = new Uint8Array(start + deltaBytes.length);
  out.set(UTF8.encode(RESULT_MAGIC), 0);
  new DataView(out.buffer).setUint32(4, body.length, true);
  out.set(body, 8);
  out.set(deltaBytes, start);
  return out;
}

/**
 * Parse a `CTR1` result body (Python: `unpack_result`). Returns `{meta, delta}`: `meta` as
 * `checkResult` returns it (Python's to_json order), `delta` a Uint8Array view into `bytes`
 * (checked for its magic only: decode it with `decodeDelta(delta, spec, codec)`).
 * Throws ContractError: "result", "result.magic", "result.metadata_length", "result.padding",
 * "result.metadata" (JSON), "result.<key>".
 */
export function unpackResult(bytes) {
  need(isBytes(bytes), "result", "bytes", new Said(pyTypeName(bytes)));
  const body = asBytes(bytes);
  need(body.length >= 8, "result", "at least 8 bytes (magic + metadata length)", body);
  const magic = latin1(body.subarray(0, 4));
  need(magic === RESULT_MAGIC, "result.magic", pyRepr(RESULT_MAGIC), new Said(pyRepr(magic)));
  const length = new DataView(body.buffer, body.byteOffset).getUint32(4, true);
  need(length <= MAX_META_BYTES && 8 + length <= body.length, "result.metadata_length",
    `at most ${Math.min(MAX_META_BYTES, body.length - 8)}`, length);
  const start = 8 + length + padding(length);
  need(body.length >= start && allZero(body, 8 + length, start), "result.padding",
    `${padding(length)} zero bytes after the metadata`, new Said("missing or non-zero padding"));
  const meta = parseJsonTree(body.subarray(8, 8 + length), "result.metadata");
  const delta = body.subarray(start);
  return { meta: toPlain(checkResult(meta, delta)), delta };
}
