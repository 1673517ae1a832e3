// bench/browser_step.py's driver: headless Debian Chromium (worker_web/chromium.mjs) with one tab of
// bench/browser_step.html per thread count, taking commands as JSON lines on stdin.
//
//   node bench/browser_step.mjs BASE_URL --threads 1,2
//     prints {"ready": {threads: info}} once every tab has loaded onnxruntime-web, then for
//     each stdin line {"id", "threads", "op", ...} the tab's answer {"id", ...} as one line.
import { launch } from '../worker_web/chromium.mjs';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';

const args = process.argv.slice(2);
const base = args.shift();
let threads = [1, 2];
while (args.length) {
  const a = args.shift();
  if (a === '--threads') threads = args.shift().split(',').map(Number);
  else { console.error(`browser_step.mjs: unknown option ${a}`); process.exit(2); }
}
const profile = mkdtempSync(join(tmpdir(), 'crowdtrain-bench-chromium-'));
const say = obj => process.stdout.write(JSON.stringify(obj) + '\n');
let ctx;
try {
  ctx = await launch(profile);
  const pages = new Map(), ready = {};
  for (const t of threads) {
    const page = await ctx.newPage();
    page.on('console', m => console.error(`[tab ${t}] ${m.type()}: ${m.text()}`));
    page.on('pageerror', e => console.error(`[tab ${t}] pageerror: ${e.message}`));
    await page.goto(`${base}/browser_step.html?threads=${t}`);
    await page.waitForFunction(() => window.benchInfo || window.benchError, null, {timeout: 120000});
    const err = await page.evaluate(() => window.benchError);
    if (err) throw new Error(`tab with ${t} threads: ${err}`);
    ready[t] = await page.evaluate(() => window.benchInfo);
    pages.set(t, page);
  }
  say({ready});
  for await (const line of createInterface({input: process.stdin})) {
    if (!line.trim()) continue;
    const msg = JSON.parse(line);
    if (msg.op === 'quit') break;
    const page = pages.get(msg.threads);
    try {
      await page.bringToFront();
      const {threads: _, id, ...call} = msg;
      say({...(await page.evaluate(m => window.call(m), call)), id});
    } catch (e) {
      say({id: msg.id, error: String(e?.stack ?? e).slice(0, 2000)});
    }
  }
} catch (e) {
  say({error: String(e?.stack ?? e).slice(0, 2000)});
} finally {
  if (ctx) await ctx.close().catch(() => {});
  rmSync(profile, {recursive: true, force: true});
}
