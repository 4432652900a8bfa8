/**
 * block-qcow sharing and refusals on a real kernel with real nbd: the bundled hook (dist/block-qcow.mjs) run as a child
 * process against an in-process xenstore, as libxl runs it.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import {
  MiB,
  addOk,
  add,
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
  type World,
} from './qcow-lib.js';

let w: World;
before(async () => {
  w = await makeWorld('qcow-share');
});
after(async () => {
  await w?.close();
});

test("overlay=persistent keeps the domain's writes across remove and add", async () => {
  const base = join(w.images, 'pbase.raw');
  patternedRaw(base, 16, 'pbase');
  const sum = sha256File(base);
  const d1 = disk(41, `${base} overlay=persistent`, { domainName: 'keeper', vdev: 'xvdb' });
  const a = await addOk(w, d1);
  pwrite(a.device, 4 * MiB, block(4, 'kept'));
  await removeOk(w, d1);
  const overlay = join(w.store, 'qcow', 'keeper-xvdb.qcow2');
  assert.ok(existsSync(overlay), 'the persistent overlay stays');
  assertClean(w, 'after persistent remove', ['keeper-xvdb.qcow2']);
  const d2 = disk(42, `${base} overlay=persistent`, { domainName: 'keeper', vdev: 'xvdb' });
  const b = await addOk(w, d2);
  assert.deepEqual(pread(b.device, 4 * MiB, 4096), block(4, 'kept'), 'the write came back');
  // A second writer of the same persistent overlay is refused while it is in use.
  const d3 = disk(43, `${base} overlay=persistent`, { domainName: 'keeper', vdev: 'xvdb' });
  const c = await add(w, d3);
  assert.equal(c.run.code, 1);
  assert.equal(await w.xs.tryRead(`${c.be}/hotplug-status`), 'busy');
  assert.match(
    (await w.xs.tryRead(`${c.be}/hotplug-error`)) ?? '',
    /keeper-xvdb\.qcow2 cannot be given writable: it is in use by backend\/vbd\/42\/\d+ \(domain keeper\)/,
  );
  await removeOk(w, d2);
  await removeOk(w, d3);
  assert.equal(sha256File(base), sum);
  rmSync(overlay);
  assertClean(w, 'after persistent test');
  rmSync(base);
});

test('a writer is refused (busy, naming the other disk) on an image other domains use as their base', async () => {
  const base = join(w.images, 'shared.raw');
  patternedRaw(base, 8, 'shared');
  const ro = disk(51, `${base} overlay=transient`, { domainName: 'reader' });
  await addOk(w, ro);
  const wr = disk(52, base);
  const x = await add(w, wr);
  assert.equal(x.run.code, 1);
  assert.equal(await w.xs.tryRead(`${x.be}/hotplug-status`), 'busy');
  assert.match(
    (await w.xs.tryRead(`${x.be}/hotplug-error`)) ?? '',
    /shared\.raw cannot be given writable: it is in use by backend\/vbd\/51\/\d+ \(domain reader\)/,
  );
  await removeOk(w, wr);
  await removeOk(w, ro);
  assertClean(w, 'after busy refusal');
  rmSync(base);
});

test('a backing file outside the allowed directories is refused with a clear hotplug-error', async () => {
  const secret = join(w.outside, 'secret.raw');
  patternedRaw(secret, 4, 'secret');
  const evil = join(w.images, 'evil.qcow2');
  img('create', '-q', '-f', 'qcow2', '-b', secret, '-F', 'raw', evil);
  for (const [i, params] of [`${evil} overlay=transient`, evil].entries()) {
    const d = disk(61 + i, params);
    const x = await add(w, d);
    assert.equal(x.run.code, 1, 'exit 1');
    assert.equal(await w.xs.tryRead(`${x.be}/hotplug-status`), 'error');
    assert.match(
      (await w.xs.tryRead(`${x.be}/hotplug-error`)) ?? '',
      /backing file .*secret\.raw .*lies outside the allowed image directories/,
    );
    assert.equal(await w.xs.tryRead(`${x.be}/physical-device`), undefined);
    assertClean(w, `after refusing ${params}`);
    await removeOk(w, d);
  }
  rmSync(evil);
  rmSync(secret);
});
