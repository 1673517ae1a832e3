// The browser worker: a module Web Worker that owns onnxruntime-web and the training loop.
//
// The same contract as the Python worker (docs/protocol.md): ask for a unit, fetch its blobs
// (model version, data shards; the training-step graph of coordinator/steps.py), run
// unit.local_steps SGD steps of the exported graph, encode the delta with the unit's codec and
// submit it. A unit that fails is reported with its error and the loop carries on; a unit
// left unfinished by Pause is handed back ("returned: ...") so it is reissued at once.
//
// Backend: WebGPU when the browser has an adapter AND the step graph passes the known-answer
// check of its manifest (one step on inputs rebuilt here, compared to the answer the
// coordinator computed on CPU); otherwise WebAssembly (threads when cross-origin isolated).
//
// Messages in:  {type: 'init', workerId, workerKey, assets, origin, threads, throttle, backend, check, token}
//               {type: 'start'} {type: 'pause'} {type: 'throttle', value}
// Messages out: {type: 'state', state: {...}, accepted?: {samples}, log?, isError?}

import * as contract from './contract.js';
import { ErrorFeedback } from './feedback.js';
import { augmentBatch, batchIndices, keepMask, mulberry32 } from './draw.js';

const CODECS = ['fp32', 'fp16', 'int8', 'topk'];
const BLOB_CACHE = 'crowdtrain-blobs-v1';
const HASH_MUL = 2654435761;              // coordinator/steps.py: the known-answer check's hash
const HAND_BACK = 'returned: paused in the browser';
const MAX_ERROR_CHARS = 2000;

const S = {
  workerId: null, workerKey: null, token: null, assets: null, origin: null, threads: 1, throttle: 0.5, backendWanted: 'auto',
  check: 'auto',
  running: false, loop: null, wake: null,
  ort: null, backend: null, backendReason: '', sessions: new Map(), versions: new Map(), shards: new Map(),
  rate: {samples: 0, seconds: 0}, unitsFailed: 0,
  feedback: new ErrorFeedback(),   // what lossy upload codecs dropped, added to the next unit's delta (in memory)
  busySince: 0,   // performance.now() when the tab last stopped resting (the throttle's clock)
  marks: null,    // the first unit's timeline, ms since the worker started (shown to benchmarks)
};
const mark = name => { if (S.marks && !(name in S.marks)) S.marks[name] = Math.round(performance.now()); };

// ------------------------------------------------------------------------------ reporting
let lastPost = 0;
function post(fields = {}, extra = {}) {
  Object.assign(S.shown ??= {}, fields);
  const now = performance.now();
  if (!extra.log && !extra.accepted && !fields.backend && now - lastPost < 200) return;
  lastPost = now;
  postMessage({type: 'state', state: {...S.shown, marks: S.marks, running: S.running, backend: S.backend,
    backendReason: S.backendReason, samplesPerSecond: S.rate.seconds ? S.rate.samples / S.rate.seconds : 0,
    failed: S.unitsFailed}, ...extra});
}
const say = (status, log, isError = false) => post({status}, log ? {log, isError} : {});

// ------------------------------------------------------------------------------ commands
onmessage = ({data}) => {
  if (data.type === 'init') {
    Object.assign(S, {workerId: data.workerId, workerKey: data.workerKey || null, assets: data.assets, origin: data.origin, threads: data.threads,
                      throttle: data.throttle, backendWanted: data.backend, check: data.check,
                      token: data.token || null});
  } else if (data.type === 'start') {
    S.running = true;
    S.marks ??= {start: Math.round(performance.now())};
    S.ortReady ??= prepareOrt();
    S.ortReady.catch(() => { S.ortReady = null; });   // retried by the first unit, which reports the error
    if (!S.loop) S.loop = loop().finally(() => { S.loop = null; });
    S.wake?.();
  } else if (data.type === 'pause') {
    S.running = false;
    S.wake?.();
    say('paused: press Start to contribute');
  } else if (data.type === 'throttle') {
    S.throttle = Math.min(1, Math.max(0.05, data.value));
  }
};

// A sleep that Pause and Start cut short.
function sleep(ms) {
  return new Promise(resolve => {
    const t = setTimeout(done, ms);
    function done() { clearTimeout(t); S.wake = null; resolve(); }
    S.wake = done;
  });
}

// The throttle: a duty cycle. Everything since the last rest counts as work (the steps, and
// also fetching, decoding, building feeds, encoding and submitting a unit); after work of t ms
// the tab rests t * (1/share - 1) ms. Waiting for work (a 204) counts as rest.
async function rest() {
  const work = performance.now() - S.busySince;
  if (S.throttle < 1 && work > 0) await sleep(work * (1 / S.throttle - 1));
  S.busySince = performance.now();
}

// ------------------------------------------------------------------------------ the loop
async function loop() {
  let backoff = 1000;
  S.busySince = performance.now();
  while (S.running) {
    let unit;
    try {
      unit = await nextUnit();
      backoff = 1000;
    } catch (e) {
      if (e instanceof Unauthorized) {   // retrying cannot help: the donor needs a token from the operator
        S.running = false;
        post({status: NEEDS_TOKEN, needsToken: true}, {log: `${NEEDS_TOKEN} (${e.message})`, isError: true});
        break;
      }
      if (e instanceof KeyRefused) {   // this id is bound to another key (another tab of this browser made its own
        // key at the same moment, say): go on under a new id and key, which the page keeps
        Object.assign(S, {workerId: contract.newWorkerId(), workerKey: contract.newWorkerKey()});
        post({}, {rekeyed: {workerId: S.workerId, workerKey: S.workerKey},
                  log: `this worker id belongs to another key on the coordinator; going on as ${S.workerId}`,
                  isError: true});
        continue;
      }
      say(`coordinator unreachable (${short(e)}); retrying in ${Math.round(backoff / 1000)} s`);
      await sleep(backoff);
      backoff = Math.min(30000, backoff * 2);
      continue;
    }
    if (unit === null) continue;
    await runUnit(unit);
  }
}

async function nextUnit() {
  // the model versions this tab holds, newest first: a unit may then come as a version delta
  const held = [...S.versions.keys()].reverse().slice(0, contract.MAX_HELD);
  const body = {protocol: 1, worker_id: S.workerId, backend: 'browser', codecs: CODECS, models: [], held,
                error_feedback: true, ...runtimeFields()};
  const r = await fetch('/api/v1/units/next', {method: 'POST', body: JSON.stringify(body),
                                                 headers: {'Content-Type': 'application/json', ...key(), ...auth()}});
  if (r.status === 401) throw new Unauthorized(await errorText(r));
  if (r.status === 403) {
    const text = await errorText(r);
    if (text.startsWith('403 worker_key:')) throw new KeyRefused(text);
    throw new Error(text);
  }
  if (r.status === 204) {
    const finished = r.headers.get('X-Crowdtrain-Finished') === 'true';
    const wait = 1000 * Math.max(1, +(r.headers.get('Retry-After') || 5));
    const why = r.headers.get('X-Crowdtrain-Reason');
    say(finished ? 'the job is finished: thank you! (checking again now and then)'
                 : `no work right now${why ? ` (${why})` : ''}; waiting`);
    await sleep(finished ? Math.max(wait, 30000) : wait);
    S.busySince = performance.now();
    return null;
  }
  if (!r.ok) throw new Error(await errorText(r));
  return contract.checkUnit(await r.text());
}

async function runUnit(unit) {
  const t0 = performance.now();
  let step = 0;
  try {
    mark('unit');
    say(`unit ${unit.unit_id}: fetching`);
    const manifest = await stepManifest(unit);
    checkHyper(unit, manifest);
    // onnxruntime-web's start-up and the session overlap the downloads
    mark('manifest');
    const [session, base, data] = await Promise.all([sessionFor(manifest).then(x => (mark('session'), x)),
                                                     modelVersion(unit).then(x => (mark('model'), x)),
                                                     shards(unit.shard_ids).then(x => (mark('shards'), x))]);
    const feeds = initialFeeds(manifest.spec, base);
    const rng = mulberry32(unit.seed);
    const batches = batchIndices(data.n, unit.local_steps, unit.batch_size, rng);
    const losses = [];
    const tTrain = performance.now();
    for (step = 0; step < unit.local_steps; step++) {
      if (!S.running) throw new HandBack();
      Object.assign(feeds, batchFeeds(manifest.spec, unit, data, batches[step], rng));
      const out = await session.run(feeds);
      const loss = out.loss.data[0];
      if (!Number.isFinite(loss)) throw new Error(`the loss is ${loss} at step ${step + 1}`);
      losses.push(loss);
      for (const t of manifest.spec.outputs.slice(1)) feeds[t.feeds] = out[t.name];
      post({status: `unit ${unit.unit_id}: step ${step + 1} of ${unit.local_steps}`, lastLoss: loss,
            unitId: unit.unit_id, step: step + 1, steps: unit.local_steps});
      await rest();
    }
    const seconds = (performance.now() - tTrain) / 1000;
    mark('trained');
    const delta = deltaOf(manifest.spec, base, feeds);
    // C(d + r) with this tab's error-feedback residual when the unit allows it (worker_web/feedback.js)
    const bytes = S.feedback.encode(unit.job, unit.unit_id, unit.codec, delta, unit.error_feedback === true);
    const samples = unit.local_steps * unit.batch_size;
    const meta = resultMeta(unit, {loss_before: losses[0], loss_after: losses[losses.length - 1],
                                   num_samples: samples, compute_seconds: seconds});
    say(`unit ${unit.unit_id}: sending`);
    mark('encoded');
    const reply = await submit(unit, meta, bytes);
    mark('submitted');
    S.rate.samples += samples; S.rate.seconds += (performance.now() - t0) / 1000;
    await rest();   // the work after the last step (delta, encoding, submitting) is paid for too
    // the residual is kept only when the coordinator took the result (not "superseded": another copy won)
    if (reply.ok && reply.body?.accepted !== false) S.feedback.commit(unit.unit_id);
    else S.feedback.discard(unit.unit_id);
    post({feedbackUnits: S.feedback.carried});   // shown to tests and benchmarks
    if (reply.ok) {
      post({status: `unit ${unit.unit_id} accepted`}, {accepted: {samples}, log: `unit ${unit.unit_id}: ${samples} ` +
           `samples, loss ${losses[0].toFixed(3)} -> ${losses[losses.length - 1].toFixed(3)}, accepted`});
    } else {
      S.unitsFailed++;
      say(`unit ${unit.unit_id} refused`, `unit ${unit.unit_id} refused: ${reply.text}`, true);
    }
  } catch (e) {
    S.feedback.discard(unit.unit_id);
    const handBack = e instanceof HandBack;
    const text = handBack ? HAND_BACK : `browser worker (${S.backend ?? 'no backend'}) at step ${step + 1}: ${short(e)}`;
    if (!handBack) { S.unitsFailed++; say(`unit ${unit.unit_id} failed`, `unit ${unit.unit_id} failed: ${text}`, true); }
    const meta = resultMeta(unit, {loss_before: 0, loss_after: 0, num_samples: 0,
                                   compute_seconds: (performance.now() - t0) / 1000, error: clip(text)});
    try { await submit(unit, meta, new Uint8Array(0)); } catch { /* the lease expires and the unit is reissued */ }
    if (handBack) say('paused: press Start to contribute', `unit ${unit.unit_id} handed back`);
  }
}

class HandBack extends Error {}
class Unauthorized extends Error {}
class KeyRefused extends Error {}   // 403 worker_key: the id is bound to another key
const NEEDS_TOKEN = 'this coordinator takes work only from volunteers its operator invited: open the link with ' +
  'your token (…/#token=YOUR-TOKEN), or ask the operator for one';
// The operator-issued worker token (coordinators started with --worker-tokens), when the page was given one.
const auth = () => S.token ? {Authorization: `Bearer ${S.token}`} : {};
const key = () => S.workerKey ? {[contract.WORKER_KEY_HEADER]: S.workerKey} : {};

function checkHyper(unit, manifest) {
  const h = unit.hyper;
  if (h.loss !== undefined && h.loss !== 'ce') throw new Error(`loss '${h.loss}' is not in the browser's step graph`);
  if (h.nesterov !== undefined && h.nesterov !== manifest.spec.nesterov) {
    throw new Error(`hyper.nesterov=${h.nesterov} but the step graph was exported with nesterov=${manifest.spec.nesterov}`);
  }
}

function resultMeta(unit, numbers) {
  return {protocol: 1, unit_id: unit.unit_id, lease: unit.lease, worker_id: S.workerId,
          base_version: unit.model_version, ...numbers, error: numbers.error ?? null};
}

async function submit(unit, meta, deltaBytes) {
  const body = contract.packResult(meta, deltaBytes);
  for (let attempt = 0; ; attempt++) {
    let r;
    try {
      r = await fetch(`/api/v1/units/${encodeURIComponent(unit.unit_id)}/result`,
                      {method: 'POST', body, headers: {'Content-Type': 'application/octet-stream', ...auth()}});
    } catch (e) {   // the coordinator may be restarting: the result stays valid until refused
      if (attempt >= 8) throw e;
      await new Promise(res => setTimeout(res, Math.min(30000, 1000 * 2 ** attempt)));
      continue;
    }
    if (r.ok) return {ok: true, body: await r.json()};
    if (r.status >= 500 && attempt < 8) { await new Promise(res => setTimeout(res, 1000 * 2 ** attempt)); continue; }
    return {ok: false, text: await errorText(r)};
  }
}

async function errorText(r) {
  try { const e = (await r.json()).error; return `${r.status} ${e.code}: ${e.message}`; } catch { return `HTTP ${r.status}`; }
}

const short = e => clip(String(e?.message ?? e).split('\n')[0], 500);
// At most n characters, cut between code points (a cut surrogate pair would make the text invalid).
const clip = (text, n = MAX_ERROR_CHARS) => Array.from(text).slice(0, n).join('');

// ------------------------------------------------------------------------------ blobs
async function blob(id, {cache = true} = {}) {
  const url = `/api/v1/blobs/${id}`;
  const store = cache && self.caches ? await caches.open(BLOB_CACHE) : null;
  let r = store ? await store.match(url) : undefined;
  const fromCache = !!r;
  if (!r) {
    r = await fetch(url);
    if (!r.ok) throw new Error(`blob ${id.slice(0, 12)}: ${await errorText(r)}`);
    if (store) await store.put(url, r.clone());
  }
  const bytes = new Uint8Array(await r.arrayBuffer());
  if (await contract.blobId(bytes) !== id) {
    if (store) await store.delete(url);
    throw new Error(`blob ${id.slice(0, 12)}: content does not match its id${fromCache ? ' (cached copy dropped)' : ''}`);
  }
  return bytes;
}

// The unit's base model: one this tab holds, or rebuilt from a held version and the unit's version
// delta (checked by hash: docs/protocol.md, version deltas), or downloaded whole (also when the
// reconstruction fails its check). Kept decoded, the newest two.
async function modelVersion(unit) {
  const id = unit.model_version, bd = unit.base_delta;
  if (!S.versions.has(id)) {
    let state = null;
    if (bd && S.versions.has(bd.from)) {
      try {
        state = await contract.reconstructBase(S.versions.get(bd.from), await blob(bd.blob, {cache: false}), id);
        S.deltaUnits = (S.deltaUnits ?? 0) + 1;   // shown to tests and benchmarks
      } catch (e) {
        S.deltaFallbacks = (S.deltaFallbacks ?? 0) + 1;
        say(`unit ${unit.unit_id}: fetching`, `version delta not usable (${short(e)}); downloading the whole base`);
      }
    }
    S.versions.set(id, state ?? contract.decodeDelta(await blob(id, {cache: false})));
    while (S.versions.size > 2) S.versions.delete(S.versions.keys().next().value);
  } else {
    const state = S.versions.get(id);   // most recently used last (Map order): it stays held
    S.versions.delete(id);
    S.versions.set(id, state);
  }
  post({deltaUnits: S.deltaUnits ?? 0, deltaFallbacks: S.deltaFallbacks ?? 0});
  return S.versions.get(id);
}

async function shards(ids) {
  const parts = [];
  for (const id of ids) {
    if (!S.shards.has(id)) {
      S.shards.set(id, contract.decodeShard(await blob(id)));
      while (S.shards.size > 8) S.shards.delete(S.shards.keys().next().value);
    }
    parts.push(S.shards.get(id));
  }
  if (parts.length === 1) return parts[0];
  const n = parts.reduce((a, p) => a + p.n, 0);
  const x = new Uint8Array(n * 3072), y = new Uint8Array(n);
  let at = 0;
  for (const p of parts) { x.set(p.x, at * 3072); y.set(p.y, at); at += p.n; }
  return {x, y, n};
}

async function stepManifest(unit) {
  const url = `/api/v1/steps/${encodeURIComponent(unit.model)}/${unit.batch_size}`;
  for (;;) {
    const r = await fetch(url, {cache: 'no-cache'});
    if (r.ok) return r.json();
    if (r.status !== 503 || Date.now() / 1000 > unit.deadline) throw new Error(`step graph: ${await errorText(r)}`);
    say(`unit ${unit.unit_id}: the coordinator is preparing the training graph`);
    await new Promise(res => setTimeout(res, 1000 * +(r.headers.get('Retry-After') || 2)));
  }
}

// ------------------------------------------------------------------------------ backend
async function loadOrt(withWebGpu) {
  if (S.ort) return S.ort;
  const file = withWebGpu ? 'ort.min.mjs' : 'ort.wasm.min.mjs';
  mark('ort-import');
  const ort = await import(`${S.assets}/ort/${file}`);
  ort.env.wasm.wasmPaths = `${S.origin}${S.assets}/ort/`;
  ort.env.wasm.numThreads = self.crossOriginIsolated ? S.threads : 1;
  ort.env.wasm.proxy = false;
  ort.env.logLevel = 'error';
  S.ort = ort;
  return ort;
}

async function create(ort, graph, ep) {
  mark('session-create');
  return ort.InferenceSession.create(graph, {executionProviders: [ep], graphOptimizationLevel: 'all',
                                           logSeverityLevel: 3});   // no warnings about CPU-placed shape ops
}

// Look for a WebGPU adapter and load the onnxruntime-web build that fits (WebGPU + WASM, or the
// smaller WASM-only one); started as soon as the donor presses Start, while the first unit is
// still being fetched. Resolves to the adapter or null.
async function prepareOrt() {
  let adapter = null;
  if (S.backendWanted !== 'wasm' && self.navigator.gpu) {
    try { adapter = await navigator.gpu.requestAdapter(); } catch { adapter = null; }
  }
  await loadOrt(adapter !== null);
  return adapter;
}

// The session for a manifest's graph; the first one also decides the backend.
async function sessionFor(manifest) {
  if (S.sessions.has(manifest.graph)) return S.sessions.get(manifest.graph);
  let session = null;
  if (S.backend === null || S.backend === 'webgpu') {
    const adapter = await (S.ortReady ??= prepareOrt());
    const ort = S.ort;
    if (adapter) {
      say('checking WebGPU with a known-answer step');
      try {
        const gpu = await create(ort, await blob(manifest.webgpu.graph), 'webgpu');   // the WebGPU formulation
        const verdict = await knownAnswer(gpu, manifest, manifest.webgpu);
        S.knownAnswer = verdict;
        if (verdict.ok) { session = gpu; setBackend('webgpu', 'known-answer check passed'); }
        else { await gpu.release?.(); setBackend('wasm', `WebGPU failed the known-answer check: ${verdict.why}`); }
      } catch (e) {   // a step that cannot run fails the check as surely as a wrong answer
        S.knownAnswer = {ok: false, why: `WebGPU could not run the step: ${short(e)}`};
        setBackend('wasm', `WebGPU failed the known-answer check: ${S.knownAnswer.why}`);
      }
    } else {
      setBackend('wasm', S.backendWanted === 'wasm' ? 'asked for' : 'no WebGPU adapter');
    }
  }
  if (session === null) {
    const ort = await loadOrt(false);
    session = await create(ort, await blob(manifest.graph), 'wasm');
    if (S.check === 'always' && !S.sessions.size) {
      const verdict = await knownAnswer(session, manifest);
      S.knownAnswerWasm = verdict;
      post({knownAnswerWasm: verdict}, {log: `WebAssembly known-answer check: ${verdict.ok ? 'passed' : verdict.why}`});
      if (!verdict.ok) throw new Error(`WebAssembly failed the known-answer check: ${verdict.why}`);
    }
  }
  S.sessions.set(manifest.graph, session);
  return session;
}

// What this tab's units train on, and why, for the operator (UnitRequest.runtime, webgpu_check, runtime_note):
// known once its first unit's session is made.
function runtimeFields() {
  if (S.backend === null) return {};
  const note = contract.runtimeNote(S.backendReason);
  return {runtime: S.backend, ...(S.knownAnswer ? {webgpu_check: S.knownAnswer.ok ? 'passed' : 'failed'} : {}),
          ...(note !== null ? {runtime_note: note} : {})};
}

function setBackend(name, reason) {
  S.backend = name; S.backendReason = reason;
  const threads = name === 'wasm' ? `, ${S.ort.env.wasm.numThreads} thread${S.ort.env.wasm.numThreads > 1 ? 's' : ''}` : '';
  S.backendReason = reason + threads;
  post({backend: name, knownAnswer: S.knownAnswer ?? null}, {log: `backend: ${name} (${S.backendReason})`});
}

// One step on the manifest's check inputs, compared with the answer the coordinator computed
// for the same graph on CPU (`answer`: manifest.check for the WASM graph, manifest.webgpu for
// the WebGPU one; both carry {loss, outputs}).
async function knownAnswer(session, manifest, answer = manifest.check) {
  const {check, spec} = manifest;
  const state = contract.decodeDelta(await blob(check.state));
  const shard = contract.decodeShard(await blob(check.shard));
  const B = spec.inputs.find(t => t.name === 'x').shape[0];
  const feeds = initialFeeds(spec, state);
  const x = new Float32Array(B * 3072), y = new BigInt64Array(B);
  const take = Math.min(B, shard.n);
  for (let i = 0; i < B; i++) {
    const j = i % take;
    for (let k = 0; k < 3072; k++) x[i * 3072 + k] = shard.x[j * 3072 + k];
    y[i] = BigInt(shard.y[j]);
  }
  feeds.x = new S.ort.Tensor('float32', x, [B, 3, 32, 32]);
  feeds.y = new S.ort.Tensor('int64', y, [B]);
  Object.assign(feeds, maskAndHyperFeeds(spec, (i, p) => hash(i) / 4294967296 >= p, check.hyper));
  const out = await session.run(feeds);
  const tol = check.tolerance, loss = out.loss.data[0];
  if (!(Math.abs(loss - answer.loss) <= tol.loss * Math.max(1, Math.abs(answer.loss)))) {
    return {ok: false, why: `loss ${loss} where ${answer.loss} was expected`, loss};
  }
  for (const t of spec.outputs.slice(1)) {
    const got = out[t.name].data, was = feeds[t.feeds].data, want = answer.outputs[t.name];
    let norm = 0, proj = 0;
    for (let i = 0; i < got.length; i++) {
      const d = got[i] - was[i];
      norm += d * d;
      proj += (hash(i) >>> 16) & 1 ? d : -d;
    }
    norm = Math.sqrt(norm);
    if (!(Math.abs(norm - want.norm) <= tol.norm * want.norm + 1e-6) ||
        !(Math.abs(proj - want.proj) <= tol.proj * want.norm + 1e-6)) {
      return {ok: false, why: `${t.name}: change of norm ${norm.toPrecision(4)} / projection ${proj.toPrecision(4)} ` +
                              `where ${want.norm.toPrecision(4)} / ${want.proj.toPrecision(4)} was expected`, loss};
    }
  }
  return {ok: true, loss};
}

const hash = i => Math.imul(i, HASH_MUL) >>> 0;

// ------------------------------------------------------------------------------ the step's feeds
function tensorOf(entry, shape) {
  return new S.ort.Tensor('float32', Float32Array.from(entry.data), shape);
}

// Parameters, fixed weights and statistics from the base state; momentum from zero.
function initialFeeds(spec, base) {
  const feeds = {};
  for (const t of spec.inputs) {
    if (t.role === 'param' || t.role === 'fixed' || t.role === 'stat') {
      const entry = base.get(t.state);
      if (!entry) throw new Error(`the model version has no '${t.state}'`);
      feeds[t.name] = tensorOf(entry, t.shape);
    } else if (t.role === 'momentum') {
      feeds[t.name] = new S.ort.Tensor('float32', new Float32Array(numel(t.shape)), t.shape);
    }
  }
  return feeds;
}

// One batch: augmented images (random crop, mirror), labels, dropout masks, scalars (the draws of
// worker_web/draw.js, in its order).
function batchFeeds(spec, unit, data, idx, rng) {
  const {x, y} = augmentBatch(data, idx, rng, unit.hyper.crop_pad ?? 0, unit.hyper.flip ?? false,
                                 unit.hyper.crop_reflect ?? false, unit.hyper.flip_parity ?? null);
  return {x: new S.ort.Tensor('float32', x, [idx.length, 3, 32, 32]),
          y: new S.ort.Tensor('int64', BigInt64Array.from(y, BigInt), [idx.length]),
          ...maskAndHyperFeeds(spec, (i, p) => rng() >= p, unit.hyper)};
}

// Dropout keep-masks (element i is kept when keep(i, p)) and the hyperparameter scalars
// (from `hyper`; absent keys are 0).
function maskAndHyperFeeds(spec, keep, hyper) {
  const feeds = {};
  for (const t of spec.inputs) {
    if (t.role === 'dropout') {
      feeds[t.name] = new S.ort.Tensor('float32', keepMask(numel(t.shape), t.p, keep), t.shape);
    } else if (t.role === 'hyper') {
      feeds[t.name] = new S.ort.Tensor('float32', new Float32Array([hyper[t.name] ?? 0]), []);
    }
  }
  return feeds;
}

const numel = shape => shape.reduce((a, b) => a * b, 1);

// trained - base for the parameters and statistics, in the base state's order (as Python's).
function deltaOf(spec, base, feeds) {
  const trained = new Map();
  for (const t of spec.inputs) if (t.role === 'param' || t.role === 'stat') trained.set(t.state, feeds[t.name].data);
  const delta = new Map();
  for (const [name, entry] of base) {
    const now = trained.get(name);
    if (!now) continue;
    const d = new Float32Array(now.length);
    for (let i = 0; i < d.length; i++) d[i] = now[i] - entry.data[i];
    delta.set(name, {shape: entry.shape, data: d});
  }
  return delta;
}

