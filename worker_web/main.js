// The donate page: renders what the Web Worker (worker.js) reports and sends it commands.
// It owns no training state of its own; the worker owns onnxruntime-web and the loop.
//
// Kept in localStorage (so a reload, or a coordinator restart, carries on where it was):
//   crowdtrain.workerId   anonymous id, "web-" + 16 hex digits, sent with every request
//   crowdtrain.running    "1" while the donor wants this tab to work
//   crowdtrain.throttle   10..100, the share of time spent computing
//   crowdtrain.done       {units, samples} accepted by the coordinator for this id
// URL parameters (for operators and tests): ?autostart=1 &throttle=N &threads=N
//   &backend=auto|wasm|webgpu &check=auto|always (run the known-answer check on WASM too)

const settings = JSON.parse(document.getElementById('settings').textContent);
const query = new URLSearchParams(location.search);
const $ = id => document.getElementById(id);
const store = {
  get: (k, d) => { try { const v = localStorage.getItem('crowdtrain.' + k); return v === null ? d : JSON.parse(v); } catch { return d; } },
  set: (k, v) => { try { localStorage.setItem('crowdtrain.' + k, JSON.stringify(v)); } catch { /* private mode */ } },
};

function newWorkerId() {
  const b = crypto.getRandomValues(new Uint8Array(8));
  return 'web-' + Array.from(b, x => x.toString(16).padStart(2, '0')).join('');
}
const workerId = store.get('workerId', null) || newWorkerId();
store.set('workerId', workerId);
$('worker-id').textContent = workerId;

let throttle = clamp(+(query.get('throttle') ?? store.get('throttle', 50)), 10, 100);
let running = query.get('autostart') === '1' || store.get('running', false) === true;
const done = store.get('done', {units: 0, samples: 0});
let jobSamples = 0;
const state = window.crowdtrainState = {workerId, running, throttle, backend: null, backendReason: '',
  status: 'loading', unitsDone: done.units, samplesDone: done.samples, samplesPerSecond: 0, lastLoss: null,
  failed: 0, errors: [], knownAnswer: null, crossOriginIsolated: self.crossOriginIsolated};

function clamp(x, lo, hi) { return Math.min(hi, Math.max(lo, Number.isFinite(x) ? x : hi)); }

function log(text, isError = false) {
  const li = document.createElement('li');
  li.textContent = `${new Date().toLocaleTimeString()} ${text}`;
  if (isError) li.className = 'error';
  $('log').prepend(li);
  while ($('log').children.length > 200) $('log').lastChild.remove();
}

function render() {
  $('toggle').textContent = state.running ? 'Pause' : 'Start';
  $('toggle').setAttribute('aria-pressed', String(state.running));
  $('throttle').value = String(throttle);
  $('throttle-value').textContent = `${throttle}%`;
  $('status').textContent = state.status;
  $('backend').textContent = state.backend ? `${state.backend === 'webgpu' ? 'WebGPU' : 'WebAssembly'}` +
    (state.backendReason ? ` (${state.backendReason})` : '') : 'not chosen yet';
  $('units').textContent = String(state.unitsDone);
  $('rate').textContent = state.samplesPerSecond ? state.samplesPerSecond.toFixed(1) : '–';
  const share = jobSamples ? ` (${Math.min(100, 100 * state.samplesDone / jobSamples).toFixed(2)}% of the job so far)` : "";
  $('contribution').textContent = state.samplesDone ? `${state.samplesDone.toLocaleString()} samples${share}` : 'nothing yet';
  $('loss').textContent = state.lastLoss === null ? '–' : state.lastLoss.toFixed(4);
}

if (settings.ortMissing && settings.ortMissing.length) {
  state.status = 'this server has no onnxruntime-web installed (run deploy/setup.sh on it); cannot train here';
  log(state.status, true);
  render();
} else {
  const worker = new Worker(`${settings.assets}/worker.js`, {type: 'module'});
  worker.onmessage = ({data}) => {
    if (data.type === 'state') {
      Object.assign(state, data.state);
      if (data.accepted) {
        done.units += 1; done.samples += data.accepted.samples;
        store.set('done', done);
        state.unitsDone = done.units; state.samplesDone = done.samples;
      }
      if (data.log) log(data.log, data.isError);
      render();
    }
  };
  worker.onerror = e => { state.status = `the worker stopped: ${e.message}`; log(state.status, true); render(); };
  const threads = clamp(+(query.get('threads') ?? Math.min(4, Math.max(1, (navigator.hardwareConcurrency || 2) >> 1))), 1, 16);
  worker.postMessage({type: 'init', workerId, assets: settings.assets, origin: location.origin, threads,
                      throttle: throttle / 100, backend: query.get('backend') || 'auto',
                      check: query.get('check') || 'auto'});
  const toggle = $('toggle');
  toggle.disabled = false;
  toggle.onclick = () => {
    state.running = !state.running;
    store.set('running', state.running);
    worker.postMessage({type: state.running ? 'start' : 'pause'});
    render();
  };
  $('throttle').oninput = e => {
    throttle = clamp(+e.target.value, 10, 100);
    store.set('throttle', throttle);
    worker.postMessage({type: 'throttle', value: throttle / 100});
    render();
  };
  if (running) { state.running = true; worker.postMessage({type: 'start'}); }
  else state.status = 'paused: press Start to contribute';
  render();
}

async function refreshJob() {
  try {
    const s = await (await fetch('/api/status', {cache: 'no-store'})).json();
    $('job').textContent = s.job; $('model').textContent = s.model;
    jobSamples = s.samples;
    render();
  } catch { /* the coordinator may be restarting; the worker reports that */ }
}
refreshJob();
setInterval(refreshJob, 10000);
