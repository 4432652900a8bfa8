/**
 * Growth before overflow on a real kernel: a block-cow disk (dist/block-cow.mjs, built with an
 * 8 MiB transient store) is written 3× its store by a separate writer process while watchOnce
 * runs in a loop: no write fails and the data reads back. The same writes without the watcher
 * overflow the store: the writer gets errors, the kernel marks the snapshot Invalid, the status
 * parser says so, and watchOnce reports it as a problem (and logs it at error level).
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import { closeSync, openSync, readSync, statSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { loadConfig, type Config } from '../../src/config/config.js';
import { execRunner } from '../../src/devices/exec.js';
import { parseSnapshotStatus, parseStatus } from '../../src/devices/dmsetup.js';
import { memoryLogger } from '../../src/log/logger.js';
import { watchOnce, type WatchReport } from '../../src/grow/index.js';
import { backendPath, type DiskNodes } from '../lib/backend-nodes.js';
import { MiB } from '../lib/disk-io.js';
import { hookWorld } from '../lib/hook-world.js';

const world = hookWorld({
  name: 'watch',
  bundle: 'block-cow',
  env: {
    // Growth must outpace the writer: the first growth happens at 2 MiB of 8, leaving 6 MiB (9 s of
    // writing at the pace below) for one watch pass, which takes seconds under TCG on a loaded host.
    XEN_BLOCKHOOKS_WATCH_THRESHOLD: '25',
    XEN_BLOCKHOOKS_WATCH_STEP: '200',
  },
});
const { images, storeDir, env, addOk, removeOk } = world;
const base = join(images, 'base.img');
const STORE_MIB = 8;
const WRITE_MIB = 3 * STORE_MIB;

function disk(domid: number, name: string): DiskNodes {
  return { domid, devid: 51712, params: `${base} ${STORE_MIB}M`, mode: 'w', vdev: 'xvda', domainName: name };
}

/** A separate process writes `mib` MiB (fill byte = MiB index + 1), fsync after each, pausing `pauseMs`; it prints the errors it met. */
const WRITER = `
const fs = require('node:fs');
const [dev, mib, pauseMs] = [process.argv[1], Number(process.argv[2]), Number(process.argv[3])];
let errors = 0;
const fd = fs.openSync(dev, 'r+');
for (let i = 0; i < mib; i++) {
  try {
    fs.writeSync(fd, Buffer.alloc(1048576, (i % 250) + 1), 0, 1048576, i * 1048576);
    fs.fsyncSync(fd);
  } catch (e) {
    errors++;
    console.error('write ' + i + ': ' + e.code);
  }
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, pauseMs);
}
try { fs.closeSync(fd); } catch (e) { errors++; console.error('close: ' + e.code); }
console.log(JSON.stringify({ errors }));
`;

function startWriter(
  dev: string,
  mib: number,
  pauseMs: number,
): Promise<{ errors: number; stderr: string; code: number | null }> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, ['-e', WRITER, dev, String(mib), String(pauseMs)], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let out = '';
    let err = '';
    child.stdout.setEncoding('utf8').on('data', (s: string) => (out += s));
    child.stderr.setEncoding('utf8').on('data', (s: string) => (err += s));
    child.on('error', reject);
    child.on('close', (code) => {
      const m = /\{"errors":(\d+)\}/.exec(out);
      resolve({ errors: m ? Number(m[1]) : -1, stderr: err, code });
    });
  });
}

function snapStatus(name: string) {
  const l = parseStatus(execFileSync('dmsetup', ['status', name], { encoding: 'utf8' }))[0];
  assert.ok(l);
  return parseSnapshotStatus(l.params);
}

function readMiBFill(dev: string, i: number): number {
  const fd = openSync(dev, 'r');
  try {
    const b = Buffer.alloc(4096);
    readSync(fd, b, 0, 4096, i * MiB + 8192);
    return b[0] === b[4095] ? (b[0] as number) : -1;
  } finally {
    closeSync(fd);
  }
}

before(async () => {
  await world.start();
  writeFileSync(base, '');
  truncateSync(base, 32 * MiB);
});

after(() => world.stop({ dmPrefixes: ['xbh-cow-'] }));

test('with watchOnce in a loop, a domain writes 3× its copy-on-write allotment with zero I/O errors', async (t) => {
  const d = disk(1, 'watched');
  const { path: dev } = await addOk(d);
  const config: Config = loadConfig(env);
  assert.equal(config.watch.thresholdPercent, 25);
  const run = execRunner(env);
  const log = memoryLogger();
  const writer = startWriter(dev, WRITE_MIB, 1500);
  let done = false;
  const passes: WatchReport[] = [];
  void writer.then(() => (done = true));
  try {
    while (!done) {
      passes.push(await watchOnce(config, run, log));
      await sleep(100);
    }
  } finally {
    await writer;
  }
  const w = await writer;
  t.after(() => removeOk(d));
  assert.equal(w.code, 0, w.stderr);
  assert.equal(
    w.errors,
    0,
    `writer errors: ${w.stderr}\nwatch log:\n${log.lines.map((l) => `${l.level} ${l.msg}`).join('\n')}`,
  );
  const grown = passes.flatMap((p) => p.grown);
  assert.ok(grown.length >= 2, `grown ${grown.length} times`);
  assert.ok(
    passes.every((p) => p.problems.length === 0),
    JSON.stringify(passes.flatMap((p) => p.problems)),
  );
  const s = snapStatus('xbh-cow-watched-xvda-51712');
  assert.equal(s.state, 'active');
  const store = statSync(join(storeDir, 'transient-1-51712.cow')).size;
  assert.ok(store >= WRITE_MIB * MiB, `store grew to ${store}`);
  assert.ok(
    log.lines.some((l) => l.level === 'info' && /grow backend\/vbd\/1\/51712 .*store .* → .*re-read/.test(l.msg)),
    'every growth logged',
  );
  for (const i of [0, 7, 15, WRITE_MIB - 1]) assert.equal(readMiBFill(dev, i), (i % 250) + 1, `MiB ${i} reads back`);
});

test('without the watcher the store overflows: the writer gets errors, the snapshot is Invalid, status and watchOnce say so', async (t) => {
  const d = disk(2, 'unwatched');
  const { path: dev } = await addOk(d);
  t.after(() => removeOk(d));
  const w = await startWriter(dev, WRITE_MIB, 0);
  assert.ok(w.errors > 0, `the writer must see errors: ${w.stderr}`);
  assert.match(w.stderr, /EIO/);
  const s = snapStatus('xbh-cow-unwatched-xvda-51712');
  assert.equal(s.state, 'invalid');
  const log = memoryLogger();
  const report = await watchOnce(loadConfig(env), execRunner(env), log);
  assert.equal(report.grown.length, 0, 'an Invalid snapshot is not grown');
  const mine = report.problems.filter((p) => p.backendPath === backendPath(d));
  assert.equal(mine.length, 1, JSON.stringify(report.problems));
  assert.equal(mine[0]?.state, 'invalid');
  assert.match(mine[0]?.message ?? '', /xbh-cow-unwatched-xvda-51712 .* is Invalid/);
  assert.ok(
    log.lines.some((l) => l.level === 'error' && /unwatched.*Invalid/.test(l.msg)),
    'logged at error level',
  );
});
