/**
 * block-thin with its pool on two LVs (thin.data_device, thin.metadata_device) instead of sparse
 * files: real LVM on a loop device, a real dm thin-pool, no pool files and no pool loops. Two
 * domains on one base, isolation, the pool's table on the LVs, growth by lvextend + reload,
 * teardown zeroing the metadata superblock (the next pool starts empty), the LVs kept; metadata
 * that is not a pool's refused with a sentence that says how to start afresh.
 * The hook runs in this process (fault-lib's hookInProcess): under TCG a node start costs seconds.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { closeSync, existsSync, openSync, readSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { thinBackend } from '../../src/backends/thin.js';
import { loadConfig } from '../../src/config/config.js';
import { parseStatus } from '../../src/devices/dmsetup.js';
import { execRunner } from '../../src/devices/exec.js';
import { growThinPool } from '../../src/backends/thin.js';
import { memoryLogger } from '../../src/log/logger.js';
import { census, hookInProcess } from '../lib/fault-lib.js';
import type { DiskNodes } from '../lib/backend-nodes.js';
import {
  MiB,
  backendPath,
  base,
  baseSum,
  block,
  closeBackend,
  destroyNodes,
  disk,
  env,
  pread,
  pwrite,
  root,
  sha256File,
  stateDir,
  storeDir,
  writeBackendNodes,
  xenLockDir,
  xs,
} from './cow-lib.js';
import { sh } from '../lib/disk-io.js';

const VG = 'xbhthinvg';
const DATA = `/dev/mapper/${VG}-tdata`;
const META = `/dev/mapper/${VG}-tmeta`;
const POOL = 'xbh-thinpool';
let pv = '';
const pvFile = join(root, 'thin-pv.img');
const lvEnv: NodeJS.ProcessEnv = {
  ...env,
  XEN_BLOCKHOOKS_THIN_DATA_DEVICE: DATA,
  XEN_BLOCKHOOKS_THIN_METADATA_DEVICE: META,
};

function majMin(dev: string): string {
  return sh('stat', ['-L', '-c', '%t:%T', dev])
    .split(':')
    .map((h) => String(parseInt(h, 16)))
    .join(':');
}

function firstBytes(dev: string, n: number): Buffer {
  const fd = openSync(dev, 'r');
  try {
    const b = Buffer.alloc(n);
    readSync(fd, b, 0, n, 0);
    return b;
  } finally {
    closeSync(fd);
  }
}

async function run(action: 'add' | 'remove', d: DiskNodes, e = lvEnv) {
  return hookInProcess(thinBackend, action, backendPath(d), e);
}

before(() => {
  writeFileSync(pvFile, '');
  truncateSync(pvFile, 96 * MiB);
  pv = sh('losetup', ['--find', '--show', '--', pvFile]);
  sh('lvm', ['pvcreate', '-q', pv]);
  sh('lvm', ['vgcreate', '-q', '-s', '4M', VG, pv]);
  sh('lvm', ['lvcreate', '-q', '-y', '-n', 'tdata', '-L', '32M', VG]);
  sh('lvm', ['lvcreate', '-q', '-y', '-n', 'tmeta', '-L', '4M', VG]);
  assert.ok(existsSync(DATA) && existsSync(META), 'the LVs have device nodes');
});

after(() => {
  spawnSync('dmsetup', ['remove', POOL], { stdio: 'ignore' });
  spawnSync('lvm', ['vgremove', '-q', '-f', VG], { stdio: 'ignore' });
  if (pv) spawnSync('lvm', ['pvremove', '-q', '-f', pv], { stdio: 'ignore' });
  if (pv) spawnSync('losetup', ['-d', pv]);
  rmSync(pvFile, { force: true });
});

test("pool on LVs: two domains, isolation, the pool's table on the LVs, no pool files or loops; growth by lvextend; teardown zeroes the metadata, keeps the LVs", async () => {
  const a = disk(71, { params: `${base}` });
  const b = disk(72, { params: `${base} 48` });
  for (const d of [a, b]) {
    await writeBackendNodes(xs, d);
    const r = await run('add', d);
    assert.equal(r.code, 0, `add ${backendPath(d)}: ${r.text}`);
  }
  const t = parseStatus(sh('dmsetup', ['table', POOL]))[0];
  assert.ok(t && t.target === 'thin-pool', 'the pool runs');
  const words = (t?.params ?? '').split(/\s+/);
  assert.deepEqual(words.slice(0, 2), [majMin(META), majMin(DATA)], 'its metadata and data devices are the LVs');
  assert.deepEqual(
    existsSync(storeDir)
      ? execFileSync('ls', [storeDir], { encoding: 'utf8' })
          .split('\n')
          .filter((f) => f.startsWith('thin-pool.') && !f.endsWith('.json'))
      : [],
    [],
    'no pool data or metadata file',
  );
  const loops = sh('losetup', ['-a'])
    .split('\n')
    .filter(Boolean)
    .filter((l) => !l.startsWith(`${pv}:`));
  assert.equal(loops.length, 1, `only the base loop besides the PV: ${loops.join(' | ')}`);

  const pa = await xs.read(`${backendPath(a)}/physical-device-path`);
  const pb = await xs.read(`${backendPath(b)}/physical-device-path`);
  pwrite(pa, 3 * MiB, block(3, 'a'));
  pwrite(pb, 3 * MiB, block(3, 'b'));
  assert.deepEqual(pread(pa, 3 * MiB, 4096), block(3, 'a'), 'a reads its own write');
  assert.deepEqual(pread(pb, 3 * MiB, 4096), block(3, 'b'), 'b reads its own write');
  assert.deepEqual(pread(pa, 5 * MiB, 4096), block(5, 'base'), 'a reads the base elsewhere');
  assert.deepEqual(pread(pb, 40 * MiB, 4096), Buffer.alloc(4096), 'b reads zeros past the base');

  const beforeSectors = BigInt(sh('blockdev', ['--getsz', DATA]));
  const log = memoryLogger();
  const grown = await growThinPool('data', undefined, { run: execRunner(lvEnv), config: loadConfig(lvEnv), log });
  const afterSectors = BigInt(sh('blockdev', ['--getsz', DATA]));
  assert.ok(afterSectors > beforeSectors, `lvextend grew the data LV (${beforeSectors} → ${afterSectors} sectors)`);
  assert.equal(grown.target, DATA);
  const t2 = parseStatus(sh('dmsetup', ['table', POOL]))[0];
  assert.ok(
    t2 && BigInt(t2.length) > BigInt(t?.length ?? 0),
    `the pool was reloaded longer (${t?.length} → ${t2?.length})`,
  );
  assert.deepEqual(pread(pa, 3 * MiB, 4096), block(3, 'a'), 'data survives the reload');

  for (const d of [a, b]) {
    await closeBackend(xs, d);
    const r = await run('remove', d);
    assert.equal(r.code, 0, `remove ${backendPath(d)}: ${r.text}`);
    await destroyNodes(xs, d);
  }
  assert.equal(
    spawnSync('dmsetup', ['info', POOL], { stdio: 'ignore' }).status !== 0,
    true,
    'the pool is gone with its last user',
  );
  assert.deepEqual(
    firstBytes(META, 4096),
    Buffer.alloc(4096),
    'the metadata superblock was zeroed (no persistent volumes)',
  );
  const lvs = sh('lvm', ['lvs', '--noheadings', '-o', 'lv_name', VG])
    .split('\n')
    .map((s) => s.trim())
    .filter(Boolean)
    .sort();
  assert.deepEqual(lvs, ['tdata', 'tmeta'], "the LVs are the administrator's: kept");
  assert.deepEqual(
    census({ storeDir, stateDir, xenLockDir, keepLoops: [pv], keepDms: [`${VG}-tdata`, `${VG}-tmeta`] }),
    [],
    'nothing left',
  );
  assert.equal(sha256File(base), baseSum, 'the base is unchanged');
});

test('a metadata device holding something else is refused with how to start afresh; nothing is left', async () => {
  // Random bytes where the pool's superblock would be.
  execFileSync('dd', ['if=/dev/urandom', `of=${META}`, 'bs=4096', 'count=1', 'conv=notrunc,fsync'], {
    stdio: 'ignore',
  });
  const d = disk(73, { params: `${base}` });
  await writeBackendNodes(xs, d);
  const r = await run('add', d);
  assert.equal(r.code, 1, r.text);
  const msg = await xs.read(`${backendPath(d)}/hotplug-error`);
  assert.match(
    msg,
    /would not start on .*tmeta .*zero its first 4 KiB \(dd if=\/dev\/zero of=.*tmeta bs=4096 count=1\)/,
    msg,
  );
  await destroyNodes(xs, d);
  assert.deepEqual(
    census({ storeDir, stateDir, xenLockDir, keepLoops: [pv], keepDms: [`${VG}-tdata`, `${VG}-tmeta`] }),
    [],
    'nothing left',
  );

  execFileSync('dd', ['if=/dev/zero', `of=${META}`, 'bs=4096', 'count=1', 'conv=notrunc,fsync'], { stdio: 'ignore' });
  await writeBackendNodes(xs, d);
  const ok = await run('add', d);
  assert.equal(ok.code, 0, `after zeroing, the pool starts: ${ok.text}`);
  await closeBackend(xs, d);
  assert.equal((await run('remove', d)).code, 0);
  await destroyNodes(xs, d);
});

test('only one of thin.data_device / thin.metadata_device: a configuration error, nothing built', async () => {
  const d = disk(74, { params: `${base}` });
  await writeBackendNodes(xs, d);
  const r = await run('add', d, { ...env, XEN_BLOCKHOOKS_THIN_DATA_DEVICE: DATA });
  assert.equal(r.code, 1);
  assert.match(r.text, /thin\.data_device and thin\.metadata_device go together/);
  await destroyNodes(xs, d);
  assert.deepEqual(
    census({ storeDir, stateDir, xenLockDir, keepLoops: [pv], keepDms: [`${VG}-tdata`, `${VG}-tmeta`] }),
    [],
  );
});
