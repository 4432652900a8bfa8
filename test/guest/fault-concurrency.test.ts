/**
 * 64 concurrent adds of block-cow on one base (XBH_FAULT_CONCURRENCY; 16 in `npm test`), mixed with Debian's stock `block` (xen-utils-common,
 * unmodified, through Debian's xenstore-* tools) adding file: disks on other files at the same
 * time, all under the real Xen lock /var/run/xen-hotplug/block; then all the removes at once, the
 * stock ones among them. Real kernel: loop devices, dm-snapshot.
 *
 * Every block-cow run is a process of its own running the bundle, as Xen runs a hook: the guest is
 * given the memory for them (guestMemoryMb, scripts/vm/run-guest-tests.mjs).
 *
 * Must hold: every run exits 0; every physical-device is distinct (no loop or dm device handed out
 * twice); one base loop, shared by all 64 (the base's reference count), and none after the removes;
 * each stock disk's loop backs its own file; nothing left; the base unchanged.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { census, reportRow } from '../lib/fault-lib.js';
import { projectRoot } from '../lib/project-root.js';
import { stockPrerequisites } from '../lib/stock-scripts.js';
import type { DiskNodes } from '../lib/backend-nodes.js';
import {
  HOOK,
  backendPath,
  base,
  baseSum,
  closeBackend,
  destroyNodes,
  disk,
  env,
  images,
  loopsOnBase,
  sha256File,
  sh,
  stateDir,
  storeDir,
  writeBackendNodes,
  xs,
} from './cow-lib.js';

/** 64 by default and in `npm run reliability`; `npm test` runs 16 (XBH_FAULT_CONCURRENCY, set by test/lib/guest-fold.ts). */
const N_COW = 8 * Math.max(1, Math.round(Number(process.env.XBH_FAULT_CONCURRENCY ?? 64) / 8));
const N_STOCK = N_COW / 8;
const XEN_LOCK_DIR = '/var/run/xen-hotplug';

/** The project's unpacked copy of Debian's stock scripts (test/lib/stock-scripts.ts; the host fetches it before the boot). */
const stockBlock = (): string => join(projectRoot(), '.cache', 'stock', 'root', 'etc', 'xen', 'scripts', 'block');

interface Run {
  code: number | null;
  text: string;
}

function child(file: string, action: string, be: string, e: NodeJS.ProcessEnv, viaNode: boolean): Promise<Run> {
  return new Promise((resolve, reject) => {
    const full = {
      ...e,
      XENBUS_PATH: be,
      XENBUS_TYPE: 'vbd',
      XENBUS_BASE_PATH: 'backend',
      script: '/etc/xen/scripts/block',
    };
    const c = viaNode
      ? spawn(process.execPath, [file, action], { env: full, stdio: ['ignore', 'pipe', 'pipe'] })
      : spawn(file, [action], { env: full, stdio: ['ignore', 'pipe', 'pipe'] });
    let text = '';
    c.stdout.setEncoding('utf8').on('data', (s: string) => (text += s));
    c.stderr.setEncoding('utf8').on('data', (s: string) => (text += s));
    c.on('error', reject);
    c.on('close', (code) => resolve({ code, text }));
  });
}

test(`${N_COW} concurrent block-cow adds on one base mixed with ${N_STOCK} stock block adds, then all removes at once`, async () => {
  const stock = stockBlock();
  assert.ok(existsSync(stock), `${stock} exists (the host fetches Debian's xen-utils-common before booting the guest)`);
  assert.deepEqual(await stockPrerequisites(), [], 'the stock script can run here');
  mkdirSync(XEN_LOCK_DIR, { recursive: true });
  const ours: NodeJS.ProcessEnv = {
    ...env,
    XEN_BLOCKHOOKS_XEN_LOCK_DIR: XEN_LOCK_DIR,
    XEN_BLOCKHOOKS_LOCK_TIMEOUT_MS: '900000',
  };
  const stockEnv: NodeJS.ProcessEnv = {
    PATH: '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin',
    XENSTORED_PATH: env.XENSTORED_PATH,
  };

  const cows: DiskNodes[] = Array.from({ length: N_COW }, (_, i) => disk(200 + i, { params: `${base} 4` }));
  const files = Array.from({ length: N_STOCK }, (_, i) => join(images, `stock-${i}.img`));
  for (const f of files) {
    writeFileSync(f, '');
    truncateSync(f, 4 * 1024 * 1024);
  }
  const stocks: DiskNodes[] = files.map((f, i) =>
    disk(300 + i, { params: f, script: '/etc/xen/scripts/block', domainName: `stock${i}` }),
  );
  for (const d of [...cows, ...stocks]) await writeBackendNodes(xs, d);

  const run = (d: DiskNodes, i: number, action: 'add' | 'remove'): Promise<Run> => {
    const be = backendPath(d);
    if (d.domid >= 300) return child(stock, action, be, stockEnv, false);
    return child(HOOK, action, be, ours, true);
  };
  // Interleave: a stock run after every eighth block-cow run, so they start among each other.
  const order: DiskNodes[] = [];
  cows.forEach((d, i) => {
    order.push(d);
    if (i % 8 === 7) order.push(stocks[i >> 3] as DiskNodes);
  });
  const t0 = Date.now();
  let done = 0;
  const progress =
    (what: string) =>
    (r: Run): Run => {
      done += 1;
      if (done % 16 === 0 || r.code !== 0)
        process.stdout.write(
          `# ${what}: ${done}/${order.length} done after ${Date.now() - t0} ms${r.code !== 0 ? ` (one exited ${r.code})` : ''}\n`,
        );
      return r;
    };
  let passed = false;
  try {
    await mixedRuns(order, run, progress, t0, stocks, files);
    passed = true;
  } finally {
    // After a failure, take everything away (a no-op for disks already removed).
    if (!passed) for (const d of order) await closeBackend(xs, d).catch(() => {});
    if (!passed) await Promise.all(order.map((d) => run(d, d.domid - 200, 'remove').catch(() => undefined)));
    if (!passed) for (const d of order) await destroyNodes(xs, d).catch(() => {});
  }
});

async function why(d: DiskNodes, r: Run): Promise<string> {
  const be = backendPath(d);
  return `${be}: exit ${r.code}; hotplug-error: ${(await xs.tryRead(`${be}/hotplug-error`)) ?? '(none)'}; output: ${r.text.trim().slice(-600)}`;
}

async function mixedRuns(
  order: DiskNodes[],
  run: (d: DiskNodes, i: number, a: 'add' | 'remove') => Promise<Run>,
  progress: (what: string) => (r: Run) => Run,
  t0: number,
  stocks: DiskNodes[],
  files: string[],
): Promise<void> {
  const adds = await Promise.all(order.map((d) => run(d, d.domid - 200, 'add').then(progress('adds'))));
  const addMs = Date.now() - t0;
  const failedAdds = await Promise.all(
    adds.map(async (r, i) => (r.code === 0 ? '' : await why(order[i] as DiskNodes, r))),
  );
  assert.deepEqual(failedAdds.filter(Boolean), [], 'every add exits 0');

  const pds: string[] = [];
  for (const d of order) {
    const be = backendPath(d);
    assert.equal(await xs.read(`${be}/hotplug-status`), 'connected', `${be} connected`);
    pds.push(await xs.read(`${be}/physical-device`));
  }
  assert.equal(new Set(pds).size, pds.length, `${pds.length} distinct physical-devices: no device handed out twice`);
  assert.equal(loopsOnBase().length, 1, `one base loop shared by all ${N_COW}: ${sh('losetup', ['-a'])}`);
  for (const [i, d] of stocks.entries()) {
    const node = await xs.read(`${backendPath(d)}/node`);
    const back = readFileSync(`/sys/block/${node.replace('/dev/', '')}/loop/backing_file`, 'utf8').trim();
    assert.equal(back, files[i], `stock disk ${i}'s loop ${node} backs its own file`);
  }

  for (const d of order) await closeBackend(xs, d);
  const t1 = Date.now();
  const removes = await Promise.all(order.map((d) => run(d, d.domid - 200, 'remove')));
  const removeMs = Date.now() - t1;
  const failedRemoves = await Promise.all(
    removes.map(async (r, i) => (r.code === 0 ? '' : await why(order[i] as DiskNodes, r))),
  );
  assert.deepEqual(failedRemoves.filter(Boolean), [], 'every remove exits 0');
  for (const d of order) await destroyNodes(xs, d);
  assert.deepEqual(loopsOnBase(), [], 'the base loop went with the last disk');
  assert.deepEqual(census({ storeDir, stateDir, xenLockDir: XEN_LOCK_DIR }), [], 'nothing left');
  assert.equal(sha256File(base), baseSum, 'the base is unchanged');
  process.stdout.write(`# ${order.length} concurrent adds took ${addMs} ms, the removes ${removeMs} ms\n`);
  reportRow({
    hook: 'block-cow',
    fault: `${N_COW} concurrent add/remove on one base, each a hook process as Xen runs it, mixed with ${N_STOCK} stock block runs`,
    checked:
      'every run exits 0, distinct physical-devices, one shared base loop then none, stock loops on their own files, nothing left, base unchanged',
    result: 'pass',
  });
}
