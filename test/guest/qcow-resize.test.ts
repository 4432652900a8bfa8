/**
 * `xen-blockhooks resize` of block-qcow disks on a real kernel: qemu-nbd serves a fixed size, so a
 * persistent overlay's new size is recorded and applied (qemu-img resize) at its next add, with
 * its data; a transient overlay and an image served directly are refused; the base never changes.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { projectRoot } from '../lib/project-root.js';
import {
  addOk,
  assertClean,
  block,
  disk,
  makeWorld,
  MiB,
  patternedRaw,
  pread,
  pwrite,
  removeOk,
  sh,
  sha256File,
  type World,
} from './qcow-lib.js';

const CLI = join(projectRoot(), 'dist', 'xen-blockhooks.mjs');
let w: World;
let base: string;
let baseSum: string;

function cli(...args: string[]): { code: number | null; out: string; err: string } {
  const r = spawnSync(process.execPath, [CLI, ...args], { env: w.env, encoding: 'utf8' });
  return { code: r.status, out: r.stdout, err: r.stderr };
}

const sizeOf = (dev: string) => Number(sh('blockdev', ['--getsize64', dev]));

before(async () => {
  w = await makeWorld(`qcow-resize-${process.pid}`);
  base = join(w.images, 'base.raw');
  patternedRaw(base, 16, 'base');
  baseSum = sha256File(base);
});

after(async () => {
  await w?.close();
});

test('a persistent overlay is resized at its next add, with its data; the running disk keeps its size until then', async () => {
  const d = disk(5, `${base} overlay=persistent format=raw`);
  const first = await addOk(w, d);
  pwrite(first.device, 2 * MiB, block(2, 'guest'));
  const r = cli('resize', 'dom5', 'xvda', '+16M');
  assert.equal(r.code, 0, r.err);
  assert.match(r.out, /resized dom5\/xvda: 16.0M → 32.0M, at its next add/);
  assert.equal(sizeOf(first.device), 16 * MiB, 'qemu-nbd still serves the old size');
  const overlays = readdirSync(join(w.store, 'qcow'));
  assert.ok(
    overlays.some((f) => f.endsWith('.qcow2.resize')),
    `the size is recorded next to the overlay: ${overlays.join(', ')}`,
  );
  await removeOk(w, d);

  const second = await addOk(w, d);
  assert.equal(sizeOf(second.device), 32 * MiB, 'the next add serves the new size');
  assert.deepEqual(pread(second.device, 2 * MiB, 4096), block(2, 'guest'), 'the overlay kept its data');
  assert.deepEqual(pread(second.device, 3 * MiB, 4096), block(3, 'base'), 'the base shows through');
  assert.deepEqual(pread(second.device, 20 * MiB, 4096), Buffer.alloc(4096), 'the new range reads zeros');
  assert.ok(!readdirSync(join(w.store, 'qcow')).some((f) => f.endsWith('.resize')), 'the recorded size is used up');
  await removeOk(w, d);
  const kept = readdirSync(join(w.store, 'qcow'));
  assertClean(w, 'after the persistent disk', kept);
  assert.equal(sha256File(base), baseSum, 'the base image was never written');
});

test('a transient overlay and an image served directly are refused, and nothing is recorded', async () => {
  const t1 = disk(6, `${base} overlay=transient format=raw`);
  const a = await addOk(w, t1);
  const r = cli('resize', 'dom6', 'xvda', '+16M');
  assert.equal(r.code, 1);
  assert.match(r.err, /a transient overlay \(a new one is made at every add\)/);
  assert.equal(sizeOf(a.device), 16 * MiB);
  await removeOk(w, t1);

  const copy = join(w.images, 'direct.raw');
  patternedRaw(copy, 8, 'direct');
  const t2 = disk(7, `${copy} format=raw`);
  await addOk(w, t2);
  const direct = cli('resize', 'dom7', 'xvda', '+8M');
  assert.equal(direct.code, 1);
  assert.match(direct.err, /no overlay \(resize the image with qemu-img while no domain uses it\)/);
  await removeOk(w, t2);
  assert.ok(
    !existsSync(join(w.store, 'qcow')) || !readdirSync(join(w.store, 'qcow')).some((f) => f.endsWith('.resize')),
    'nothing recorded',
  );
  assert.equal(sha256File(base), baseSum);
});
