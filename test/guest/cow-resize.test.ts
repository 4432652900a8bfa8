/**
 * `xen-blockhooks resize` of block-cow disks on a real kernel: a disk grows past its base through
 * a tail file mapped after the snapshot, online. The data before the old end is unchanged, the new
 * range reads zeros and keeps what is written there, a persistent disk comes back at its new size
 * (with its data) after remove and add, nothing ever shrinks, remove leaves nothing of a transient
 * disk, and the base image is never written.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { rmSync } from 'node:fs';
import { join } from 'node:path';
import { projectRoot } from '../lib/project-root.js';
import {
  addOk,
  base,
  baseSum,
  BASE_MIB,
  block,
  disk,
  env,
  leftovers,
  listDir,
  MiB,
  pread,
  pwrite,
  removeOk,
  sh,
  sha256File,
  storeDir,
} from './cow-lib.js';

const CLI = join(projectRoot(), 'dist', 'xen-blockhooks.mjs');

function cli(...args: string[]): { code: number | null; out: string; err: string } {
  const r = spawnSync(process.execPath, [CLI, ...args], { env, encoding: 'utf8' });
  return { code: r.status, out: r.stdout, err: r.stderr };
}

function sizeOf(dev: string): number {
  return Number(sh('blockdev', ['--getsize64', dev]));
}

const zeros = Buffer.alloc(4096);

test('a transient disk grows past its base twice, online: old data kept, new range zeros and writable; remove leaves nothing', async () => {
  const d = disk(5);
  const { path } = await addOk(d);
  assert.equal(sizeOf(path), BASE_MIB * MiB, 'as large as the base at first');
  pwrite(path, 1 * MiB, block(1, 'guest'));
  pwrite(path, (BASE_MIB - 1) * MiB, block(31, 'guest'));

  const r = cli('resize', 'guest5', 'xvda', `${BASE_MIB + 16}M`);
  assert.equal(r.code, 0, r.err);
  assert.match(r.out, /resized guest5\/xvda: 32.0M → 48.0M, online \(.*transient-5-51712.cow.tail made/);
  assert.equal(sizeOf(path), (BASE_MIB + 16) * MiB, 'the device is larger at once');
  const table = sh('dmsetup', ['table', 'xbh-cow-guest5-xvda-51712']).split('\n');
  assert.equal(table.length, 2, `two ranges: ${table.join(' | ')}`);
  assert.match(table[0] as string, /^0 65536 snapshot /);
  assert.match(table[1] as string, /^65536 32768 linear /);
  assert.deepEqual(pread(path, 1 * MiB, 4096), block(1, 'guest'), 'written data before the old end is unchanged');
  assert.deepEqual(pread(path, (BASE_MIB - 1) * MiB, 4096), block(31, 'guest'));
  assert.deepEqual(pread(path, 2 * MiB, 4096), block(2, 'base'), 'unwritten data reads the base');
  for (const mib of [BASE_MIB, BASE_MIB + 8, BASE_MIB + 15])
    assert.deepEqual(pread(path, mib * MiB, 4096), zeros, `the new range reads zeros at ${mib} MiB`);
  pwrite(path, (BASE_MIB + 8) * MiB, block(40, 'guest'));
  assert.deepEqual(pread(path, (BASE_MIB + 8) * MiB, 4096), block(40, 'guest'), 'the new range keeps what is written');

  const again = cli('resize', 'guest5', 'xvda', '+16M');
  assert.equal(again.code, 0, again.err);
  assert.equal(sizeOf(path), (BASE_MIB + 32) * MiB);
  assert.deepEqual(pread(path, (BASE_MIB + 8) * MiB, 4096), block(40, 'guest'), 'the tail kept its data as it grew');
  assert.deepEqual(
    pread(path, 1 * MiB, 4096),
    block(1, 'guest'),
    'the snapshot kept its exceptions through the reload',
  );
  assert.match(
    sh('dmsetup', ['status', 'xbh-cow-guest5-xvda-51712']).split('\n')[0] as string,
    /snapshot \d+\/\d+ \d+$/,
    'the snapshot is still valid',
  );

  const smaller = cli('resize', 'guest5', 'xvda', '40M');
  assert.equal(smaller.code, 1);
  assert.match(smaller.err, /is smaller: give --shrink/);
  const shrink = cli('resize', 'guest5', 'xvda', '40M', '--shrink');
  assert.equal(shrink.code, 1);
  assert.match(shrink.err, /block-cow never shrinks a disk/);
  assert.equal(sizeOf(path), (BASE_MIB + 32) * MiB, 'a refusal changes nothing');

  await removeOk(d);
  assert.deepEqual(leftovers(), [], 'the transient store and its tail are gone with the disk');
  assert.equal(sha256File(base), baseSum, 'the base image was never written');
});

test('a persistent disk comes back at its new size, with its data, after remove and add', async () => {
  const d = disk(6, { params: `${base} 16 persistent` });
  const first = await addOk(d);
  pwrite(first.path, 3 * MiB, block(3, 'kept'));
  const r = cli('resize', 'guest6', 'xvda', '+8M');
  assert.equal(r.code, 0, r.err);
  pwrite(first.path, (BASE_MIB + 4) * MiB, block(36, 'kept'));
  await removeOk(d);
  const kept = listDir(storeDir);
  assert.ok(
    kept.some((f) => f.endsWith('.tail')),
    `the tail is kept with the store: ${kept.join(', ')}`,
  );

  const second = await addOk(d);
  assert.equal(sizeOf(second.path), (BASE_MIB + 8) * MiB, 'the same size as before the remove');
  assert.deepEqual(pread(second.path, 3 * MiB, 4096), block(3, 'kept'), 'the base range kept its changes');
  assert.deepEqual(pread(second.path, (BASE_MIB + 4) * MiB, 4096), block(36, 'kept'), 'the tail kept its data');
  assert.deepEqual(pread(second.path, (BASE_MIB + 6) * MiB, 4096), zeros);
  await removeOk(d);

  // Not attached: named by its domain and spec, the tail grows in place for the next add.
  const spec = `vdev=xvda,access=w,script=block-cow,target=${base} 16 persistent`;
  const attachedRefused = await (async () => {
    await addOk(d);
    const r = cli('resize', 'guest6', spec, '64M');
    await removeOk(d);
    return r;
  })();
  assert.equal(attachedRefused.code, 1, 'by spec while attached: refused');
  assert.match(attachedRefused.err, /is attached .*: give its VDEV instead of its spec/);
  const detached = cli('resize', 'guest6', spec, '64M');
  assert.equal(detached.code, 0, detached.err);
  assert.match(detached.out, /resized guest6's xvda \(not attached\): 40.0M → 64.0M/);
  const third = await addOk(d);
  assert.equal(sizeOf(third.path), 64 * MiB, 'the next add has the size given while it was not attached');
  assert.deepEqual(pread(third.path, (BASE_MIB + 4) * MiB, 4096), block(36, 'kept'), 'with its data');
  await removeOk(d);
  assert.equal(
    cli('resize', 'guest6', `vdev=xvda,access=w,script=block-cow,target=${base} 16`, '64M').code,
    1,
    'a transient disk by spec: refused',
  );
  assert.deepEqual(leftovers(kept), [], 'nothing but the persistent store, its tail and its claim');
  assert.equal(sha256File(base), baseSum, 'the base image was never written');
  for (const f of kept) rmSync(join(storeDir, f), { recursive: true, force: true });
});

test('a read-only disk and an unknown disk are refused, and nothing changes', async () => {
  const d = disk(7, { mode: 'r' });
  const { path } = await addOk(d);
  const r = cli('resize', 'guest7', 'xvda', '+8M');
  assert.equal(r.code, 1);
  assert.match(r.err, /read-only disk over its base/);
  assert.equal(sizeOf(path), BASE_MIB * MiB);
  const none = cli('resize', 'nobody', 'xvdb', '+8M');
  assert.equal(none.code, 1);
  assert.match(none.err, /no device recorded for domain nobody, vdev xvdb/);
  await removeOk(d);
  assert.deepEqual(leftovers(), []);
});
