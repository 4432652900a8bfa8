/**
 * block-lvsnap on a real kernel with real LVM: a volume group on loop devices, an origin LV with
 * known content, the bundled hook (dist/block-lvsnap.mjs) run as a child process against an
 * in-process xenstore server. Classic snapshots (with a size), thin snapshots of a thin origin,
 * isolation, removal with nothing left, growth with lvextend, an overflow reported Invalid, and
 * gc removing the transient snapshots a crash left (never a persistent one, an open one or one a
 * record holds).
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { closeSync, existsSync, fsyncSync, mkdirSync, openSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { loadConfig } from '../../src/config/config.js';
import { execRunner } from '../../src/devices/exec.js';
import { lvInfo } from '../../src/devices/lvm.js';
import { Journal } from '../../src/journal/journal.js';
import { memoryLogger } from '../../src/log/logger.js';
import { growStore, watchOnce } from '../../src/grow/index.js';
import { applyGc, gcPlan } from '../../src/cli/gc.js';
import { takeInventory } from '../../src/cli/inventory.js';
import type { XenstoreClient } from '../../src/xenstore/types.js';
import { backendPath, closeBackend, destroyNodes, writeBackendNodes, type DiskNodes } from '../lib/backend-nodes.js';
import { block, MiB, pread, pwrite, sh, sha256File } from '../lib/disk-io.js';
import { hookWorld, worldRoot } from '../lib/hook-world.js';
import { runWrapper, startServe, writeWrapper } from '../lib/serve-harness.js';

const world = hookWorld({ name: 'lvsnap', bundle: 'block-lvsnap', imageDirs: worldRoot('lvsnap') });
const { root, stateDir, env, explain, hook, addOk, removeOk } = world;
const VG = 'xbhtestvg';
const pvs: string[] = [];

let xs: XenstoreClient;

function lvNames(): string[] {
  return sh('lvm', ['lvs', '--noheadings', '-o', 'lv_name', VG])
    .split('\n')
    .map((s) => s.trim())
    .filter(Boolean)
    .sort();
}

function disk(domid: number, params: string, extra: Partial<DiskNodes> = {}): DiskNodes {
  return {
    domid,
    devid: 51712,
    params,
    mode: 'w',
    vdev: 'xvda',
    domainName: `g${domid}`,
    script: '/etc/xen/scripts/block-lvsnap',
    ...extra,
  };
}

let originSum = '';
const originPath = `/dev/${VG}/golden`;

before(async () => {
  xs = await world.start();
  for (const n of ['pv1', 'pv2']) {
    const f = join(root, `${n}.img`);
    sh('truncate', ['-s', '96M', f]);
    pvs.push(sh('losetup', ['--find', '--show', '--', f]));
  }
  sh('lvm', ['pvcreate', '-q', ...pvs]);
  sh('lvm', ['vgcreate', '-q', VG, ...pvs]);
  sh('lvm', ['lvcreate', '-q', '-y', '-n', 'golden', '-L', '16M', VG]);
  for (let i = 0; i < 16; i++) pwrite(originPath, i * MiB, block(i, 'golden'));
  sh('lvm', ['lvcreate', '-q', '-y', '--type', 'thin-pool', '-n', 'tpool', '-L', '24M', VG]);
  sh('lvm', ['lvcreate', '-q', '-y', '--type', 'thin', '-n', 'tgolden', '-V', '16M', '--thinpool', 'tpool', VG]);
  for (let i = 0; i < 16; i++) pwrite(`/dev/${VG}/tgolden`, i * MiB, block(i, 'tgolden'));
  originSum = sha256File(originPath);
});

after(async () => {
  spawnSync('lvm', ['vgremove', '-q', '-f', VG]);
  spawnSync('lvm', ['pvremove', '-q', ...pvs]);
  await world.stop(); // detaches the loops of the PVs
});

test('two classic snapshots of one origin: isolation, origin unchanged, removal leaves only the origin', async () => {
  const a = disk(1, `${VG}/golden 8M`, { domainName: 'alpha' });
  const b = disk(2, `${VG}/golden 8M`, { domainName: 'beta' });
  const { path: pa } = await addOk(a);
  const { path: pb } = await addOk(b);
  assert.deepEqual(lvNames(), ['golden', 'tgolden', 'tpool', 'xbh-alpha-xvda', 'xbh-beta-xvda']);
  const info = await lvInfo(execRunner(env), { vg: VG, lv: 'xbh-alpha-xvda' });
  assert.ok(info);
  assert.equal(info.kind, 'snapshot');
  assert.equal(info.origin, 'golden');
  assert.deepEqual(info.tags, ['xbh_transient']);
  assert.equal(info.sizeBytes, BigInt(8 * MiB));
  pwrite(pa, 4 * MiB, block(4, 'alpha'));
  pwrite(pb, 4 * MiB, block(4, 'beta'));
  assert.deepEqual(pread(pa, 4 * MiB), block(4, 'alpha'));
  assert.deepEqual(pread(pb, 4 * MiB), block(4, 'beta'));
  assert.deepEqual(pread(pa, 5 * MiB), block(5, 'golden'));
  assert.equal(sha256File(originPath), originSum, 'origin unchanged');
  await removeOk(a);
  await removeOk(b);
  assert.deepEqual(lvNames(), ['golden', 'tgolden', 'tpool']);
  assert.deepEqual(
    existsSync(join(stateDir, 'journal')) ? (await import('node:fs')).readdirSync(join(stateDir, 'journal')) : [],
    [],
  );
  // remove twice: nothing to do, success
  const again = await hook('remove', a);
  assert.equal(again.code, 0, explain(again));
});

test("a persistent snapshot serves one writer: a migration's receiver on this host is refused, not given a new one", async () => {
  const a = disk(3, `${VG}/golden 8M persistent`, { domainName: 'gamma' });
  const { path: pa } = await addOk(a);
  pwrite(pa, 4 * MiB, block(4, 'gamma'));
  const recv = disk(4, `${VG}/golden 8M persistent`, { domainName: 'gamma--incoming' });
  await writeBackendNodes(xs, recv);
  const r = await hook('add', recv);
  assert.equal(r.code, 1, explain(r));
  assert.match(
    (await xs.tryRead(`${backendPath(recv)}/hotplug-error`)) ?? '',
    /persistent snapshot .*\/xbh-gamma-xvda is in use by another disk/,
  );
  assert.deepEqual(lvNames(), ['golden', 'tgolden', 'tpool', 'xbh-gamma-xvda'], 'no second snapshot');
  assert.deepEqual(pread(pa, 4 * MiB), block(4, 'gamma'), "the sender's snapshot is untouched");
  await destroyNodes(xs, recv);
  await removeOk(a);
  const lv = spawnSync('lvm', ['lvremove', '-f', `${VG}/xbh-gamma-xvda`], { encoding: 'utf8', env });
  assert.equal(lv.status, 0, lv.stderr);
  assert.deepEqual(lvNames(), ['golden', 'tgolden', 'tpool']);
});

test('a thin origin gets thin snapshots (no size); a size is refused', async () => {
  const a = disk(3, `${VG}/tgolden`, { domainName: 'gamma' });
  const b = disk(4, `${VG}/tgolden`, { domainName: 'delta' });
  const { path: pa } = await addOk(a);
  const { path: pb } = await addOk(b);
  const info = await lvInfo(execRunner(env), { vg: VG, lv: 'xbh-gamma-xvda' });
  assert.ok(info);
  assert.equal(info.kind, 'thin');
  assert.equal(info.pool, 'tpool');
  pwrite(pa, 1 * MiB, block(1, 'gamma'));
  assert.deepEqual(pread(pa, 1 * MiB), block(1, 'gamma'));
  assert.deepEqual(pread(pb, 1 * MiB), block(1, 'tgolden'));
  await removeOk(a);
  await removeOk(b);
  assert.deepEqual(lvNames(), ['golden', 'tgolden', 'tpool']);

  const c = disk(5, `${VG}/tgolden 8M`);
  await writeBackendNodes(xs, c);
  const r = await hook('add', c);
  assert.equal(r.code, 1);
  assert.match(await xs.read(`${backendPath(c)}/hotplug-error`), /thin volume: its snapshots are thin too .* drop "8"/);
  await destroyNodes(xs, c);
  assert.deepEqual(lvNames(), ['golden', 'tgolden', 'tpool']);
});

test('resize: a thin snapshot grows online (lvextend), keeping its data; a classic snapshot is refused', async () => {
  const cli = (...args: string[]) =>
    spawnSync(process.execPath, [join(process.cwd(), 'dist', 'xen-blockhooks.mjs'), ...args], {
      env,
      encoding: 'utf8',
    });
  const size = (dev: string) => Number(sh('blockdev', ['--getsize64', dev]));
  const t1 = disk(6, `${VG}/tgolden`, { domainName: 'tres' });
  const { path: dev } = await addOk(t1);
  pwrite(dev, 1 * MiB, block(1, 'tres'));
  const r = cli('resize', 'tres', 'xvda', '+8M');
  assert.equal(r.status, 0, r.stderr);
  assert.match(r.stdout, /resized tres\/xvda: 16.0M → 24.0M, online \(thin snapshot xbhtestvg\/xbh-tres-xvda extended/);
  assert.equal(size(dev), 24 * MiB, 'the snapshot device is larger at once');
  assert.deepEqual(pread(dev, 1 * MiB), block(1, 'tres'), 'its data is unchanged');
  assert.deepEqual(pread(dev, 20 * MiB), Buffer.alloc(4096), 'the new range reads zeros');
  await removeOk(t1);

  const c1 = disk(7, `${VG}/golden 8M`, { domainName: 'cls' });
  const { path: cdev } = await addOk(c1);
  const before = size(cdev);
  const refused = cli('resize', 'cls', 'xvda', '+8M');
  assert.equal(refused.status, 1);
  assert.match(refused.stderr, /is a classic snapshot: it is as large as its origin and cannot be resized/);
  assert.equal(size(cdev), before, 'nothing changed');
  await removeOk(c1);
  assert.deepEqual(lvNames(), ['golden', 'tgolden', 'tpool']);
});

test('growth: lvextend by the step; an overflowed snapshot is reported Invalid, never grown silently', async () => {
  const a = disk(6, `${VG}/golden 4M`, { domainName: 'eps' });
  const { path: p } = await addOk(a);
  const config = loadConfig(env);
  const run = execRunner(env);
  const log = memoryLogger();
  const entry = new Journal(stateDir).load(backendPath(a));
  assert.ok(entry);
  const g = await growStore(entry, { relative: true, bytes: 4 * MiB }, { config, run, log });
  assert.equal(g.kind, 'lv');
  assert.equal(g.afterBytes, 8 * MiB);
  // overflow it: 12 MiB of changes into 8 MiB
  const fd = openSync(p, 'r+');
  try {
    for (let i = 0; i < 12; i++) {
      try {
        writeSync(fd, Buffer.alloc(MiB, 0x33), 0, MiB, i * MiB);
        fsyncSync(fd);
      } catch {
        break;
      }
    }
  } finally {
    try {
      closeSync(fd);
    } catch {
      // EIO on close of an invalid snapshot
    }
  }
  const info = await lvInfo(run, { vg: VG, lv: 'xbh-eps-xvda' });
  assert.ok(info?.invalid, `snapshot invalid: ${info?.attr}`);
  const w = await watchOnce(config, run, log);
  assert.equal(w.problems.length, 1, JSON.stringify(w.findings));
  assert.equal(w.problems[0]?.state, 'invalid');
  assert.match(w.problems[0]?.message ?? '', /Invalid/);
  assert.ok(log.lines.some((l) => l.level === 'error' && /Invalid/.test(l.msg)));
  await assert.rejects(growStore(entry, undefined, { config, run, log }), /Invalid/);
  await removeOk(a);
  assert.deepEqual(lvNames(), ['golden', 'tgolden', 'tpool']);
  assert.equal(sha256File(originPath), originSum);
});

test('a crash leaves transient snapshots behind: gc removes those nothing holds, never a persistent, an open or a recorded one', async () => {
  const gone = disk(21, `${VG}/golden 4M`);
  const open = disk(22, `${VG}/golden 4M`);
  const kept = disk(23, `${VG}/golden 4M persistent`);
  const live = disk(24, `${VG}/golden 4M`);
  for (const d of [gone, open, kept, live]) await addOk(d);
  // The crash: the journal in /run is lost for 21-23 (their LVs stay, as LVs do across a reboot).
  const journal = new Journal(stateDir);
  for (const d of [gone, open, kept]) {
    journal.delete(backendPath(d));
    await destroyNodes(xs, d);
  }
  const config = loadConfig(env);
  const run = execRunner(env);
  const log = memoryLogger();
  const later = () => Date.now() + 120_000;
  const fd = openSync(`/dev/${VG}/xbh-g22-xvda`, 'r');
  let plan;
  try {
    const young = await takeInventory({ config, run, xs: undefined, journal });
    assert.deepEqual(
      young.rows.filter((r) => r.kind === 'lv'),
      [],
      "a snapshot younger than a minute is nobody's leftover yet",
    );
    const inv = await takeInventory({ config, run, xs: undefined, journal, now: later });
    assert.deepEqual(
      inv.rows.filter((r) => r.kind === 'lv').map((r) => r.device),
      [`/dev/${VG}/xbh-g21-xvda`],
      'only the transient, closed, unrecorded one',
    );
    plan = gcPlan(inv, { withoutXenstore: false }).filter((i) => i.row.kind === 'lv');
    assert.match(
      plan[0]?.action ?? '',
      new RegExp(
        `^lvremove -f ${VG}/xbh-g21-xvda: transient snapshot LV \\(tag xbh_transient\\) that no record names and nothing holds open`,
      ),
    );
  } finally {
    closeSync(fd);
  }
  const results = await applyGc(plan, { config, run, log, xs: undefined, journal, now: later });
  assert.deepEqual(
    results.map((r) => r.ok),
    [true],
    JSON.stringify(results),
  );
  assert.deepEqual(lvNames(), ['golden', 'tgolden', 'tpool', 'xbh-g22-xvda', 'xbh-g23-xvda', 'xbh-g24-xvda']);
  // The open one, once closed, is the next run's.
  const again = await takeInventory({ config, run, xs: undefined, journal, now: later });
  assert.deepEqual(
    again.rows.filter((r) => r.kind === 'lv').map((r) => r.device),
    [`/dev/${VG}/xbh-g22-xvda`],
  );
  const second = await applyGc(
    gcPlan(again, { withoutXenstore: false }).filter((i) => i.row.kind === 'lv'),
    { config, run, log, xs: undefined, journal, now: later },
  );
  assert.deepEqual(
    second.map((r) => r.ok),
    [true],
    JSON.stringify(second),
  );
  await removeOk(live);
  sh('lvm', ['lvremove', '-q', '-f', `${VG}/xbh-g23-xvda`]);
  assert.deepEqual(lvNames(), ['golden', 'tgolden', 'tpool']);
  assert.equal(sha256File(originPath), originSum);
});

test('bad params: hotplug-error, exit 1, nothing created', async () => {
  // The grammar and name rules are covered by the host tests; here the refusals that need LVM.
  const cases: [string, RegExp][] = [
    [`${VG}/missing 8M`, /does not exist/],
    [`${VG}/tpool`, /not a volume to snapshot/],
    [`${VG}/x_tmeta`, /reserves for its internal volumes/],
  ];
  for (const [params, re] of cases) {
    const d = disk(9, params);
    await writeBackendNodes(xs, d);
    const r = await hook('add', d);
    assert.equal(r.code, 1, `${params}: ${explain(r)}`);
    assert.match(await xs.read(`${backendPath(d)}/hotplug-error`), re, params);
    await destroyNodes(xs, d);
  }
  assert.deepEqual(lvNames(), ['golden', 'tgolden', 'tpool']);
});

test('block-lvsnap handed to the resident service: the snapshot built and removed by the service, its writes its own, the origin unchanged', async () => {
  const wrappers = join(root, 'serve-wrappers');
  mkdirSync(wrappers, { recursive: true });
  const w = writeWrapper(wrappers, 'block-lvsnap');
  const chan = join(root, 'serve');
  const s = await startServe(chan, env);
  const e = { ...env, XEN_BLOCKHOOKS_SERVE_DIR: chan };
  try {
    const d = disk(41, `${VG}/golden 8M`, { domainName: 'served' });
    await writeBackendNodes(xs, d);
    const a = await runWrapper(w, 'add', backendPath(d), e);
    assert.equal(a.code, 0, explain(a));
    assert.equal(await xs.read(`${backendPath(d)}/hotplug-status`), 'connected');
    assert.equal(new Journal(stateDir).load(backendPath(d))?.pid, s.pid, "the record is the service's");
    assert.deepEqual(lvNames(), ['golden', 'tgolden', 'tpool', 'xbh-served-xvda']);
    const path = await xs.read(`${backendPath(d)}/physical-device-path`);
    assert.deepEqual(pread(path, 5 * MiB), block(5, 'golden'), 'reads the origin');
    pwrite(path, 4 * MiB, block(4, 'served'));
    assert.deepEqual(pread(path, 4 * MiB), block(4, 'served'), 'reads back what it wrote');
    await closeBackend(xs, d);
    const r = await runWrapper(w, 'remove', backendPath(d), e);
    assert.equal(r.code, 0, explain(r));
    await destroyNodes(xs, d);
  } finally {
    await s.stop();
  }
  assert.deepEqual(lvNames(), ['golden', 'tgolden', 'tpool'], 'no snapshot left');
  assert.equal(sha256File(originPath), originSum, 'origin unchanged');
});
