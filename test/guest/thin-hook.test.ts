/**
 * block-thin on a real kernel: the bundled hook (dist/block-thin.mjs) run as a child process
 * against an in-process xenstore server; real loop devices, a real dm thin-pool, no udev.
 * Also what a crash leaves in the pool (transient volumes, pool files) and how it is reclaimed.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { closeSync, fsyncSync, openSync, readFileSync, rmSync, statSync, utimesSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { loadConfig } from '../../src/config/config.js';
import { execRunner } from '../../src/devices/exec.js';
import { parseStatus, parseThinPoolStatus } from '../../src/devices/dmsetup.js';
import { Journal } from '../../src/journal/journal.js';
import { memoryLogger } from '../../src/log/logger.js';
import { growStore, watchOnce } from '../../src/grow/index.js';
import { applyGc, gcPlan } from '../../src/cli/gc.js';
import { takeInventory } from '../../src/cli/inventory.js';
import type { XenstoreClient } from '../../src/xenstore/types.js';
import { backendPath, destroyNodes, runHookProcess, writeBackendNodes, type DiskNodes } from '../lib/backend-nodes.js';
import { block, listDir, MiB, patternedImage, pread, pwrite, sh, sha256File } from '../lib/disk-io.js';
import { hookWorld } from '../lib/hook-world.js';

const world = hookWorld({
  name: 'thin',
  bundle: 'block-thin',
  env: { XEN_BLOCKHOOKS_THIN_DATA_SIZE: '8M', XEN_BLOCKHOOKS_THIN_METADATA_SIZE: '4M' },
});
const { root, images, storeDir, stateDir, logFile, env, explain, hook, addOk, removeOk, leftovers } = world;
const HOOK = world.hookPath;
const base = join(images, 'rootfs.img');
const BASE_MIB = 16;
const POOL = 'xbh-thinpool';

let xs: XenstoreClient;
let baseSum = '';

/** Write `mib` MiB from `offsetMiB` with O_DIRECT-free fsync'ed writes; the first error code, or null. */
function writeMiB(path: string, offsetMiB: number, mib: number, fill: number): string | null {
  const buf = Buffer.alloc(MiB, fill);
  let fd: number;
  try {
    fd = openSync(path, 'r+');
  } catch (e) {
    return (e as NodeJS.ErrnoException).code ?? 'open failed';
  }
  try {
    for (let i = 0; i < mib; i++) {
      writeSync(fd, buf, 0, MiB, (offsetMiB + i) * MiB);
      fsyncSync(fd);
    }
    return null;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code ?? String(e);
  } finally {
    try {
      closeSync(fd);
    } catch {
      // the error was already reported by the write
    }
  }
}

function disk(domid: number, extra: Partial<DiskNodes> = {}): DiskNodes {
  return {
    domid,
    devid: 51712,
    params: base,
    mode: 'w',
    vdev: 'xvda',
    domainName: `guest${domid}`,
    script: '/etc/xen/scripts/block-thin',
    ...extra,
  };
}

function poolStatus() {
  const l = parseStatus(sh('dmsetup', ['status', POOL]))[0];
  assert.ok(l && l.target === 'thin-pool');
  return parseThinPoolStatus(l.params);
}

before(async () => {
  xs = await world.start();
  baseSum = patternedImage(base, BASE_MIB, 'base');
});

after(() => world.stop({ dmPrefixes: ['xbh-thin-', POOL] }));

test('two domains on one base: isolation, one shared pool, one base loop, base unchanged, a size past the base reads zeros', async () => {
  const a = disk(1, { domainName: 'alpha' });
  const b = disk(2, { domainName: 'beta', params: `${base} 32M` });
  const da = await addOk(a);
  const db = await addOk(b);
  assert.notEqual(da.pd, db.pd);
  assert.equal(sh('blockdev', ['--getsz', da.path]), String((BASE_MIB * MiB) / 512), 'default size: the base');
  assert.equal(sh('blockdev', ['--getsz', db.path]), String((32 * MiB) / 512), 'size past the base');
  const poolTable = sh('dmsetup', ['table', POOL]);
  assert.match(poolTable, / thin-pool \d+:\d+ \d+:\d+ 128 0 1 error_if_no_space$/);
  const ta = sh('dmsetup', ['table', 'xbh-thin-alpha-xvda-51712']).split(' ');
  const tb = sh('dmsetup', ['table', 'xbh-thin-beta-xvda-51712']).split(' ');
  assert.equal(ta[2], 'thin');
  assert.notEqual(ta[4], tb[4], 'distinct thin ids');
  assert.equal(ta[5], tb[5], 'one external origin');
  const baseLoops = sh('losetup', ['-a'])
    .split('\n')
    .filter((l) => l.includes('rootfs.img'));
  assert.equal(baseLoops.length, 1, baseLoops.join('\n'));
  assert.equal(sh('blockdev', ['--getro', baseLoops[0]!.split(':')[0]!]), '1');

  pwrite(da.path, 3 * MiB, block(3, 'alpha'));
  pwrite(db.path, 3 * MiB, block(3, 'beta'));
  pwrite(db.path, 20 * MiB, block(20, 'beta'));
  assert.deepEqual(pread(da.path, 3 * MiB, 4096), block(3, 'alpha'));
  assert.deepEqual(pread(db.path, 3 * MiB, 4096), block(3, 'beta'));
  assert.deepEqual(pread(da.path, 5 * MiB, 4096), block(5, 'base'));
  assert.deepEqual(pread(db.path, 7 * MiB, 4096), block(7, 'base'));
  assert.deepEqual(pread(db.path, 24 * MiB, 4096), Buffer.alloc(4096), 'zeros past the base');
  assert.deepEqual(pread(db.path, 20 * MiB, 4096), block(20, 'beta'));
  assert.equal(sha256File(base), baseSum, 'base unchanged');

  await removeOk(a);
  assert.match(sh('dmsetup', ['ls']), new RegExp(POOL), 'pool stays while beta uses it');
  assert.deepEqual(pread(db.path, 3 * MiB, 4096), block(3, 'beta'));
  await removeOk(b);
  assert.deepEqual(leftovers(), [], 'nothing left after the last remove');
  assert.equal(sha256File(base), baseSum);
});

test('remove deletes the thin volume: the next disk starts from the base', async () => {
  const a = disk(3, { domainName: 'gamma' });
  const b = disk(4, { domainName: 'delta' });
  const keep = await addOk(b); // keeps the pool up between the two adds of gamma
  let d = await addOk(a);
  pwrite(d.path, 1 * MiB, block(1, 'gamma'));
  const used1 = poolStatus();
  assert.equal(used1.state, 'ok');
  await removeOk(a);
  d = await addOk(a);
  assert.deepEqual(pread(d.path, 1 * MiB, 4096), block(1, 'base'), 'the old volume was deleted, not reused');
  assert.ok(keep.path);
  await removeOk(a);
  await removeOk(b);
  assert.deepEqual(leftovers(), []);
});

test('pool full: the writer gets an error, the status parser says out_of_data_space, growing the pool recovers it', async () => {
  const a = disk(5, { domainName: 'eps', params: `${base} 64M` });
  const d = await addOk(a);
  const err = writeMiB(d.path, 0, 16, 0x11);
  assert.ok(err === 'ENOSPC' || err === 'EIO', `a write into a full pool fails (got ${err})`);
  const full = poolStatus();
  assert.equal(full.state, 'ok');
  assert.ok(
    full.state === 'ok' && full.mode === 'out_of_data_space',
    JSON.stringify(full, (_k, v) => (typeof v === 'bigint' ? String(v) : v)),
  );

  const config = loadConfig(env);
  const run = execRunner(env);
  const log = memoryLogger();
  const entry = new Journal(stateDir).load(backendPath(a));
  assert.ok(entry);
  const g = await growStore(entry, { relative: true, bytes: 24 * MiB }, { config, run, log });
  assert.equal(g.kind, 'thin-data');
  assert.equal(g.afterBytes, 32 * MiB);
  assert.equal(statSync(join(storeDir, 'thin-pool.data')).size, 32 * MiB);
  const grown = poolStatus();
  assert.ok(
    grown.state === 'ok' && grown.mode === 'rw',
    `pool back to rw: ${grown.state === 'ok' ? grown.mode : grown.state}`,
  );
  assert.ok(grown.state === 'ok' && grown.totalDataBlocks === BigInt((32 * MiB) / (64 * 1024)));
  assert.ok(
    log.lines.some((l) => l.level === 'info' && /thin pool xbh-thinpool data .* 8 MiB → 32 MiB/.test(l.msg)),
    log.lines.map((l) => l.msg).join('\n'),
  );

  assert.equal(writeMiB(d.path, 0, 16, 0x22), null, 'writes succeed after growing');
  assert.deepEqual(pread(d.path, 15 * MiB, 16), Buffer.alloc(16, 0x22));
  assert.deepEqual(pread(d.path, 15 * MiB + 4096 * 2, 16), Buffer.alloc(16, 0x22));

  // watchOnce sees a pool past the threshold and grows it again, logging what it did.
  const w = await watchOnce({ ...config, watch: { ...config.watch, thresholdPercent: 40 } }, run, log);
  assert.ok(
    w.grown.some((x) => x.kind === 'thin-data'),
    JSON.stringify(w.findings),
  );
  await removeOk(a);
  assert.deepEqual(leftovers(), []);
  assert.equal(sha256File(base), baseSum);
});

test('persistent: the volume survives remove and the pool teardown, and comes back with its data', async () => {
  const a = disk(6, { domainName: 'zeta', params: `${base} persistent` });
  let d = await addOk(a);
  pwrite(d.path, 2 * MiB, block(2, 'zeta'));
  await removeOk(a);
  assert.doesNotMatch(sh('dmsetup', ['ls']), new RegExp(POOL), 'pool stopped');
  assert.deepEqual(listDir(storeDir), ['thin-pool.data', 'thin-pool.meta', 'thin-pool.volumes.json']);
  d = await addOk(a);
  assert.deepEqual(pread(d.path, 2 * MiB, 4096), block(2, 'zeta'));
  // a non-persistent disk alongside gets its own id
  const b = disk(7, { domainName: 'eta' });
  const db = await addOk(b);
  assert.deepEqual(pread(db.path, 2 * MiB, 4096), block(2, 'base'));
  await removeOk(b);
  // A migration's receiver on this host names the same volume (the --incoming suffix dropped) and
  // is refused while the sender has it: one writer, never a second, empty volume.
  const recv = disk(8, { domainName: 'zeta--incoming', params: `${base} persistent` });
  await writeBackendNodes(xs, recv);
  const r = await hook('add', recv);
  assert.equal(r.code, 1, explain(r));
  assert.match(
    (await xs.tryRead(`${backendPath(recv)}/hotplug-error`)) ?? '',
    /persistent thin volume zeta-xvda is in use by backend\/vbd\/6\//,
  );
  assert.equal(await xs.tryRead(`${backendPath(recv)}/hotplug-status`), 'busy');
  assert.deepEqual(pread(d.path, 2 * MiB, 4096), block(2, 'zeta'), "the sender's volume is untouched");
  await destroyNodes(xs, recv);
  await removeOk(a);
  assert.equal(sha256File(base), baseSum);
});

/** What a crash does: every device gone, /run (the journal and the locks) gone. The pool files stay. */
function crashThin(): void {
  for (const l of sh('dmsetup', ['ls']).split('\n')) {
    const name = l.split(/\s+/)[0];
    if (name?.startsWith('xbh-thin-')) sh('dmsetup', ['remove', name]);
  }
  if (sh('dmsetup', ['ls']).includes(POOL)) sh('dmsetup', ['remove', POOL]);
  for (const l of sh('losetup', ['-a']).split('\n'))
    if (l.includes(root)) sh('losetup', ['-d', l.split(':')[0] as string]);
  rmSync(stateDir, { recursive: true, force: true });
}

function usedBlocks(): bigint {
  const st = poolStatus();
  if (!('usedDataBlocks' in st)) assert.fail(`the pool is not healthy: ${st.state}`);
  return st.usedDataBlocks;
}

function thinIdOf(d: DiskNodes): number {
  const e = new Journal(stateDir).load(backendPath(d));
  const id = e?.steps.find((st) => st.kind === 'thin')?.data.id;
  assert.equal(typeof id, 'number', `the record of ${backendPath(d)} names its thin id`);
  return id as number;
}

/** `create_thin ID` succeeds only when the pool holds no such id (then it is deleted again). */
function idFree(id: number): boolean {
  const r = spawnSync('dmsetup', ['message', POOL, '0', `create_thin ${id}`], { encoding: 'utf8' });
  if (r.status !== 0) return false;
  sh('dmsetup', ['message', POOL, '0', `delete ${id}`]);
  return true;
}

test('a crash leaves transient volumes in the pool: its next start deletes them, gc deletes them from a running pool, never a persistent one', async () => {
  const kept = disk(10, { domainName: 'kappa', params: `${base} persistent` });
  const lost = disk(11, { domainName: 'lambda' });
  const k = await addOk(kept);
  const l = await addOk(lost);
  pwrite(k.path, 3 * MiB, block(3, 'kappa'));
  assert.equal(writeMiB(l.path, 0, 2, 0x5a), null);
  const lostId = thinIdOf(lost);
  const usedBefore = usedBlocks();
  crashThin();
  for (const d of [kept, lost]) await destroyNodes(xs, d);
  assert.deepEqual(listDir(storeDir), [
    'thin-pool.data',
    'thin-pool.meta',
    'thin-pool.transient.json',
    'thin-pool.volumes.json',
  ]);

  const config = loadConfig(env);
  const run = execRunner(env);
  const journal = new Journal(stateDir);
  const down = await takeInventory({ config, run, xs: undefined, journal });
  assert.deepEqual(
    down.rows.filter((r) => r.hook === 'block-thin'),
    [],
    "with a persistent volume in them the pool files are no leftover, and a stopped pool's ids wait for its start",
  );

  // The pool's next start (the persistent disk's add) deletes the leftover id first.
  const again = await addOk(kept);
  assert.deepEqual(pread(again.path, 3 * MiB, 4096), block(3, 'kappa'), 'the persistent volume keeps its data');
  assert.ok(idFree(lostId), `the leftover transient id ${lostId} is gone from the pool`);
  assert.ok(usedBlocks() < usedBefore, 'its blocks are free again');
  assert.match(
    readFileSync(logFile, 'utf8'),
    new RegExp(`deleted leftover transient thin volume id ${lostId}, which no record holds`),
  );
  assert.deepEqual(
    listDir(storeDir),
    ['thin-pool.data', 'thin-pool.meta', 'thin-pool.volumes.json'],
    'no transient id is listed any more',
  );

  // A transient volume whose record is lost while the pool runs: gc deletes it, under the pool lock.
  const orphan = disk(12, { domainName: 'mu' });
  const o = await addOk(orphan);
  assert.equal(writeMiB(o.path, 0, 1, 0x6b), null);
  const orphanId = thinIdOf(orphan);
  sh('dmsetup', ['remove', 'xbh-thin-mu-xvda-51712']);
  journal.delete(backendPath(orphan));
  await destroyNodes(xs, orphan);
  const inv = await takeInventory({ config, run, xs: undefined, journal });
  const plan = gcPlan(inv, { withoutXenstore: false }).filter((i) => i.row.hook === 'block-thin');
  assert.deepEqual(
    plan.map((i) => i.action),
    [
      `dmsetup message ${POOL} 0 "delete ${orphanId}": transient thin volume id ${orphanId} in the pool that no record holds (left by a crash or a reboot)`,
    ],
  );
  const results = await applyGc(plan, { config, run, log: memoryLogger(), xs: undefined, journal });
  assert.deepEqual(
    results.map((r) => r.ok),
    [true],
    JSON.stringify(results),
  );
  assert.ok(idFree(orphanId), 'gc deleted it');
  assert.deepEqual(pread(again.path, 3 * MiB, 4096), block(3, 'kappa'), 'the persistent volume is untouched');
  await removeOk(kept);
  assert.deepEqual(listDir(storeDir), ['thin-pool.data', 'thin-pool.meta', 'thin-pool.volumes.json']);
});

test('a crash leaves a pool with no persistent volume: gc deletes its files', async () => {
  const store2 = join(root, 'store2');
  const env2 = { ...env, XEN_BLOCKHOOKS_STORE_DIR: store2 };
  const d = disk(13, { domainName: 'nu' });
  await writeBackendNodes(xs, d);
  const r = await runHookProcess(HOOK, 'add', backendPath(d), env2);
  assert.equal(r.code, 0, explain(r));
  assert.equal(writeMiB(await xs.read(`${backendPath(d)}/physical-device-path`), 0, 1, 0x7c), null);
  crashThin();
  await destroyNodes(xs, d);
  assert.deepEqual(listDir(store2), ['thin-pool.data', 'thin-pool.meta', 'thin-pool.transient.json']);
  const config = loadConfig(env2);
  const run = execRunner(env2);
  const journal = new Journal(stateDir);
  const young = await takeInventory({ config, run, xs: undefined, journal });
  assert.deepEqual(
    young.rows.filter((x) => x.hook === 'block-thin'),
    [],
    "files younger than a minute are nobody's leftovers yet",
  );
  const old = Date.now() / 1000 - 600;
  for (const f of ['thin-pool.data', 'thin-pool.meta']) utimesSync(join(store2, f), old, old);
  const inv = await takeInventory({ config, run, xs: undefined, journal });
  const plan = gcPlan(inv, { withoutXenstore: false }).filter((i) => i.row.hook === 'block-thin');
  assert.deepEqual(
    plan.map((i) => i.row.store),
    ['thin-pool.data', 'thin-pool.meta', 'thin-pool.transient.json'].map((f) => join(store2, f)),
  );
  assert.match(
    plan[0]?.action ?? '',
    /^rm .*thin-pool\.data: thin pool file with no persistent volume in it, no record and no running pool/,
  );
  const results = await applyGc(plan, { config, run, log: memoryLogger(), xs: undefined, journal });
  assert.deepEqual(
    results.map((x) => x.ok),
    [true, true, true],
    JSON.stringify(results),
  );
  assert.deepEqual(listDir(store2), []);
});

test('bad params: hotplug-error, exit 1, nothing built', async () => {
  const cases: [string, RegExp][] = [
    // the grammar is covered by the host tests; here a missing base and one outside image_dirs
    [`${join(images, 'missing.img')}`, /does not exist/],
    ['/etc/passwd', /outside the allowed image directories/],
  ];
  const before = leftovers();
  for (const [params, re] of cases) {
    const d = disk(9, { params });
    await writeBackendNodes(xs, d);
    const r = await hook('add', d);
    assert.equal(r.code, 1, `${params}: ${explain(r)}`);
    assert.match(await xs.read(`${backendPath(d)}/hotplug-error`), re);
    assert.equal(await xs.read(`${backendPath(d)}/hotplug-status`), 'error');
    assert.equal(await xs.tryRead(`${backendPath(d)}/physical-device`), undefined);
    await destroyNodes(xs, d);
  }
  assert.deepEqual(leftovers(), before);
});
