// Headless Debian Chromium for the browser tests and benchmarks, driven by playwright-core
// (never `npx playwright install`: it downloads a browser build, which fails on these machines).
import { chromium } from 'playwright-core';

// Flags that work as root on these machines, with a fresh user-data dir per run.
export const FLAGS = ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                      '--disable-background-networking', '--disable-component-update', '--disable-sync'];

// A persistent browser context on `profile` (a user-data dir); `webgpu` adds
// --enable-unsafe-webgpu (an adapter on SwiftShader here).
export function launch(profile, {webgpu = false} = {}) {
  const args = webgpu ? [...FLAGS, '--enable-unsafe-webgpu'] : FLAGS;
  return chromium.launchPersistentContext(profile, {executablePath: '/usr/bin/chromium', headless: true, args});
}
