/**
 * block-qcow under concurrency, on a real kernel with real nbd: 8 adds at once on one base (the
 * nbd allocation must hand out 8 different devices), each disk sees its own writes, 8 removes at
 * once leave nothing.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import {
  MiB,
  addOk,
  assertClean,
  block,
  disk,
  makeWorld,
  patternedRaw,
  pread,
  pwrite,
  removeOk,
  sha256File,
  type World,
} from './qcow-lib.js';

let w: World;
before(async () => {
  w = await makeWorld('qcow-concurrent');
});
after(async () => {
  await w?.close();
  if (w)
    process.stderr.write(
      `hook log:\n${readFileSync(join(w.root, 'hook.log'), 'utf8').split('\n').slice(-40).join('\n')}\n`,
    );
});

test('8 concurrent adds on one base, then 8 concurrent removes', async () => {
  const base = join(w.images, 'many.raw');
  patternedRaw(base, 16, 'many');
  const sum = sha256File(base);
  const disks = Array.from({ length: 8 }, (_, i) => disk(100 + i, `${base} overlay=transient`));
  const t0 = Date.now();
  const added = await Promise.all(
    disks.map(async (d) => {
      const a = await addOk(w, d);
      process.stderr.write(`add ${d.domid}: ${a.device} after ${Date.now() - t0} ms (hook ${a.run.ms} ms)\n`);
      return a;
    }),
  );
  const devices = added.map((a) => a.device);
  assert.equal(new Set(devices).size, 8, `eight different nbd devices: ${devices.join(' ')}`);
  added.forEach((a, i) => pwrite(a.device, 1 * MiB, block(i, 'writer')));
  added.forEach((a, i) =>
    assert.deepEqual(pread(a.device, 1 * MiB, 4096), block(i, 'writer'), `disk ${i} reads its own write`),
  );
  await Promise.all(
    disks.map(async (d) => {
      await removeOk(w, d);
      process.stderr.write(`remove ${d.domid} after ${Date.now() - t0} ms\n`);
    }),
  );
  assert.equal(sha256File(base), sum);
  assertClean(w, 'after 8 removes');
  rmSync(base);
});
