// Error feedback for lossy upload codecs, the browser's side (Python: worker_py/feedback.py, the
// same arithmetic and the same bytes; tests/test_js_contract.py checks that they agree).
//
// A tab that uploads its delta d with a lossy codec C (fp16, int8, topk) keeps what the codec
// dropped and adds it to its next delta: it sends C(d + r) and keeps r = (d + r) - decode(C(d + r)),
// all in float32. One residual per tensor, in memory only (a reload starts from zero), reset when
// the job or the tensors' names and shapes change, and kept only once the coordinator accepted the
// result that carried it (`commit`); a failed, handed-back, refused or superseded unit leaves the
// previous one (`discard`). Used only for units that say so (`unit.error_feedback`, which the
// coordinator sets only for a worker that asked and only without replicated checks: a replica must
// get the same delta from the unit alone), never for fp32 (nothing is lost).

import { ContractError, decodeDelta, encodeDelta, parseCodec } from './contract.js';

/** Whether a codec (a `parseCodec` result) sends every value exactly: nothing for error feedback to carry. */
export const lossless = (codec) => codec.id === 'fp32';

function floats(name, value) {
  const data = value?.data ?? value;
  if (data instanceof Float32Array) return data;
  if (data instanceof Float64Array || Array.isArray(data)) return Float32Array.from(data);   // as numpy's astype
  throw new ContractError(`delta[${name}]`, 'a floating-point array', String(data?.constructor?.name ?? typeof data));
}

/**
 * One step of error feedback (Python: `feedback_step`): [C(d + r) as a CTD1 container (Uint8Array),
 * the new residual (d + r) - decode(C(d + r))]. `delta`: Map name -> {shape, data}; `residual`:
 * Map name -> Float32Array (a missing name counts as zeros) or null. For fp32: C(d) and the residual as it was.
 */
export function feedbackStep(codec, delta, residual = null) {
  const c = parseCodec(typeof codec === 'string' ? codec : codec?.name);
  residual ??= new Map();
  if (lossless(c)) return [encodeDelta(c, delta), residual];
  const corrected = new Map();
  for (const [name, value] of delta) {
    const d = floats(name, value);
    const r = residual.get(name);
    const shape = value?.shape ?? [d.length];
    if (r === undefined) {
      corrected.set(name, {shape, data: d});
      continue;
    }
    if (r.length !== d.length) throw new ContractError(`residual[${name}]`, `${d.length} elements (the delta's)`, r.length);
    const x = new Float32Array(d.length);
    for (let i = 0; i < x.length; i++) x[i] = d[i] + r[i];   // rounded to float32 on assignment
    corrected.set(name, {shape, data: x});
  }
  const bytes = encodeDelta(c, corrected);
  const sent = decodeDelta(bytes);
  const next = new Map();
  for (const [name, {data}] of corrected) {
    const s = sent.get(name).data;
    const r = new Float32Array(data.length);
    for (let i = 0; i < r.length; i++) r[i] = data[i] - s[i];
    next.set(name, r);
  }
  return [bytes, next];
}

/** One tab's residual between units (Python: `ErrorFeedback`): `encode`, then `commit` or `discard`. */
export class ErrorFeedback {
  constructor() { this.reset(); }

  reset() { this.job = null; this.residual = new Map(); this.shapes = ''; this.pending = null; this.carried = 0; }

  /** The container to upload for this unit's delta: C(d + r) when `use` and the codec is lossy, else C(d). */
  encode(job, unitId, codec, delta, use = true) {
    const c = parseCodec(typeof codec === 'string' ? codec : codec?.name);
    if (!use || lossless(c)) {
      this.pending = null;
      return encodeDelta(c, delta);
    }
    const shapes = JSON.stringify([...delta].map(([name, v]) => [name, v?.shape ?? [floats(name, v).length]]));
    const current = job === this.job && shapes === this.shapes ? this.residual : null;
    const [bytes, residual] = feedbackStep(c, delta, current);
    this.pending = {job, unitId, residual, shapes, carried: current !== null && current.size > 0};
    return bytes;
  }

  /** The coordinator accepted `unitId`'s result: keep its residual. False if none was pending. */
  commit(unitId) {
    if (this.pending === null || this.pending.unitId !== unitId) return false;
    ({job: this.job, residual: this.residual, shapes: this.shapes} = this.pending);
    if (this.pending.carried) this.carried++;   // accepted uploads that carried an earlier residual
    this.pending = null;
    return true;
  }

  /** `unitId`'s result was not taken: keep the previous residual. */
  discard(unitId) {
    if (this.pending !== null && this.pending.unitId === unitId) this.pending = null;
  }
}
