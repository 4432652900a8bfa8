/**
 * block-rbd on a real kernel (krbd) against a real single-node Ceph cluster started once for the
 * whole file (test/lib/mini-ceph.ts): the bundled hook run the way libxl runs it, an in-process
 * xenstore. Isolation of two domains on one golden snapshot, the golden checksum, read-only
 * disks, persistent clones, the watcher sharing check, a live-migration handover, SIGKILL
 * mid-add then remove, a crash's leftover clone replaced by the next add or deleted by gc, and
 * clear errors for a missing pool, image or snapshot.
 *
 * Real rbd output is printed as `# FIXTURE <name> <base64>` lines (the host-tier parser tests
 * use the captured text).
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, readdirSync, rmSync, utimesSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { connectXenstore } from '../../src/xenstore/client.js';
import { startXenstoreServer, type XenstoreServer } from '../../src/xenstore/server.js';
import type { XenstoreClient } from '../../src/xenstore/types.js';
import {
  closeBackend,
  destroyNodes,
  runHookProcess,
  writeBackendNodes,
  type DiskNodes,
  type HookRun,
} from '../lib/backend-nodes.js';
import { startMiniCeph, type MiniCeph } from '../lib/mini-ceph.js';
import { applyGc, gcPlan } from '../../src/cli/gc.js';
import { takeInventory } from '../../src/cli/inventory.js';
import { loadConfig } from '../../src/config/config.js';
import { execRunner } from '../../src/devices/exec.js';
import { Journal } from '../../src/journal/journal.js';
import { memoryLogger } from '../../src/log/logger.js';
import { block, pread, pwrite } from '../lib/disk-io.js';
import { runWrapper, startServe, writeWrapper } from '../lib/serve-harness.js';

const HOOK = join(process.cwd(), 'dist', 'block-rbd.mjs');
const MiB = 1024 * 1024;
const GOLDEN_MIB = 12;

let ceph: MiniCeph;
let server: XenstoreServer;
let xs: XenstoreClient;
let root: string;
let env: NodeJS.ProcessEnv;
let goldenSum: string;
let golden: string;

/** Set to true to print every fixture again; by default only those missing from FIXTURES are printed. */
const CAPTURE_FIXTURES = false;
const FIXTURES = join(process.cwd(), 'test', 'fixtures', 'rbd-16.2.15');

function fixture(name: string, text: string | (() => string)): void {
  if (!CAPTURE_FIXTURES && existsSync(join(FIXTURES, `${name}.json`))) return;
  if (typeof text === 'function') text = text();
  process.stdout.write(`# FIXTURE ${name} ${Buffer.from(text).toString('base64')}\n`);
}

function rbdTry(args: string[]): { out: string; err: string; code: number } {
  try {
    return { out: ceph.rbd(args), err: '', code: 0 };
  } catch (e) {
    const x = e as { stdout?: string; stderr?: string; status?: number };
    return { out: x.stdout ?? '', err: x.stderr ?? '', code: x.status ?? -1 };
  }
}

/** sha256 of `rbd export SPEC -` (the golden image or its snapshot). */
function exportSum(spec: string): string {
  const out = execFileSync('rbd', ['export', '--no-progress', spec, '-'], {
    env: ceph.env,
    maxBuffer: 64 * MiB,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  return createHash('sha256').update(out).digest('hex');
}

function mappings(): { pool: string; name: string; snap: string; device: string }[] {
  return JSON.parse(ceph.rbd(['showmapped', '--format', 'json'])) as {
    pool: string;
    name: string;
    snap: string;
    device: string;
  }[];
}

function images(): string[] {
  return (JSON.parse(ceph.rbd(['ls', '--format', 'json', ceph.pool])) as string[]).sort();
}

function journalFiles(state: string): string[] {
  const d = join(state, 'journal');
  return existsSync(d) ? readdirSync(d) : [];
}

/** Nothing of ours left: no mapping, only the golden image, no journal record. */
function assertClean(what: string, state = env.XEN_BLOCKHOOKS_STATE_DIR as string): void {
  assert.deepEqual(mappings(), [], `${what}: no rbd mapping`);
  assert.deepEqual(images(), ['golden'], `${what}: no clone left`);
  assert.deepEqual(journalFiles(state), [], `${what}: no journal record`);
}

let nextDevid = 51712;
function disk(domid: number, params: string, extra: Partial<DiskNodes> = {}): DiskNodes {
  nextDevid += 16;
  return {
    domid,
    devid: nextDevid,
    params,
    mode: 'w',
    vdev: 'xvda',
    domainName: `dom${domid}`,
    script: '/etc/xen/scripts/block-rbd',
    ...extra,
  };
}

function p(extra = ''): string {
  return `${ceph.pool}/golden@base conf=${ceph.conf}${extra ? ` ${extra}` : ''}`;
}

/** Every 20 s: what rbd/ceph commands are running (a slow or stuck step shows up in the TAP). */
function watchdog(): NodeJS.Timeout {
  const t0 = Date.now();
  const timer = setInterval(() => {
    let procs = '';
    try {
      procs = execFileSync('ps', ['-eo', 'etimes,args'], { encoding: 'utf8' })
        .split('\n')
        .filter((l) => /\b(rbd|ceph|block-rbd)\b/.test(l) && !/ceph-(mon|osd) -i/.test(l))
        .map((l) => l.trim().replace(/ --client_mount_timeout \d+| --conf \S+/g, ''))
        .join(' | ');
    } catch {
      /* ps missing */
    }
    process.stdout.write(`# t+${Math.round((Date.now() - t0) / 1000)}s running: ${procs || '-'}\n`);
  }, 20_000);
  timer.unref();
  return timer;
}

async function add(
  d: DiskNodes,
  extraEnv: NodeJS.ProcessEnv = {},
): Promise<{ be: string; run: HookRun; device: string | undefined }> {
  const be = await writeBackendNodes(xs, d);
  const run = await runHookProcess(HOOK, 'add', be, { ...env, ...extraEnv });
  process.stdout.write(
    `# add ${d.domainName ?? d.domid} ${d.params.split(' ')[0]}: ${run.code ?? run.signal} in ${run.ms} ms\n`,
  );
  return { be, run, device: await xs.tryRead(`${be}/physical-device-path`) };
}

async function addOk(d: DiskNodes, extraEnv: NodeJS.ProcessEnv = {}): Promise<string> {
  const a = await add(d, extraEnv);
  assert.equal(a.run.code, 0, `add ${d.params}: ${await xs.tryRead(`${a.be}/hotplug-error`)} ${a.run.stderr}`);
  assert.equal(await xs.tryRead(`${a.be}/hotplug-status`), 'connected');
  assert.ok(a.device && /^\/dev\/rbd\d+$/.test(a.device), `physical-device-path ${a.device}`);
  const [maj, min] = execFileSync('stat', ['-L', '-c', '%t:%T', a.device], { encoding: 'utf8' }).trim().split(':');
  assert.equal(
    await xs.tryRead(`${a.be}/physical-device`),
    `${maj}:${min}`,
    'physical-device is the rbd device, hex major:minor',
  );
  return a.device;
}

async function remove(d: DiskNodes, extraEnv: NodeJS.ProcessEnv = {}): Promise<HookRun> {
  const be = await writeBackendNodes(xs, d).catch(() => `backend/vbd/${d.domid}/${d.devid}`);
  await closeBackend(xs, d);
  const r = await runHookProcess(HOOK, 'remove', be, { ...env, ...extraEnv });
  process.stdout.write(`# remove ${d.domainName ?? d.domid}: ${r.code ?? r.signal} in ${r.ms} ms\n`);
  await destroyNodes(xs, d);
  return r;
}

async function removeOk(d: DiskNodes, extraEnv: NodeJS.ProcessEnv = {}): Promise<void> {
  const r = await remove(d, extraEnv);
  assert.equal(r.code, 0, `remove ${d.params}: ${r.stderr}`);
}

before(async () => {
  const scratch = process.env.XEN_BLOCKHOOKS_SCRATCH;
  assert.ok(scratch, 'XEN_BLOCKHOOKS_SCRATCH is set (run in the guest tier)');
  assert.ok(existsSync(HOOK), `${HOOK} exists (npm run build first)`);
  watchdog();
  root = join(scratch, 'rbd');
  mkdirSync(root, { recursive: true });
  ceph = await startMiniCeph(join(root, 'ceph'), { loopBlock: true });
  process.stdout.write(`# mini-ceph: usable pool after ${ceph.startMs} ms\n`);
  golden = join(root, 'golden.raw');
  const data = Buffer.concat(Array.from({ length: GOLDEN_MIB * 256 }, (_, i) => block(i, 'golden')));
  writeFileSync(golden, data);
  goldenSum = createHash('sha256').update(data).digest('hex');
  ceph.rbd(['import', '--no-progress', '--image-feature', 'layering', golden, `${ceph.pool}/golden`]);
  ceph.rbd(['snap', 'create', `${ceph.pool}/golden@base`]);
  fixture('snap-ls-unprotected', () => ceph.rbd(['snap', 'ls', '--format', 'json', `${ceph.pool}/golden`]));
  fixture('info-snap-unprotected', () => ceph.rbd(['info', '--format', 'json', `${ceph.pool}/golden@base`]));
  for (const [name, args] of [
    ['info-nopool', ['info', '--format', 'json', 'nopool/golden@base']],
    ['info-noimage', ['info', '--format', 'json', `${ceph.pool}/nothere@base`]],
    ['info-nosnap', ['info', '--format', 'json', `${ceph.pool}/golden@nosnap`]],
  ] as [string, string[]][]) {
    fixture(`${name}-stderr`, () => {
      const r = rbdTry(args);
      return `${r.code}\n${r.err}`;
    });
  }
  server = await startXenstoreServer({ socketPath: join(root, 'xs.sock') });
  xs = await connectXenstore({ path: server.socketPath });
  env = {
    PATH: process.env.PATH,
    XENSTORED_PATH: server.socketPath,
    XEN_BLOCKHOOKS_CONF: join(root, 'none.conf'),
    XEN_BLOCKHOOKS_STORE_DIR: join(root, 'store'),
    XEN_BLOCKHOOKS_STATE_DIR: join(root, 'state'),
    XEN_BLOCKHOOKS_LOG_FILE: join(root, 'hook.log'),
  };
});

after(async () => {
  await xs?.close();
  await server?.close();
  // Leave no mapping behind even after a failed test (the OSD must stop cleanly).
  if (ceph) {
    for (const m of (() => {
      try {
        return mappings();
      } catch {
        return [];
      }
    })()) {
      try {
        execFileSync('rbd', ['unmap', '-o', 'noudev,force', m.device], {
          env: ceph.env,
          stdio: 'ignore',
          timeout: 30_000,
        });
      } catch {
        /* reported by the test that left it */
      }
    }
    await ceph.stop();
  }
});

test('two domains on one golden snapshot each see only their own writes; the golden image and snapshot keep their checksum', async () => {
  const a = disk(1, p());
  const b = disk(2, p());
  const devA = await addOk(a);
  fixture('snap-ls-protected', () => ceph.rbd(['snap', 'ls', '--format', 'json', `${ceph.pool}/golden`]));
  const devB = await addOk(b);
  assert.notEqual(devA, devB);
  assert.deepEqual(
    images(),
    ['golden', 'xbh-dom1-xvda', 'xbh-dom2-xvda'],
    'one clone per domain, named after domain and vdev',
  );
  fixture('info-clone', () => ceph.rbd(['info', '--format', 'json', `${ceph.pool}/xbh-dom1-xvda`]));
  fixture('info-snap', () => ceph.rbd(['info', '--format', 'json', `${ceph.pool}/golden@base`]));
  fixture('status-mapped', () => ceph.rbd(['status', '--format', 'json', `${ceph.pool}/xbh-dom1-xvda`]));
  fixture('showmapped-two', () => ceph.rbd(['showmapped', '--format', 'json']));
  // Both read the golden data through the clone.
  for (const dev of [devA, devB]) {
    assert.ok(pread(dev, 0, 4096).equals(block(0, 'golden')), `${dev} reads the golden block 0`);
    assert.ok(pread(dev, 5 * MiB, 4096).equals(block(5 * 256, 'golden')), `${dev} reads the golden block at 5 MiB`);
  }
  pwrite(devA, 0, block(0, 'A'));
  pwrite(devB, 0, block(0, 'B'));
  pwrite(devA, 9 * MiB, block(9, 'A'));
  assert.ok(pread(devA, 0, 4096).equals(block(0, 'A')), 'A reads its own write');
  assert.ok(pread(devB, 0, 4096).equals(block(0, 'B')), 'B reads its own write');
  assert.ok(pread(devB, 9 * MiB, 4096).equals(block(9 * 256, 'golden')), "B does not see A's write at 9 MiB");
  await removeOk(a);
  await removeOk(b);
  assertClean('after removing both');
  assert.equal(exportSum(`${ceph.pool}/golden@base`), goldenSum, 'the golden snapshot is unchanged');
  assert.equal(exportSum(`${ceph.pool}/golden`), goldenSum, 'the golden image head is unchanged');
});

test('resize: rbd resize of a transient clone, and the mapped device follows online with its data; never smaller', async () => {
  const cli = (...args: string[]) => {
    try {
      return {
        code: 0,
        out: execFileSync(process.execPath, [join(process.cwd(), 'dist', 'xen-blockhooks.mjs'), ...args], {
          env,
          encoding: 'utf8',
          stdio: ['ignore', 'pipe', 'pipe'],
        }),
        err: '',
      };
    } catch (e) {
      const x = e as { status?: number; stdout?: string; stderr?: string };
      return { code: x.status ?? -1, out: x.stdout ?? '', err: x.stderr ?? '' };
    }
  };
  const size = (dev: string) => Number(execFileSync('blockdev', ['--getsize64', dev], { encoding: 'utf8' }).trim());
  const a = disk(3, p());
  const dev = await addOk(a);
  pwrite(dev, 1 * MiB, block(1, 'R'));
  const r = cli('resize', 'dom3', 'xvda', `${GOLDEN_MIB + 4}M`);
  assert.equal(r.code, 0, r.err);
  assert.match(r.out, /resized dom3\/xvda: 12.0M → 16.0M, online/);
  assert.equal(size(dev), (GOLDEN_MIB + 4) * MiB, 'the mapped device shows the new size');
  assert.ok(pread(dev, 1 * MiB, 4096).equals(block(1, 'R')), 'its data is unchanged');
  assert.ok(pread(dev, (GOLDEN_MIB + 2) * MiB, 4096).equals(Buffer.alloc(4096)), 'the new range reads zeros');
  const smaller = cli('resize', 'dom3', 'xvda', '8M', '--shrink');
  assert.equal(smaller.code, 1);
  assert.match(smaller.err, /block-rbd never shrinks a clone/);
  await removeOk(a);
  assertClean('after the resized clone');
  assert.equal(exportSum(`${ceph.pool}/golden@base`), goldenSum, 'the golden snapshot is unchanged');
});

test('access=r maps the snapshot itself read-only, no clone', async () => {
  const d = disk(3, p(), { mode: 'r' });
  const dev = await addOk(d);
  const m = mappings();
  assert.equal(m.length, 1);
  assert.equal(m[0]?.snap, 'base', 'the snapshot is mapped');
  assert.equal(m[0]?.name, 'golden');
  assert.deepEqual(images(), ['golden'], 'no clone for a read-only disk');
  assert.ok(pread(dev, 0, 4096).equals(block(0, 'golden')), 'reads the golden data');
  assert.throws(() => pwrite(dev, 0, block(0, 'X')), 'writing a read-only mapping fails');
  await removeOk(d);
  assertClean('after the read-only disk');
});

test('live migration: the receiver adds NAME--incoming while the sender has the clone mapped; each remove takes only its own part', async () => {
  const dstState = join(root, 'state-dst');
  const src = disk(5, p(), { domainName: 'mig' });
  const devSrc = await addOk(src);
  pwrite(devSrc, 2 * MiB, block(2, 'mig'));
  // The receiving host (its own journal) creates the domain as mig--incoming.
  const dst = disk(6, p(), { domainName: 'mig--incoming' });
  const devDst = await addOk(dst, { XEN_BLOCKHOOKS_STATE_DIR: dstState });
  assert.deepEqual(images(), ['golden', 'xbh-mig-xvda'], 'both ends use the same clone');
  assert.ok(pread(devDst, 2 * MiB, 4096).equals(block(2, 'mig')), "the receiver sees the sender's data");
  // Not a migration: a plain second writer on another host is refused.
  const intruder = disk(7, p(), { domainName: 'mig' });
  const refused = await add(intruder, { XEN_BLOCKHOOKS_STATE_DIR: join(root, 'state-third') });
  assert.equal(refused.run.code, 1);
  assert.equal(await xs.tryRead(`${refused.be}/hotplug-status`), 'busy');
  assert.match(
    (await xs.tryRead(`${refused.be}/hotplug-error`)) ?? '',
    /xbh-mig-xvda is open by client\.\d+ at 127\.0\.0\.1/,
    'the refusal names the watcher',
  );
  assert.deepEqual(journalFiles(join(root, 'state-third')), [], 'the refused add left no record');
  await destroyNodes(xs, intruder);
  // The sender's remove runs after the receiver resumed: unmap only, the clone lives on.
  await removeOk(src);
  assert.deepEqual(
    mappings().map((m) => m.device),
    [devDst],
    "only the receiver's mapping remains",
  );
  assert.deepEqual(
    images(),
    ['golden', 'xbh-mig-xvda'],
    "the sender's remove keeps the transient clone the receiver uses",
  );
  await removeOk(dst, { XEN_BLOCKHOOKS_STATE_DIR: dstState });
  assertClean('after both ends removed');
  assert.deepEqual(journalFiles(dstState), []);
});

test('SIGKILL mid-add (after the clone, after the map), then remove: no mapping, no clone', async () => {
  // The add's commands: flock (path), rbd info golden@base, flock (clone), rbd clone, rbd map.
  // (The snapshot is protected by now.) After the 5th the device is mapped but not recorded.
  let killedMapped = 0;
  let killedCloned = 0;
  for (const n of [4, 5]) {
    const d = disk(8, p(), { domainName: `kill${n}` });
    const a = await add(d, { XEN_BLOCKHOOKS_FAULT_KILL_AFTER: String(n) });
    assert.equal(a.run.signal, 'SIGKILL', `add killed after command ${n}: ${a.run.stderr}`);
    if (mappings().length > 0) killedMapped++;
    if (images().length > 1) killedCloned++;
    await removeOk(d);
    assertClean(`remove after the add was killed after command ${n}`);
  }
  assert.equal(killedCloned, 2, 'both kills left a clone for remove to delete');
  assert.equal(killedMapped, 1, 'the kill after rbd map left a mapping for remove to unmap');
});

test('a crash leaves a transient clone: the next add of that disk starts afresh from the golden image, gc deletes one no add came for', async () => {
  const state = env.XEN_BLOCKHOOKS_STATE_DIR as string;
  const crash = async (d: DiskNodes, device: string) => {
    // The dom0 goes down: its mapping and /run (the journal) are gone, the clone stays in the cluster.
    execFileSync('rbd', ['unmap', '-o', 'noudev', device], { env: ceph.env, stdio: 'ignore', timeout: 30_000 });
    rmSync(state, { recursive: true, force: true });
    await destroyNodes(xs, d);
  };
  const d = disk(30, p(), { domainName: 'crashy' });
  const dev = await addOk(d);
  pwrite(dev, 0, block(0, 'written-before-the-crash'));
  await crash(d, dev);
  assert.deepEqual(images(), ['golden', 'xbh-crashy-xvda'], 'the clone outlived the crash');
  const again = disk(30, p(), { domainName: 'crashy' });
  const dev2 = await addOk(again);
  assert.deepEqual(
    pread(dev2, 0, 4096),
    block(0, 'golden'),
    "a transient disk starts from the golden image, not from the dead boot's writes",
  );
  await removeOk(again);
  assertClean('after the replaced clone is removed');

  const lost = disk(31, p(), { domainName: 'gone' });
  const dev3 = await addOk(lost);
  await crash(lost, dev3);
  const config = loadConfig(env);
  const run = execRunner({ ...env, ...ceph.env });
  const journal = new Journal(state);
  const marker = join(env.XEN_BLOCKHOOKS_STORE_DIR as string, 'rbd', `${ceph.pool}@xbh-gone-xvda.json`);
  assert.ok(existsSync(marker), "this host's marker of the clone");
  const old = Date.now() / 1000 - 600;
  utimesSync(marker, old, old);
  const inv = await takeInventory({ config, run, xs: undefined, journal });
  const plan = gcPlan(inv, { withoutXenstore: false }).filter((i) => i.row.kind === 'rbd');
  assert.equal(plan.length, 1, JSON.stringify(inv.rows));
  assert.match(
    plan[0]?.action ?? '',
    new RegExp(`^rbd rm ${ceph.pool}/xbh-gone-xvda: transient RBD clone this host made`),
  );
  const results = await applyGc(plan, { config, run, log: memoryLogger(), xs: undefined, journal });
  assert.deepEqual(
    results.map((r) => r.ok),
    [true],
    JSON.stringify(results),
  );
  assert.ok(!existsSync(marker), 'the marker goes with the clone');
  assertClean('after gc');
});

test('block-rbd handed to the resident service: the clone made and mapped by the service, its writes its own, nothing left', async () => {
  const wrappers = join(root, 'serve-wrappers');
  mkdirSync(wrappers, { recursive: true });
  const w = writeWrapper(wrappers, 'block-rbd');
  const chan = join(root, 'serve');
  const s = await startServe(chan, env);
  const e = { ...env, XEN_BLOCKHOOKS_SERVE_DIR: chan };
  try {
    const d = disk(31, p());
    const be = await writeBackendNodes(xs, d);
    const a = await runWrapper(w, 'add', be, e);
    assert.equal(a.code, 0, `add: ${await xs.tryRead(`${be}/hotplug-error`)} ${a.stderr}`);
    assert.equal(await xs.tryRead(`${be}/hotplug-status`), 'connected');
    assert.equal(
      new Journal(env.XEN_BLOCKHOOKS_STATE_DIR as string).load(be)?.pid,
      s.pid,
      "the record is the service's",
    );
    assert.deepEqual(images(), ['golden', 'xbh-dom31-xvda'], 'one clone');
    const dev = await xs.read(`${be}/physical-device-path`);
    assert.ok(pread(dev, 0, 4096).equals(block(0, 'golden')), 'reads the golden block 0');
    pwrite(dev, 0, block(0, 'S'));
    assert.ok(pread(dev, 0, 4096).equals(block(0, 'S')), 'reads back what it wrote');
    await closeBackend(xs, d);
    const r = await runWrapper(w, 'remove', be, e);
    assert.equal(r.code, 0, `remove: ${r.stderr}`);
    await destroyNodes(xs, d);
  } finally {
    await s.stop();
  }
  assertClean('after the served add and remove');
  assert.equal(exportSum(`${ceph.pool}/golden@base`), goldenSum, 'the golden snapshot is unchanged');
});

test('a missing pool, image or snapshot: a clear hotplug-error, exit 1, nothing created', async () => {
  const cases: [string, RegExp][] = [
    [`nopool/golden@base conf=${ceph.conf}`, /pool "nopool" does not exist/],
    [`${ceph.pool}/nothere@base conf=${ceph.conf}`, /image "nothere" does not exist in pool "rbd"/],
    [`${ceph.pool}/golden@nosnap conf=${ceph.conf}`, /has no snapshot "nosnap"/],
  ];
  for (const [params, re] of cases) {
    const d = disk(9, params);
    const a = await add(d);
    assert.equal(a.run.code, 1, params);
    assert.equal(await xs.tryRead(`${a.be}/hotplug-status`), 'error', params);
    assert.match((await xs.tryRead(`${a.be}/hotplug-error`)) ?? '', re, params);
    assert.equal(await xs.tryRead(`${a.be}/physical-device`), undefined);
    assertClean(`after "${params}"`);
    await destroyNodes(xs, d);
  }
});
