/**
 * worker_web/draw.js against tests/golden/browser_draw.json, which models/browser_unit.py wrote
 * (tests/golden/make_golden.py): the coordinator recomputes a tab's unit with the Python twin to
 * check it, so both must draw the same batches, crops, mirrors and masks from a seed.
 * Run: `node --test worker_web/test/` (tests/test_js_contract.py runs it from pytest).
 */
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { createHash } from "node:crypto";
import { test } from "node:test";

import { augmentBatch, batchIndices, imageCoin, keepMask, mulberry32, permutation } from "../draw.js";

const G = JSON.parse(readFileSync(new URL("../../tests/golden/browser_draw.json", import.meta.url), "utf8"));
const sha256 = (bytes) => createHash("sha256").update(bytes).digest("hex");

/** draw_images() of make_golden.py: pixel k of the flat uint8 array is k * 7 % 251. */
function images() {
  const n = G.images.shape.reduce((a, b) => a * b, 1);
  const x = new Uint8Array(n);
  for (let k = 0; k < n; k++) x[k] = (k * 7) % 251;
  assert.equal(sha256(x), G.images.x_sha256);
  return {x, y: Uint8Array.from(G.images.y), n: G.images.shape[0]};
}

test("mulberry32 gives the golden values", () => {
  for (const c of G.mulberry32) {
    const rng = mulberry32(c.seed);
    assert.deepEqual(c.values.map(() => rng()), c.values, `seed ${c.seed}`);
  }
});

test("permutation and batchIndices draw the golden orders", () => {
  for (const c of G.permutation) assert.deepEqual(permutation(c.n, mulberry32(c.seed)), c.order, `n ${c.n}`);
  for (const c of G.batch_indices) {
    assert.deepEqual(batchIndices(c.n, c.steps, c.batch, mulberry32(c.seed)), c.batches, JSON.stringify(c));
  }
});

test("augmentBatch crops and mirrors as the golden batches, and draws no more than they did", () => {
  const data = images();
  for (const c of G.augment_batch) {
    const rng = mulberry32(c.seed);
    const {x, y} = augmentBatch(data, c.idx, rng, c.pad, c.flip, c.reflect ?? false, c.parity ?? null);
    const bytes = new Uint8Array(x.buffer, x.byteOffset, x.byteLength);   // little-endian float32
    assert.equal(sha256(bytes), c.x_sha256, JSON.stringify({pad: c.pad, flip: c.flip, reflect: c.reflect,
                                                            parity: c.parity}));
    assert.deepEqual(Array.from(y), c.y);
    assert.equal(rng(), c.next);
  }
});

test("imageCoin gives each golden image its coin, and the coins are not all alike", () => {
  const [n, , ,] = G.image_coins.shape;
  const x = new Uint8Array(n * 3072);
  for (let i = 0; i < n; i++) for (let k = 0; k < 3072; k++) x[i * 3072 + k] = (k * 7 + i * 13) % 251;
  const coins = Array.from({length: n}, (_, i) => (imageCoin(x, i * 3072) ? 1 : 0));
  assert.deepEqual(coins, G.image_coins.coins);
  assert.ok(coins.includes(0) && coins.includes(1));
});

test("keepMask keeps the golden elements", () => {
  for (const c of G.keep_mask) {
    const rng = mulberry32(c.seed);
    assert.deepEqual(Array.from(keepMask(c.n, c.p, (i, p) => rng() >= p)), c.mask, JSON.stringify(c));
  }
});
