// A lying donor's rewrites of its own honest deltas, for tests and benches only (worker_web/drive.mjs
// --lie KIND; never served to a page: not in coordinator/web.py's PAGE_FILES). The same lies as
// coordinator/sim/faults.py's `lie` and `Liar` (checked by tests/test_js_contract.py):
//
//   sign_flip   the honest delta x -10
//   scale       the honest delta x 10
//   noise       Gaussian noise in place of the delta, 10x its per-element RMS (its own seeded generator:
//               other draws than numpy's, the same distribution)
//   free_ride   a zero delta, claiming every sample the unit holds
//   replay      the delta of this donor's first unit, sent again for every later unit
//   a_little    per coordinate, mean - z std of this donor's newest 8 honest deltas (z = A_LITTLE_Z, "a
//               little is enough" for 1 colluder of 3): a lone colluder, its own accomplice, as a lone
//               `Liar`; its first unit is sent honest (a spread needs two deltas; the Python liar computes
//               a second, other-seeded run instead, which a wire rewrite cannot)
//   band        each tensor turned towards a random direction orthogonal to it (its own generator), its norm
//               kept, to cosine BAND_COSINE with the honest one: the middle of the dense check's inconclusive
//               band (coordinator/trust.py Tolerance), a liar that knows the tolerance
//   label_flip  not a rewrite of the result: the tab trains honestly on labels (y + 1) mod 10, because the
//               page's worker.js is served to it with its training shards' labels moved
//               (`flipLabelsSource`: a donor who edits the page's code; the known-answer check, which
//               tells a broken backend, still sees the true labels); its results are sent as computed
export const LIES = ['sign_flip', 'scale', 'noise', 'free_ride', 'label_flip', 'replay', 'a_little', 'band'];   // faults.py LIES, in its order
export const LIE_FACTOR = 10;
export const A_LITTLE_WINDOW = 8;
export const A_LITTLE_Z = 0.43072729929545733;   // coordinator/sim/faults.py a_little_z(3, 1) = Phi^-1(2/3)
export const NUM_CLASSES = 10;
export const BAND_COSINE = (0.9 + 0.99) / 2;   // coordinator/sim/faults.py BAND_COSINE (checked by tests/test_js_contract.py)

// The source of worker_web/worker.js with every training shard's labels moved to the next class, (y + 1)
// mod 10, as coordinator/sim/faults.py `flip_labels`. Throws when the source has not exactly one place to
// change (worker.js changed: the lie must not silently become honest).
export const SHARD_DECODE = 'S.shards.set(id, contract.decodeShard(await blob(id)));';
export const flipShardLabels = (shard) => ({...shard, y: shard.y.map((label) => (label + 1) % NUM_CLASSES)});
export function flipLabelsSource(source) {
  const at = source.indexOf(SHARD_DECODE);
  if (at < 0 || source.indexOf(SHARD_DECODE, at + 1) >= 0) {
    throw new Error(`label_flip: worker.js has ${at < 0 ? 'no' : 'more than one'} '${SHARD_DECODE}' to rewrite`);
  }
  const flipped = `S.shards.set(id, (${flipShardLabels.toString()})(contract.decodeShard(await blob(id))));`
    .replace('NUM_CLASSES', String(NUM_CLASSES));
  return source.slice(0, at) + flipped + source.slice(at + SHARD_DECODE.length);
}

// mulberry32, then Box-Muller: a seeded standard normal generator
function normals(seed) {
  let a = seed >>> 0;
  const uniform = () => {
    a = (a + 0x6D2B79F5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  let spare = null;
  return () => {
    if (spare !== null) { const s = spare; spare = null; return s; }
    const u = 1 - uniform(), v = uniform();
    const r = Math.sqrt(-2 * Math.log(u));
    spare = r * Math.sin(2 * Math.PI * v);
    return r * Math.cos(2 * Math.PI * v);
  };
}

// Per coordinate, mean - z x std (ddof 1) of two or more deltas (same tensors), in float64, as float32:
// coordinator/sim/faults.py `a_little`.
export function aLittle(deltas, z) {
  if (deltas.length < 2) throw new Error('a_little needs two or more honest deltas to estimate their spread');
  const k = deltas.length;
  return new Map([...deltas[0]].map(([name, t]) => {
    const out = new Float32Array(t.data.length);
    for (let i = 0; i < out.length; i++) {
      let sum = 0;
      for (const d of deltas) sum += d.get(name).data[i];
      const mean = sum / k;
      let ss = 0;
      for (const d of deltas) { const e = d.get(name).data[i] - mean; ss += e * e; }
      out[i] = mean - z * Math.sqrt(ss / (k - 1));
    }
    return [name, {shape: t.shape, data: out}];
  }));
}

// Each tensor turned to cosine `cosine` with itself, its norm kept (float64, then float32; a tensor that cannot
// turn, zero or of one element, as it is): coordinator/sim/faults.py `turned`, with other random directions.
export function turned(tensors, cosine, draw) {
  const sine = Math.sqrt(Math.max(0, 1 - cosine * cosine));
  return new Map([...tensors].map(([name, t]) => {
    const d = t.data, noise = Float64Array.from(d, () => draw());
    let dd = 0, nd = 0;
    for (let i = 0; i < d.length; i++) { dd += d[i] * d[i]; nd += noise[i] * d[i]; }
    if (dd > 0) for (let i = 0; i < d.length; i++) noise[i] -= nd / dd * d[i];
    let nn = 0;
    for (const x of noise) nn += x * x;
    nn = Math.sqrt(nn);
    if (dd === 0 || nn <= 1e-12 * Math.sqrt(dd)) return [name, {shape: t.shape, data: Float32Array.from(d)}];
    const k = sine * Math.sqrt(dd) / nn;
    return [name, {shape: t.shape, data: Float32Array.from(d, (x, i) => cosine * x + k * noise[i])}];
  }));
}

// Whether two deltas have the same tensors (names and sizes): the same model's units.
const sameTensors = (a, b) => a.size === b.size && [...b].every(([n, t]) => a.has(n) && a.get(n).data.length === t.data.length);

// A liar of one kind: `liar.rewrite(tensors)` takes a Map name -> {shape, data: Float32Array} (what
// contract.js decodeDelta gives) and returns the Map the liar sends instead (new arrays; the input is
// left as it is). A replay liar remembers its first delta, an a_little liar its newest honest ones; a
// noise liar draws on from its seed. A label_flip liar sends what it computed (its lie is in the data).
export function makeLiar(kind, seed = 1) {
  if (!LIES.includes(kind)) throw new Error(`lie '${kind}': expected one of ${LIES.join(', ')}`);
  const draw = normals(seed);
  let first = null;
  const pool = [];   // a_little: the newest honest deltas of the same tensors
  const copy = (tensors, f) => new Map([...tensors].map(([name, t]) => [name, {shape: t.shape, data: Float32Array.from(t.data, f)}]));
  return {
    kind,
    rewrite(tensors) {
      if (kind === 'sign_flip') return copy(tensors, (x) => -LIE_FACTOR * x);
      if (kind === 'scale') return copy(tensors, (x) => LIE_FACTOR * x);
      if (kind === 'free_ride') return copy(tensors, () => 0);
      if (kind === 'label_flip') return copy(tensors, (x) => x);
      if (kind === 'band') return turned(tensors, BAND_COSINE, draw);
      if (kind === 'a_little') {
        if (pool.length && !sameTensors(pool[0], tensors)) pool.length = 0;   // another model's unit: start again
        pool.push(copy(tensors, (x) => x));
        if (pool.length > A_LITTLE_WINDOW) pool.shift();
        return pool.length < 2 ? copy(tensors, (x) => x) : aLittle(pool, A_LITTLE_Z);
      }
      if (kind === 'noise') {
        let sum = 0, size = 0;
        for (const t of tensors.values()) { for (const x of t.data) sum += x * x; size += t.data.length; }
        const rms = Math.sqrt(sum / Math.max(size, 1));
        return copy(tensors, () => LIE_FACTOR * rms * draw());
      }
      // replay: the first delta, for every unit of the same model (same tensors); another model's unit honest
      if (first === null) { first = copy(tensors, (x) => x); return copy(tensors, (x) => x); }
      return sameTensors(first, tensors) ? copy(first, (x) => x) : copy(tensors, (x) => x);
    },
  };
}
