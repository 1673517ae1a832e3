import { launch } from '/work/main/worker_web/chromium.mjs';
import http from 'node:http'; import fs from 'node:fs'; import path from 'node:path'; import os from 'node:os';
const [dir, ep, opt, extraS, tag] = process.argv.slice(2); const extra = extraS ? JSON.parse(extraS) : {};
const DIST = '/work/main/worker_web/node_modules/onnxruntime-web/dist';
const srv = http.createServer((req, res) => {
  const u = decodeURIComponent(req.url.split('?')[0]);
  const f = u.startsWith('/ort/') ? path.join(DIST, u.slice(5)) : path.join('/tmp/diag', u);
  if (!fs.existsSync(f)) { res.writeHead(404); return res.end(); }
  const type = f.endsWith('.html') ? 'text/html' : f.endsWith('js') ? 'text/javascript' : f.endsWith('.wasm') ? 'application/wasm' : 'application/octet-stream';
  res.writeHead(200, {'Content-Type': type, 'Cross-Origin-Opener-Policy': 'same-origin', 'Cross-Origin-Embedder-Policy': 'require-corp'});
  fs.createReadStream(f).pipe(res);
}).listen(0, '127.0.0.1');
await new Promise(r => srv.on('listening', r));
const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'diag-'));
const ctx = await launch(profile, {webgpu: true});
const page = await ctx.newPage();
page.on('console', m => console.error('[tab]', m.text()));
await page.goto(`http://127.0.0.1:${srv.address().port}/index.html`);
await page.waitForFunction(() => window.ready, null, {timeout: 60000});
const r = await page.evaluate(([d, e, o, x]) => window.run(d, e, o, x), [dir, ep, opt, extra]);
fs.writeFileSync(`/tmp/diag/${dir}/${ep}${tag ? '-' + tag : ''}.json`, JSON.stringify(r));
await ctx.close(); srv.close(); fs.rmSync(profile, {recursive: true, force: true});
console.log('done', Object.keys(r).length);
