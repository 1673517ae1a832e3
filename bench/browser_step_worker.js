// bench/browser_step.py: times an exported training step (models/onnx_step.py) in
// onnxruntime-web WASM the way worker_web/worker.js runs it (same build: ort.wasm.min.mjs,
// proxy off, graphOptimizationLevel 'all', each step's outputs fed back as the next inputs).
//
// Messages (each answered with {id, ...} or {id, error}):
//   {op: 'init', threads}                       load onnxruntime-web with that many threads
//   {op: 'load', key, graph, meta, data, options?}  create a session (options: extra session options, e.g.
//                                               {enableProfiling: true}); inputs from meta (JSON) + data (raw bytes)
//   {op: 'run', key, steps}                     run `steps` steps: {times (ms of session.run), losses}
//   {op: 'endProfiling', key}                   end a profiling session (onnxruntime logs it to the console)

let ort = null;
const sessions = new Map();

onmessage = async ({data}) => {
  try {
    postMessage({id: data.id, ...(await handle(data))});
  } catch (e) {
    postMessage({id: data.id, error: String(e?.stack ?? e).slice(0, 2000)});
  }
};

const ARRAYS = {float32: Float32Array, int64: BigInt64Array};

async function bytes(url) {
  const r = await fetch(url);
  if (!r.ok) throw new Error(`${url}: HTTP ${r.status}`);
  return new Uint8Array(await r.arrayBuffer());
}

async function handle(m) {
  if (m.op === 'init') {
    ort = await import(`${location.origin}/ort/ort.wasm.min.mjs`);
    ort.env.wasm.wasmPaths = `${location.origin}/ort/`;
    ort.env.wasm.numThreads = self.crossOriginIsolated ? m.threads : 1;
    ort.env.wasm.proxy = false;
    ort.env.logLevel = 'error';
    return {crossOriginIsolated: self.crossOriginIsolated, threads: ort.env.wasm.numThreads,
            hardwareConcurrency: navigator.hardwareConcurrency, userAgent: navigator.userAgent,
            ortVersion: ort.env.versions?.web ?? ort.env.versions?.common ?? null};
  }
  if (m.op === 'load') {
    const [graph, metaBytes, raw] = await Promise.all([bytes(m.graph), bytes(m.meta), bytes(m.data)]);
    const meta = JSON.parse(new TextDecoder().decode(metaBytes));
    const t0 = performance.now();
    const session = await ort.InferenceSession.create(graph, {executionProviders: ['wasm'],
                                                              graphOptimizationLevel: 'all', logSeverityLevel: 3,
                                                              ...(m.options ?? {})});
    const createMs = performance.now() - t0;
    const feeds = {};
    for (const t of meta.inputs) {
      const Arr = ARRAYS[t.dtype];
      const copy = raw.slice(t.offset, t.offset + t.nbytes);   // aligned, owned copy
      feeds[t.name] = new ort.Tensor(t.dtype, new Arr(copy.buffer), t.shape);
    }
    sessions.set(m.key, {session, feeds, outputs: meta.outputs});
    return {createMs};
  }
  if (m.op === 'run') {
    const s = sessions.get(m.key);
    if (!s) throw new Error(`no session '${m.key}'`);
    const times = [], losses = [];
    for (let i = 0; i < m.steps; i++) {
      const t = performance.now();
      const out = await s.session.run(s.feeds);
      times.push(performance.now() - t);
      const loss = out.loss.data[0];
      if (!Number.isFinite(loss)) throw new Error(`the loss is ${loss}`);
      losses.push(loss);
      for (const o of s.outputs) s.feeds[o.feeds] = out[o.name];
    }
    return {times, losses};
  }
  if (m.op === 'endProfiling') {
    sessions.get(m.key).session.endProfiling();
    return {};
  }
  throw new Error(`unknown op ${m.op}`);
}
