// The donate page: renders what the Web Worker (worker.js) reports and sends it commands.
// It owns no training state of its own; the worker owns onnxruntime-web and the loop.
//
// Kept in localStorage (so a reload, or a coordinator restart, carries on where it was):
//   crowdtrain.workerId   anonymous id, "web-" + 16 hex digits, sent with every request
//   crowdtrain.workerKey  this tab's secret (contract.js newWorkerKey), sent in the Crowdtrain-Worker-Key header
//                         with unit requests and name changes: the coordinator binds the id to it, so that
//                         someone who learns the id (it is shown on this page) cannot act as this tab
//   crowdtrain.running    "1" while the donor wants this tab to work
//   crowdtrain.throttle   10..100, the share of time spent computing
//   crowdtrain.done       {units, samples} accepted by the coordinator for this id
//   crowdtrain.credit     the last credit the coordinator reported for this id (shown at once on a reload,
//                         then refreshed from GET /api/v1/credit?worker=<id>)
//   crowdtrain.name       the display name this tab last saved (POST /api/v1/workers/<id>/name)
//   crowdtrain.token      an operator-issued worker token (coordinators started with --worker-tokens), taken
//                         from the link's fragment, #token=..., which is then removed from the address bar
//                         (a fragment never reaches a server or a Referer header)
// URL parameters (for operators and tests): ?autostart=1 &throttle=N &threads=N
//   &backend=auto|wasm|webgpu &check=auto|always (run the known-answer check on WASM too)

import { ContractError, WORKER_KEY_HEADER, WORKER_KEY_RE, checkNameRequest, newWorkerId, newWorkerKey } from './contract.js';

const settings = JSON.parse(document.getElementById('settings').textContent);
const query = new URLSearchParams(location.search);
const $ = id => document.getElementById(id);
const store = {
  get: (k, d) => { try { const v = localStorage.getItem('crowdtrain.' + k); return v === null ? d : JSON.parse(v); } catch { return d; } },
  set: (k, v) => { try { localStorage.setItem('crowdtrain.' + k, JSON.stringify(v)); } catch { /* private mode */ } },
};

let workerId = store.get('workerId', null) || newWorkerId();
store.set('workerId', workerId);
const kept = store.get('workerKey', null);
let workerKey = typeof kept === 'string' && WORKER_KEY_RE.test(kept) ? kept : newWorkerKey();
store.set('workerKey', workerKey);
const fragment = new URLSearchParams(location.hash.slice(1));
if (fragment.has('token')) {
  const given = fragment.get('token').trim();
  store.set('token', given || null);   // #token= (empty) forgets it
  fragment.delete('token');
  const rest = fragment.toString();
  history.replaceState(null, '', location.pathname + location.search + (rest ? '#' + rest : ''));
}
const token = store.get('token', null);
const auth = () => token ? {Authorization: `Bearer ${token}`} : {};
$('worker-id').textContent = workerId;

let throttle = clamp(+(query.get('throttle') ?? store.get('throttle', 50)), 10, 100);
let running = query.get('autostart') === '1' || store.get('running', false) === true;
const done = store.get('done', {units: 0, samples: 0});
let jobSamples = 0;
const state = window.crowdtrainState = {workerId, running, throttle, backend: null, backendReason: '',
  status: 'loading', unitsDone: done.units, samplesDone: done.samples, samplesPerSecond: 0, lastLoss: null,
  failed: 0, errors: [], knownAnswer: null, hasToken: token !== null, needsToken: false,
  crossOriginIsolated: self.crossOriginIsolated,
  credit: store.get('credit', null), creditFresh: false, creditText: '', name: store.get('name', null),
  nameStatus: '', donate: null, donateText: ''};
// WebAssembly threads: the URL's, else half the cores (at most 4); more than one needs cross-origin isolation
const threads = clamp(+(query.get('threads') ?? Math.min(4, Math.max(1, (navigator.hardwareConcurrency || 2) >> 1))), 1, 16);

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
  state.creditText = creditText(state.credit);
  $('credit').textContent = state.creditText + (state.credit && !state.creditFresh ? ' (last known)' : '');
  $('tag').textContent = state.credit ? state.credit.tag : '…';
  $('name-status').textContent = state.nameStatus;
  state.donateText = donateText(state.donate);
  $('donate-info').textContent = state.donateText;
}

function creditText(c) {
  if (!c) return 'checking…';
  if (!c.rank) return 'none yet: credit counts once your work is folded into the model';
  return `${c.samples.toLocaleString()} samples in ${c.units.toLocaleString()} unit${c.units === 1 ? '' : 's'}, ` +
    `rank ${c.rank} of ${c.of.toLocaleString()}`;
}

const MB = n => n === null || n === undefined ? '?' : `${(n / 1e6).toFixed(n < 1e7 ? 2 : 1)} MB`;

// What Start costs, in words, from GET /api/v1/donate (real sizes from this coordinator) and this browser
function donateText(d) {
  if (!d) return 'Asking the server what a unit costs…';
  const gpu = !!navigator.gpu && (query.get('backend') || 'auto') !== 'wasm';
  const once = d.once, unit = d.per_unit, g = once.step_graph;
  const runtime = once.runtime_bytes[gpu ? 'webgpu' : 'wasm'];
  const graph = g.state === 'ready' ? MB(gpu ? g.webgpu_bytes : g.wasm_bytes)
    : g.state === 'unavailable' ? 'none: this model cannot train in a browser' : 'being prepared, size not known yet';
  const cores = navigator.hardwareConcurrency || '?';
  const used = self.crossOriginIsolated ? threads : 1;
  const invited = d.invited_only ? (state.hasToken ? 'This coordinator takes work only from invited volunteers; ' +
    'this browser holds the token of your invitation link. ' : 'This coordinator takes work only from invited ' +
    'volunteers: open the link with your token (…/#token=YOUR-TOKEN) from its operator, or Start will be refused. ')
    : '';
  return invited + `Downloads once (then kept by the browser): this page ${MB(once.page_bytes)}, onnxruntime-web ` +
    `${MB(runtime)}, the ${d.model} training-step graph ${graph}. ` +
    `Downloads per unit of work: the current model version ${MB(unit.model_version_bytes)} (when it changed since ` +
    `the last unit) and ${unit.shards} data shard${unit.shards === 1 ? '' : 's'} of ${MB(unit.shard_bytes)} ` +
    `(${unit.samples.toLocaleString()} training samples, ${unit.local_steps} steps of ${unit.batch_size}); ` +
    (d.tab_units ? `this tab's first unit is smaller: ${d.tab_units.first.local_steps} step of ` +
      `${d.tab_units.first.batch_size} samples, about ${MB(d.tab_units.first.model_version_bytes)} of model (half ` +
      `precision) and ${MB(d.tab_units.first.shard_bytes)} of data; later units are sized to take about ` +
      `${d.tab_units.seconds} s on this machine. ` : '') +
    `uploads one weight update per unit. ` +
    `Uses ${used} of your ${cores} CPU threads, computing ${throttle}% of the time (the slider) and resting the rest; ` +
    (gpu ? 'your browser offers WebGPU, so it will also use your GPU once a quick check passes (otherwise CPU only).'
      : 'no WebGPU here, so CPU only (WebAssembly), no GPU.');
}

async function refreshDonate() {
  try {
    const r = await fetch('/api/v1/donate', {cache: 'no-store'});
    if (r.ok) { state.donate = await r.json(); render(); }
  } catch { /* shown as "asking" until the server answers */ }
}

async function refreshCredit() {
  try {
    const r = await fetch(`/api/v1/credit?worker=${encodeURIComponent(workerId)}&limit=1`, {cache: 'no-store'});
    if (!r.ok) return;
    const me = (await r.json()).me;
    state.credit = me; state.creditFresh = true;
    store.set('credit', me);
    if (me.name && state.name === null) { state.name = me.name; $('name').value = me.name; }
    render();
  } catch { /* the coordinator may be restarting */ }
}

async function saveName(event) {
  event.preventDefault();
  const text = $('name').value.trim();
  let body;
  try {
    body = checkNameRequest({protocol: 1, name: text === '' ? null : text});
  } catch (e) {
    if (!(e instanceof ContractError)) throw e;
    state.nameStatus = `not saved: a name must be ${e.expected}`;
    render();
    return;
  }
  try {
    const r = await fetch(`/api/v1/workers/${encodeURIComponent(workerId)}/name`, {method: 'POST',
      headers: {'Content-Type': 'application/json', [WORKER_KEY_HEADER]: workerKey, ...auth()}, body: JSON.stringify(body)});
    const answer = await r.json();
    if (!r.ok) { state.nameStatus = `not saved: ${answer.error?.message ?? r.status}`; render(); return; }
    state.name = answer.name; store.set('name', answer.name);
    state.nameStatus = answer.name ? `saved: the leaderboard shows you as "${answer.name}" (${answer.tag})`
      : `cleared: the leaderboard shows you as ${answer.tag}`;
  } catch {
    state.nameStatus = 'not saved: the server did not answer; try again';
  }
  render();
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
        setTimeout(refreshCredit, 1500);   // once the coordinator has folded it
      }
      if (data.log) log(data.log, data.isError);
      if (data.state.needsToken) { state.running = false; store.set('running', false); }
      if (data.rekeyed) {   // the coordinator holds this id for another key: the worker went on under a new id
        ({workerId, workerKey} = data.rekeyed);
        store.set('workerId', workerId); store.set('workerKey', workerKey);
        done.units = 0; done.samples = 0; store.set('done', done);
        Object.assign(state, {workerId, unitsDone: 0, samplesDone: 0});
        $('worker-id').textContent = workerId;
      }
      render();
    }
  };
  worker.onerror = e => { state.status = `the worker stopped: ${e.message}`; log(state.status, true); render(); };
  worker.postMessage({type: 'init', workerId, workerKey, assets: settings.assets, origin: location.origin, threads,
                      throttle: throttle / 100, backend: query.get('backend') || 'auto',
                      check: query.get('check') || 'auto', token});
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
$('name').value = state.name ?? '';
$('name-form').onsubmit = saveName;
refreshDonate();
refreshCredit();
setInterval(refreshCredit, 20000);
