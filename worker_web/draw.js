// What a browser unit draws from its seed: the batches, the crops and mirrors, the dropout masks.
//
// A small seeded generator (mulberry32): the same unit seed gives the same draws in every tab,
// and models/browser_unit.py draws the same in Python, so the coordinator can recompute a tab's
// unit for a replicated check (coordinator/trust.py). It is not torch's generator: a browser unit
// and a Python unit with the same seed see different (equally random) batches. The order of the
// draws is part of the contract (tests/golden/browser_draw.json): per unit, the batch order
// (`batchIndices`); per step, for each image of the batch a crop row, a crop column and a mirror
// (each only when the unit's hyperparameters ask for it; no mirror is drawn when the unit's flips
// alternate, `imageCoin`), then each dropout mask in the step graph's input order, element by element.

export function mulberry32(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6D2B79F5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export function permutation(n, rng) {
  const p = Array.from({length: n}, (_, i) => i);
  for (let i = n - 1; i > 0; i--) { const j = Math.floor(rng() * (i + 1)); [p[i], p[j]] = [p[j], p[i]]; }
  return p;
}

// `steps` batches drawn without replacement, reshuffling at each pass (models.local.batch_indices).
export function batchIndices(n, steps, batch, rng) {
  if (batch > n) throw new Error(`batch size ${batch} is larger than the unit's ${n} samples`);
  let order = permutation(n, rng), pos = 0;
  const out = [];
  for (let s = 0; s < steps; s++) {
    if (pos + batch > n) {
      const take = order.slice(pos);
      order = permutation(n, rng); pos = batch - take.length;
      out.push(take.concat(order.slice(0, pos)));
    } else {
      out.push(order.slice(pos, pos + batch)); pos += batch;
    }
  }
  return out;
}

// An image's own fair coin from its 3,072 bytes (models.flips.image_coins): the top bit of
// lowbias32(sum over bytes k of byte_k x ((k + 1) x 2654435761 mod 2^32), mod 2^32). A unit whose
// flips alternate (`hyper.flip_parity`) mirrors image i when coin_i xor parity: each image then
// alternates from epoch to epoch whatever unit, shard or slice it comes in.
const COIN_WEIGHTS = Uint32Array.from({length: 3072}, (_, k) => Math.imul(k + 1, 2654435761 | 0) >>> 0);

export function imageCoin(pixels, offset) {
  let h = 0;
  for (let k = 0; k < 3072; k++) h = (h + Math.imul(pixels[offset + k], COIN_WEIGHTS[k])) >>> 0;
  h ^= h >>> 16;
  h = Math.imul(h, 0x7feb352d);
  h ^= h >>> 15;
  h = Math.imul(h, 0x846ca68b);
  h ^= h >>> 16;
  return (h >>> 31) === 1;
}

// One batch of images (uint8 pixels as float32, NCHW 32x32), augmented: a random crop with padding
// `pad` (zeros, or with `reflect` the edges mirrored: row -1 reads row 1, row 32 reads row 30) and a
// mirror when `flip`: drawn, or with `parity` (0 or 1: alternating flips) the image's coin xor parity;
// and its labels.
const reflectIndex = i => (i < 0 ? -i : i > 31 ? 62 - i : i);

export function augmentBatch(data, idx, rng, pad, flip, reflect = false, parity = null) {
  const B = idx.length;
  const x = new Float32Array(B * 3072), y = new Array(B);
  for (let b = 0; b < B; b++) {
    const src = idx[b] * 3072, dst = b * 3072;
    const dy = pad ? Math.floor(rng() * (2 * pad + 1)) - pad : 0;
    const dx = pad ? Math.floor(rng() * (2 * pad + 1)) - pad : 0;
    const mirror = flip && (parity === null ? rng() < 0.5 : imageCoin(data.x, src) !== (parity === 1));
    for (let c = 0; c < 3; c++) {
      for (let i = 0; i < 32; i++) {
        const si = reflect ? reflectIndex(i + dy) : i + dy;
        if (si < 0 || si >= 32) continue;   // zero padding (x starts as zeros)
        const row = src + c * 1024 + si * 32, out = dst + c * 1024 + i * 32;
        for (let j = 0; j < 32; j++) {
          const sj = reflect ? reflectIndex((mirror ? 31 - j : j) + dx) : (mirror ? 31 - j : j) + dx;
          if (sj >= 0 && sj < 32) x[out + j] = data.x[row + sj];
        }
      }
    }
    y[b] = data.y[idx[b]];
  }
  return {x, y};
}

// A dropout keep-mask of n elements: element i is kept (1) when keep(i, p).
export function keepMask(n, p, keep) {
  const m = new Float32Array(n);
  for (let i = 0; i < n; i++) m[i] = keep(i, p) ? 1 : 0;
  return m;
}
