/**
 * block-cow on a real kernel: two domains on one base, idempotence, persistent stores, both dialects,
 * and the refusals that depend on what the kernel already has attached. Bad params and bad base
 * images are refused before any device is touched: those are host tests (cow-params, hostile-cow).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { rmSync } from 'node:fs';
import { join } from 'node:path';
import {
  MiB,
  addOk,
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
  listDir,
  loopsOnBase,
  pread,
  pwrite,
  removeOk,
  sh,
  sha256File,
  storeDir,
  writeBackendNodes,
  xs,
  BASE_MIB,
} from './cow-lib.js';

test('two domains on one base: each sees only its own writes, the base never changes, one base loop serves both', async () => {
  const a = disk(1, { domainName: 'alpha' });
  const b = disk(2, { domainName: 'beta', params: `${base} 8M chunk=16K` });
  const da = await addOk(a);
  const db = await addOk(b);
  assert.notEqual(da.pd, db.pd);
  assert.match(da.path, /^\/dev\/(dm-\d+|mapper\/xbh-cow-alpha-xvda-51712)$/);
  assert.match(sh('dmsetup', ['ls']), /xbh-cow-alpha-xvda-51712/);
  assert.match(sh('dmsetup', ['ls']), /xbh-cow-beta-xvda-51712/);
  assert.deepEqual(loopsOnBase().length, 1, `one base loop: ${sh('losetup', ['-a'])}`);
  assert.equal(sh('blockdev', ['--getro', loopsOnBase()[0] as string]), '1', 'the base loop is read-only');
  assert.equal(sh('blockdev', ['--getsz', da.path]), String((BASE_MIB * MiB) / 512));
  const snapTable = sh('dmsetup', ['table', 'xbh-cow-beta-xvda-51712']).split(/\s+/);
  assert.deepEqual(
    snapTable.slice(2, 3).concat(snapTable.slice(5)),
    ['snapshot', 'N', '32'],
    `table ${snapTable.join(' ')}`,
  );

  pwrite(da.path, 3 * MiB, block(3, 'alpha'));
  pwrite(db.path, 3 * MiB, block(3, 'beta'));
  pwrite(db.path, 9 * MiB + 4096, block(9, 'beta'));
  assert.deepEqual(pread(da.path, 3 * MiB, 4096), block(3, 'alpha'));
  assert.deepEqual(pread(db.path, 3 * MiB, 4096), block(3, 'beta'));
  assert.deepEqual(pread(da.path, 9 * MiB, 4096), block(9, 'base'), 'alpha still reads the base where beta wrote');
  assert.deepEqual(pread(da.path, 9 * MiB + 4096, 4096), Buffer.alloc(4096), 'alpha reads base zeros where beta wrote');
  assert.deepEqual(pread(db.path, 7 * MiB, 4096), block(7, 'base'));
  assert.equal(sha256File(base), baseSum, 'base unchanged');

  const stores = listDir(storeDir);
  assert.deepEqual(stores, ['transient-1-51712.cow', 'transient-2-51712.cow']);
  const st = sh('stat', ['-c', '%a %s %b', join(storeDir, stores[0] as string)]).split(' ');
  assert.equal(st[0], '600');
  assert.equal(Number(st[1]), 16 * MiB);
  assert.ok(Number(st[2]) * 512 < 16 * MiB, 'store is sparse');
  assert.equal(sh('stat', ['-c', '%a', storeDir]), '700');

  await removeOk(a);
  assert.equal(loopsOnBase().length, 1, 'base loop stays while beta uses it');
  assert.deepEqual(pread(db.path, 3 * MiB, 4096), block(3, 'beta'));
  await removeOk(b);
  assert.deepEqual(leftovers(), []);
  assert.equal(sha256File(base), baseSum, 'base unchanged');
});

test('add twice is idempotent; remove twice succeeds; remove of a never-built device succeeds', async () => {
  const d = disk(3);
  const first = await addOk(d);
  const dmBefore = sh('dmsetup', ['ls']);
  const loopsBefore = sh('losetup', ['-a']);
  const again = await hook('add', d);
  assert.equal(again.code, 0, explain(again));
  assert.equal(await xs.read(`${backendPath(d)}/physical-device`), first.pd);
  assert.equal(sh('dmsetup', ['ls']), dmBefore);
  assert.equal(sh('losetup', ['-a']), loopsBefore);
  await closeBackend(xs, d);
  const r1 = await hook('remove', d);
  assert.equal(r1.code, 0, explain(r1));
  const r2 = await hook('remove', d);
  assert.equal(r2.code, 0, explain(r2));
  await destroyNodes(xs, d);
  const r3 = await hook('remove', d);
  assert.equal(r3.code, 0, `remove with no nodes and no record: ${explain(r3)}`);

  const never = disk(4);
  await writeBackendNodes(xs, never);
  const r4 = await hook('remove', never);
  assert.equal(r4.code, 0, explain(r4));
  await destroyNodes(xs, never);
  assert.deepEqual(leftovers(), []);
});

test('a persistent store keeps its data across remove and add, and is never handed to a second writer', async () => {
  const d = disk(7, { domainName: 'keeper', params: `${base} 8 persistent` });
  const one = await addOk(d);
  const table = sh('dmsetup', ['table', 'xbh-cow-keeper-xvda-51712']).split(/\s+/);
  assert.equal(table[5], 'P');
  pwrite(one.path, 5 * MiB, block(5, 'kept'));
  await removeOk(d);
  assert.deepEqual(leftovers(['keeper-xvda.cow']), []);
  assert.deepEqual(listDir(storeDir), ['keeper-xvda.cow']);

  const two = await addOk({ ...d, domid: 8 });
  assert.deepEqual(pread(two.path, 5 * MiB, 4096), block(5, 'kept'), 'data survived remove/add');
  assert.deepEqual(pread(two.path, 6 * MiB, 4096), block(6, 'base'));

  const intruder = disk(9, { params: `${base} 8 store=keeper-xvda.cow` });
  await writeBackendNodes(xs, intruder);
  const r = await hook('add', intruder);
  assert.equal(r.code, 1, explain(r));
  assert.equal(await xs.read(`${backendPath(intruder)}/hotplug-status`), 'busy');
  const err = await xs.read(`${backendPath(intruder)}/hotplug-error`);
  assert.match(err, /keeper-xvda\.cow is already in use by \/dev\/loop\d+ \(disk backend\/vbd\/8\/51712\)/);
  assert.equal(await xs.tryRead(`${backendPath(intruder)}/physical-device`), undefined);
  await removeOk(intruder);
  assert.deepEqual(pread(two.path, 5 * MiB, 4096), block(5, 'kept'), 'the refused add did not disturb the store');
  await removeOk({ ...d, domid: 8 });
  assert.deepEqual(leftovers(['keeper-xvda.cow']), []);
  rmSync(join(storeDir, 'keeper-xvda.cow'));
});

test('xend dialect (create/destroy, type=cow) and access=r', async () => {
  const x = disk(10, { dialect: 'xend', vdev: 'sda1', devid: 2049, params: `${base} 30` });
  const dx = await addOk(x);
  assert.match(sh('dmsetup', ['ls']), /xbh-cow-guest10-sda1-2049/);
  pwrite(dx.path, 0, block(0, 'xend'));
  assert.deepEqual(pread(dx.path, 0, 4096), block(0, 'xend'));
  await removeOk(x);

  const r = disk(11, { mode: 'r' });
  const dr = await addOk(r);
  assert.equal(sh('blockdev', ['--getro', dr.path]), '1', 'access=r gives a read-only device');
  assert.deepEqual(pread(dr.path, 2 * MiB, 4096), block(2, 'base'));
  assert.deepEqual(listDir(storeDir), [], 'access=r needs no store');
  assert.match(sh('dmsetup', ['table', 'xbh-cow-guest11-xvda-51712']), /linear/);
  await removeOk(r);
  assert.deepEqual(leftovers(), []);
  assert.equal(sha256File(base), baseSum);
});

test('a base attached writable elsewhere is refused as busy, and nothing is built', async () => {
  const rw = sh('losetup', ['--find', '--show', '--', base]);
  try {
    const d = disk(12);
    await writeBackendNodes(xs, d);
    const r = await hook('add', d);
    assert.equal(r.code, 1, explain(r));
    assert.equal(await xs.read(`${backendPath(d)}/hotplug-status`), 'busy');
    assert.match(await xs.read(`${backendPath(d)}/hotplug-error`), new RegExp(`attached writable to ${rw}`));
    await destroyNodes(xs, d);
  } finally {
    sh('losetup', ['-d', rw]);
  }
  assert.deepEqual(leftovers(), []);
});
