/**
 * `xen-blockhooks resize` of block-thin disks on a real kernel: a thin volume's virtual size is
 * its table's length, reloaded online. The data before the old end is unchanged, the new range
 * reads zeros and keeps what is written; --shrink is refused below the highest sector the guest
 * wrote and done above it; a persistent volume comes back at its new size, even when its params
 * name the old one. The base image is never written.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import type { DiskNodes } from '../lib/backend-nodes.js';
import { block, MiB, patternedImage, pread, pwrite, sh, sha256File } from '../lib/disk-io.js';
import { hookWorld } from '../lib/hook-world.js';
import { projectRoot } from '../lib/project-root.js';

const world = hookWorld({
  name: 'thin-resize',
  bundle: 'block-thin',
  env: { XEN_BLOCKHOOKS_THIN_DATA_SIZE: '64M', XEN_BLOCKHOOKS_THIN_METADATA_SIZE: '4M' },
});
const { images, logFile, env, addOk, removeOk } = world;
const CLI = join(projectRoot(), 'dist', 'xen-blockhooks.mjs');
const base = join(images, 'rootfs.img');
const BASE_MIB = 16;
const zeros = Buffer.alloc(4096);

let baseSum = '';

function disk(domid: number, params = base): DiskNodes {
  return {
    domid,
    devid: 51712,
    params,
    mode: 'w',
    vdev: 'xvda',
    domainName: `guest${domid}`,
    script: '/etc/xen/scripts/block-thin',
  };
}

function cli(...args: string[]): { code: number | null; out: string; err: string } {
  const r = spawnSync(process.execPath, [CLI, ...args], { env, encoding: 'utf8' });
  return { code: r.status, out: r.stdout, err: r.stderr };
}

const sizeOf = (dev: string) => Number(sh('blockdev', ['--getsize64', dev]));
const ourDevices = () =>
  sh('dmsetup', ['ls'])
    .split('\n')
    .filter((l) => l.startsWith('xbh-thin-'));

before(async () => {
  assert.ok(existsSync(CLI), `${CLI} is missing: run npm run build first`);
  await world.start();
  baseSum = patternedImage(base, BASE_MIB, 'base');
});

after(() => world.stop({ dmPrefixes: ['xbh-thin-', 'xbh-thinpool'] }));

test('a transient volume grows online; --shrink stops at the highest sector the guest wrote', async () => {
  const d = disk(5);
  const { path } = await addOk(d);
  assert.equal(sizeOf(path), BASE_MIB * MiB);
  pwrite(path, 1 * MiB, block(1, 'guest'));
  const r = cli('resize', 'guest5', 'xvda', '32M');
  assert.equal(r.code, 0, r.err);
  assert.match(r.out, /resized guest5\/xvda: 16.0M → 32.0M, online/);
  assert.equal(sizeOf(path), 32 * MiB, 'the device is larger at once');
  assert.deepEqual(pread(path, 1 * MiB, 4096), block(1, 'guest'), 'written data is unchanged');
  assert.deepEqual(pread(path, 2 * MiB, 4096), block(2, 'base'), 'unwritten data reads the base');
  for (const mib of [16, 24, 31])
    assert.deepEqual(pread(path, mib * MiB, 4096), zeros, `zeros past the base at ${mib} MiB`);
  pwrite(path, 24 * MiB, block(24, 'guest'));
  assert.deepEqual(pread(path, 24 * MiB, 4096), block(24, 'guest'));

  const tooSmall = cli('resize', 'guest5', 'xvda', '20M', '--shrink');
  assert.equal(tooSmall.code, 1);
  assert.match(tooSmall.err, /the guest wrote up to sector \d+ .* would cut it off: not shrunk/);
  assert.equal(sizeOf(path), 32 * MiB, 'a refusal changes nothing');
  const shrink = cli('resize', 'guest5', 'xvda', '28M', '--shrink');
  assert.equal(shrink.code, 0, shrink.err);
  assert.equal(sizeOf(path), 28 * MiB, 'shrunk above what the guest wrote');
  assert.deepEqual(pread(path, 24 * MiB, 4096), block(24, 'guest'), 'and what it wrote is there');
  await removeOk(d);
  assert.deepEqual(ourDevices(), [], 'no thin device left');
  assert.equal(sha256File(base), baseSum, 'the base image was never written');
});

test('a persistent volume comes back at its new size, even when its params name the old one', async () => {
  const d = disk(6, `${base} 16 persistent`);
  const { path } = await addOk(d);
  const r = cli('resize', 'guest6', 'xvda', '+16M');
  assert.equal(r.code, 0, r.err);
  pwrite(path, 20 * MiB, block(20, 'kept'));
  await removeOk(d);
  const { path: again } = await addOk(d);
  assert.equal(sizeOf(again), 32 * MiB, 'the size it was resized to');
  assert.deepEqual(pread(again, 20 * MiB, 4096), block(20, 'kept'), 'with the data written past the old end');
  assert.match(
    readFileSync(logFile, 'utf8'),
    /persistent thin volume .* is 32 MiB \(resized\), larger than the 16 MiB in its params; it keeps its size/,
  );
  await removeOk(d);
  const detached = cli('resize', 'guest6', `vdev=xvda,access=w,script=block-thin,target=${base} 16 persistent`, '40M');
  assert.equal(detached.code, 0, detached.err);
  assert.match(detached.out, /resized guest6's xvda \(not attached\): 32.0M → 40.0M/);
  const { path: third } = await addOk(d);
  assert.equal(sizeOf(third), 40 * MiB, 'not attached, its recorded size grew for the next add');
  assert.deepEqual(pread(third, 20 * MiB, 4096), block(20, 'kept'));
  await removeOk(d);
  assert.deepEqual(ourDevices(), [], 'no thin device left');
  assert.equal(sha256File(base), baseSum, 'the base image was never written');
});
