/**
 * block-qcow on a real kernel with real nbd: the bundled hook (dist/block-qcow.mjs) run as a child
 * process against an in-process xenstore, as libxl runs it.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { rmSync } from 'node:fs';
import { join } from 'node:path';
import {
  MiB,
  addOk,
  assertClean,
  block,
  disk,
  img,
  makeWorld,
  patternedRaw,
  pread,
  pwrite,
  removeOk,
  sha256File,
  sh,
  type World,
} from './qcow-lib.js';

let w: World;
before(async () => {
  w = await makeWorld('qcow-hook');
});
after(async () => {
  await w?.close();
});

test('qcow2 direct: access=w writes into the image itself, access=r exports it read-only', async () => {
  const image = join(w.images, 'direct.qcow2');
  img('create', '-q', '-f', 'qcow2', image, '64M');
  const d = disk(11, image);
  const a = await addOk(w, d);
  assert.equal(sh('blockdev', ['--getsize64', a.device]), String(64 * MiB));
  assert.equal(readAttr(a.device, 'ro'), '0');
  pwrite(a.device, 3 * MiB, block(3, 'direct'));
  assert.deepEqual(pread(a.device, 3 * MiB, 4096), block(3, 'direct'));
  await removeOk(w, d);
  assertClean(w, 'after direct remove');
  // The write is in the image: read it back through qemu-img's own view, then through an r export.
  assert.equal(sh('qemu-img', ['compare', '-f', 'qcow2', '-F', 'qcow2', image, image]), 'Images are identical.');
  const r = disk(12, image, { mode: 'r' });
  const b = await addOk(w, r);
  assert.equal(readAttr(b.device, 'ro'), '1', 'access=r gives a read-only device');
  assert.deepEqual(pread(b.device, 3 * MiB, 4096), block(3, 'direct'), 'the direct write reached the image');
  await removeOk(w, r);
  assertClean(w, 'after read-only remove');
  rmSync(image);
});

function readAttr(device: string, attr: string): string {
  return sh('cat', [`/sys/block/${device.replace('/dev/', '')}/${attr}`]);
}

test('overlay=transient on a raw base: two domains each see only their own writes; the base never changes', async () => {
  const base = join(w.images, 'base.raw');
  patternedRaw(base, 32, 'base');
  const sum = sha256File(base);
  const da = disk(21, `${base} overlay=transient`);
  const db = disk(22, `${base} overlay=transient`);
  const a = await addOk(w, da);
  const b = await addOk(w, db);
  assert.notEqual(a.device, b.device);
  assert.deepEqual(pread(a.device, 5 * MiB, 4096), block(5, 'base'), 'reads come from the base');
  pwrite(a.device, 2 * MiB, block(2, 'domain-a'));
  pwrite(b.device, 2 * MiB, block(2, 'domain-b'));
  assert.deepEqual(pread(a.device, 2 * MiB, 4096), block(2, 'domain-a'), 'a sees its own write');
  assert.deepEqual(pread(b.device, 2 * MiB, 4096), block(2, 'domain-b'), 'b sees its own write');
  assert.deepEqual(pread(b.device, 5 * MiB, 4096), block(5, 'base'));
  assert.equal(sha256File(base), sum, 'base unchanged while in use');
  // qemu-nbd holds the base read-only: no writable descriptor on it.
  const pids = sh('pgrep', ['-x', 'qemu-nbd']).split('\n');
  assert.equal(pids.length, 2, 'one daemon per disk');
  for (const pid of pids) {
    const fdinfo = sh('ls', ['-l', `/proc/${pid}/fd`])
      .split('\n')
      .filter((l) => l.endsWith(base));
    assert.ok(fdinfo.length >= 1, 'the daemon has the base open');
    for (const l of fdinfo) assert.match(l, /^lr-x/, `base opened read-only: ${l}`);
  }
  await removeOk(w, da);
  await removeOk(w, db);
  assert.equal(sha256File(base), sum, 'base unchanged after both domains');
  assertClean(w, 'after two transient overlays');
  rmSync(base);
});

test('overlay on a qcow2 base with a raw backing file (a two-file chain)', async () => {
  const raw = join(w.images, 'chain-bottom.raw');
  const mid = join(w.images, 'chain-mid.qcow2');
  patternedRaw(raw, 16, 'bottom');
  img('create', '-q', '-f', 'qcow2', '-b', raw, '-F', 'raw', mid);
  // One block changed in the qcow2 layer (written with qemu-io: the layer is not guest data).
  sh('qemu-io', ['-f', 'qcow2', '-c', `write -P 0x5a ${7 * MiB} 4096`, mid]);
  const sums = [sha256File(raw), sha256File(mid)];
  const d = disk(31, `${mid} overlay=transient`);
  const a = await addOk(w, d);
  assert.deepEqual(pread(a.device, 1 * MiB, 4096), block(1, 'bottom'), 'raw bottom shows through');
  assert.deepEqual(pread(a.device, 7 * MiB, 4096), Buffer.alloc(4096, 0x5a), 'qcow2 middle layer shows through');
  pwrite(a.device, 7 * MiB, block(7, 'top'));
  assert.deepEqual(pread(a.device, 7 * MiB, 4096), block(7, 'top'));
  await removeOk(w, d);
  assert.deepEqual([sha256File(raw), sha256File(mid)], sums, 'neither backing file changed');
  assertClean(w, 'after chain overlay');
  // Direct read-only export of the qcow2 with its raw backing works too.
  const r = disk(32, mid, { mode: 'r' });
  const b = await addOk(w, r);
  assert.deepEqual(pread(b.device, 7 * MiB, 4096), Buffer.alloc(4096, 0x5a));
  await removeOk(w, r);
  assertClean(w, 'after chain direct r');
  rmSync(raw);
  rmSync(mid);
});
