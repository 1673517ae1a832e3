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
//
// label_flip and a_little are not wire rewrites (they need other training data or other workers' deltas).
export const LIES = ['sign_flip', 'scale', 'noise', 'free_ride', 'replay'];
export const LIE_FACTOR = 10;

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

// A liar of one kind: `liar.rewrite(tensors)` takes a Map name -> {shape, data: Float32Array} (what
// contract.js decodeDelta gives) and returns the Map the liar sends instead (new arrays; the input is
// left as it is). A replay liar remembers its first delta; a noise liar draws on from its seed.
export function makeLiar(kind, seed = 1) {
  if (!LIES.includes(kind)) throw new Error(`lie '${kind}': expected one of ${LIES.join(', ')}`);
  const draw = normals(seed);
  let first = null;
  const copy = (tensors, f) => new Map([...tensors].map(([name, t]) => [name, {shape: t.shape, data: Float32Array.from(t.data, f)}]));
  return {
    kind,
    rewrite(tensors) {
      if (kind === 'sign_flip') return copy(tensors, (x) => -LIE_FACTOR * x);
      if (kind === 'scale') return copy(tensors, (x) => LIE_FACTOR * x);
      if (kind === 'free_ride') return copy(tensors, () => 0);
      if (kind === 'noise') {
        let sum = 0, size = 0;
        for (const t of tensors.values()) { for (const x of t.data) sum += x * x; size += t.data.length; }
        const rms = Math.sqrt(sum / Math.max(size, 1));
        return copy(tensors, () => LIE_FACTOR * rms * draw());
      }
      // replay: the first delta, for every unit of the same model (same tensors); another model's unit honest
      if (first === null) { first = copy(tensors, (x) => x); return copy(tensors, (x) => x); }
      const same = first.size === tensors.size && [...tensors].every(([n, t]) => first.has(n) && first.get(n).data.length === t.data.length);
      return same ? copy(first, (x) => x) : copy(tensors, (x) => x);
    },
  };
}
