// Drives the donate page in Debian's headless Chromium (playwright-core; never
// `npx playwright install`). Used by tests/test_browser.py and bench/browser_step.py.
//
//   node worker_web/drive.mjs URL [options]      prints one JSON line with what happened
//     --units N          wait until the page reports N accepted units (default 1)
//     --timeout S        give up after S seconds (default 240)
//     --click            press the Start button (otherwise the URL should say ?autostart=1)
//     --close-at-step K  close the tab once a unit reaches step K (prints that unit's id)
//     --until KEY        stop waiting as soon as window.crowdtrainState[KEY] is truthy (a tab expected to stop
//                        by itself, e.g. needsToken: its state is then read at once, not at the timeout)
//     --profile DIR      user-data dir to use and keep (a repeat visit reuses it); default: a fresh one
//     --webgpu           launch with --enable-unsafe-webgpu (SwiftShader here)
//     --hold S           after reaching the goal keep the tab working S more seconds (throttle bench)
//     --corrupt-once S   answer the first request whose URL contains S with flipped bytes (a unit
//                        that must fail, be reported, and not stop the tab)
//     --lie KIND         a lying donor: every result the tab sends leaves the browser with its delta
//                        rewritten on the wire (worker_web/lies.mjs: sign_flip x -10, scale x 10, noise 10x
//                        the honest RMS, free_ride zeros, replay the first unit's delta, a_little mean - z std
//                        of its newest honest deltas; the lies of coordinator/sim/faults.py), with
//                        worker_web/contract.js; the page itself is unchanged. label_flip instead serves the
//                        page a worker.js that moves its training shards' labels to the next class, so the tab
//                        trains on wrong labels and sends what it computed (a donor who edits the page's code)
//
// Output: {ok, state (window.crowdtrainState), seconds_to_first_unit, seconds, bytes: {total, by_type, by_blob},
//          bytes_at_first_unit, bytes_at_first_result (up to the first result answered 200, that request
//          included), requests, closed_unit?, console: [...], error?}; bytes are on the wire
//          (compressed), by_type per static file and per API endpoint, by_blob per blob id
import { launch } from './chromium.mjs';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const args = process.argv.slice(2);
const url = args.shift();
const opt = {units: 1, timeout: 240, click: false, closeAt: 0, profile: null, webgpu: false, hold: 0, corrupt: null,
             lie: null, until: null};
while (args.length) {
  const a = args.shift();
  if (a === '--units') opt.units = +args.shift();
  else if (a === '--timeout') opt.timeout = +args.shift();
  else if (a === '--click') opt.click = true;
  else if (a === '--close-at-step') opt.closeAt = +args.shift();
  else if (a === '--until') opt.until = args.shift();
  else if (a === '--profile') opt.profile = args.shift();
  else if (a === '--webgpu') opt.webgpu = true;
  else if (a === '--hold') opt.hold = +args.shift();
  else if (a === '--corrupt-once') opt.corrupt = args.shift();
  else if (a === '--lie') opt.lie = args.shift();
  else { console.error(`drive.mjs: unknown option ${a}`); process.exit(2); }
}

const profile = opt.profile ?? mkdtempSync(join(tmpdir(), 'crowdtrain-chromium-'));
const out = {ok: false, console: [], requests: 0, bytes: {total: 0, by_type: {}, by_blob: {}}};
const t0 = Date.now();
let ctx;
try {
  ctx = await launch(profile, {webgpu: opt.webgpu});
  if (opt.corrupt) {
    let done = false;
    await ctx.route(u => !done && u.href.includes(opt.corrupt), async route => {
      done = true;
      const resp = await route.fetch();
      const body = Buffer.from(await resp.body());
      for (let i = 0; i < body.length; i += 97) body[i] ^= 0xff;
      out.corrupted = route.request().url();
      await route.fulfill({response: resp, body, headers: {...resp.headers(), 'cache-control': 'no-store'}});
    });
  }
  if (opt.lie) {
    const {LIES, makeLiar, flipLabelsSource} = await import('./lies.mjs');
    if (!LIES.includes(opt.lie)) { console.error(`drive.mjs: --lie ${opt.lie}: expected one of ${LIES.join(', ')}`); process.exit(2); }
    const C = await import('./contract.js');
    const liar = makeLiar(opt.lie);
    if (opt.lie === 'label_flip') {
      try {   // the page's worker.js is this file: fail now, not in the tab, if it has no place to change
        flipLabelsSource(readFileSync(new URL('./worker.js', import.meta.url), 'utf8'));
      } catch (e) { console.error(`drive.mjs: --lie label_flip: ${e.message}`); process.exit(2); }
      await ctx.route(u => /^\/static\/[^/]+\/worker\.js$/.test(u.pathname), async route => {
        const resp = await route.fetch();
        const body = flipLabelsSource(await resp.text());
        out.flipped_source = (out.flipped_source ?? 0) + 1;
        const headers = Object.fromEntries(Object.entries(resp.headers())
          .filter(([k]) => !['content-encoding', 'content-length'].includes(k.toLowerCase())));
        await route.fulfill({status: resp.status(), body, headers: {...headers, 'cache-control': 'no-store'}});
      });
    }
    if (opt.lie !== 'label_flip') await ctx.route(u => /\/api\/v1\/units\/[^/]+\/result$/.test(u.pathname), async route => {
      try {
        const {meta, delta} = C.unpackResult(new Uint8Array(route.request().postDataBuffer()));
        if (meta.error === null && delta.length) {
          const length = new DataView(delta.buffer, delta.byteOffset).getUint32(4, true);
          const codec = JSON.parse(new TextDecoder().decode(delta.subarray(8, 8 + length))).codec;
          const tensors = liar.rewrite(C.decodeDelta(delta));
          out.lies = (out.lies ?? 0) + 1;
          return await route.continue({postData: Buffer.from(C.packResult(meta, C.encodeDelta(codec, tensors)))});
        }
      } catch (e) { out.console.push(`drive.mjs --lie: ${e.message}`.slice(0, 500)); }
      return await route.continue();
    });
  }
  const page = ctx.pages()[0] ?? await ctx.newPage();
  page.on('console', m => { if (out.console.length < 200) out.console.push(`${m.type()}: ${m.text()}`.slice(0, 500)); });
  page.on('pageerror', e => out.console.push(`pageerror: ${e.message}`.slice(0, 500)));
  page.on('requestfinished', async req => {
    try {
      const sizes = await req.sizes();   // responseBodySize: bytes on the wire (compressed); 0 when cached
      const resp = await req.response();
      const path = new URL(req.url()).pathname;
      // static assets by file (the version prefix dropped); API calls by endpoint
      const kind = path.startsWith('/static/') ? path.replace(/^\/static\/[0-9a-f]+\//, '/static/')
        : path.split('/').slice(0, 4).join('/').replace(/\/[0-9a-f]{16,}.*$/, '/<id>');
      const n = sizes.responseBodySize + sizes.responseHeadersSize;
      out.requests++;
      out.bytes.total += n;
      out.bytes.by_type[kind] = (out.bytes.by_type[kind] ?? 0) + n;
      if (path.startsWith('/api/v1/blobs/')) {   // and per blob id (a model version, a shard, a graph)
        const id = path.split('/')[4];
        out.bytes.by_blob[id] = (out.bytes.by_blob[id] ?? 0) + n;
      }
      if (!out.bytes_at_first_result && req.method() === 'POST' && path.endsWith('/result') && resp
          && resp.status() === 200) {
        out.bytes_at_first_result = JSON.parse(JSON.stringify(out.bytes));   // up to the first result's answer
      }
      if (resp && resp.status() >= 400) out.console.push(`http ${resp.status()} ${req.url()}`);
    } catch { /* the page is closing */ }
  });
  const tOpen = Date.now();
  await page.goto(url);
  if (opt.click) await page.click('#toggle');
  const deadline = Date.now() + opt.timeout * 1000;
  const state = () => page.evaluate(() => window.crowdtrainState);
  let s = await state(), first = null;
  for (;;) {
    s = await state();
    if (first === null && s.unitsDone > (out.startUnits ??= s.unitsDone)) {
      first = (Date.now() - tOpen) / 1000;
      out.bytes_at_first_unit = JSON.parse(JSON.stringify(out.bytes));   // before the next unit's downloads
    }
    if (opt.closeAt && s.step >= opt.closeAt && s.unitId && String(s.status).includes('step')) {
      out.closed_unit = s.unitId;
      out.closed_at_step = s.step;
      await page.close();
      break;
    }
    if (!opt.closeAt && s.unitsDone - out.startUnits >= opt.units) break;
    if (opt.until && s[opt.until]) { out.until = opt.until; break; }
    if (Date.now() > deadline) { out.error = `timed out after ${opt.timeout} s: ${s.status}`; break; }
    await page.waitForTimeout(100);
  }
  // The page counts a unit done on its result's answer, which may come before Playwright reports that request
  // finished (its sizes are asked for asynchronously): wait up to 5 s for that report (bench/first_unit.py
  // failed 2 runs in 10 with no bytes_at_first_result on 2026-12-05).
  for (const until = Date.now() + 5000; !out.error && !opt.closeAt && s.unitsDone > out.startUnits
       && !out.bytes_at_first_result && Date.now() < until;) await page.waitForTimeout(50);
  if (!out.error && opt.hold > 0) {
    const before = await state();
    await page.waitForTimeout(opt.hold * 1000);
    out.held = {seconds: opt.hold, units_before: before.unitsDone, state: await state()};
    s = out.held.state;
  }
  out.state = s;
  out.seconds_to_first_unit = first;
  out.ok = !out.error;
} catch (e) {
  out.error = String(e?.stack ?? e).slice(0, 2000);
} finally {
  out.seconds = (Date.now() - t0) / 1000;
  if (ctx) await ctx.close().catch(() => {});
  if (!opt.profile) rmSync(profile, {recursive: true, force: true});
}
console.log(JSON.stringify(out));
process.exit(out.ok ? 0 : 1);
