/** block-cow on a real kernel: 16 concurrent adds on one base, then 16 concurrent removes. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  MiB,
  backendPath,
  base,
  baseSum,
  block,
  closeBackend,
  destroyNodes,
  disk,
  explain,
  hook,
  leftovers,
  loopsOnBase,
  pread,
  pwrite,
  sh,
  sha256File,
  writeBackendNodes,
  xs,
} from './cow-lib.js';

test('16 concurrent adds on one base, then 16 concurrent removes: all succeed, nothing left', async () => {
  const disks = Array.from({ length: 16 }, (_, i) => disk(100 + i, { params: `${base} 4` }));
  for (const d of disks) await writeBackendNodes(xs, d);
  const t0 = Date.now();
  const adds = await Promise.all(disks.map((d) => hook('add', d)));
  process.stdout.write(`# 16 concurrent adds finished after ${Date.now() - t0} ms\n`);
  adds.forEach((r, i) => assert.equal(r.code, 0, `add ${i}: ${explain(r)}`));
  const pds = await Promise.all(disks.map((d) => xs.read(`${backendPath(d)}/physical-device`)));
  assert.equal(new Set(pds).size, 16);
  assert.equal(loopsOnBase().length, 1, `one base loop: ${sh('losetup', ['-a'])}`);
  const paths = await Promise.all(disks.map((d) => xs.read(`${backendPath(d)}/physical-device-path`)));
  paths.forEach((p, i) => pwrite(p, i * MiB, block(i, 'many')));
  paths.forEach((p, i) => assert.deepEqual(pread(p, i * MiB, 4096), block(i, 'many')));
  for (const d of disks) await closeBackend(xs, d);
  const t1 = Date.now();
  const removes = await Promise.all(disks.map((d) => hook('remove', d)));
  process.stdout.write(`# 16 concurrent removes finished after ${Date.now() - t1} ms\n`);
  removes.forEach((r, i) => assert.equal(r.code, 0, `remove ${i}: ${explain(r)}`));
  for (const d of disks) await destroyNodes(xs, d);
  assert.deepEqual(leftovers(), []);
  assert.equal(sha256File(base), baseSum);
  const ms = adds.map((r) => r.ms).sort((x, y) => x - y);
  process.stdout.write(`# 16 concurrent adds: slowest ${ms[15]} ms, median ${ms[8]} ms\n`);
});
