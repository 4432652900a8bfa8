/**
 * The bundled `block` hook on file: disks, run as libxl runs it, against real loop devices.
 */
import t from 'tap';
import { spawn } from 'node:child_process';
import { chmodSync, closeSync, existsSync, mkdirSync, openSync, readdirSync, symlinkSync, unlinkSync } from 'node:fs';
import { join } from 'node:path';
import { paramsSource } from '../../src/backends/index.js';
import { Journal } from '../../src/journal/journal.js';
import { harness, harnessLoops, hexOf, identity } from '../lib/block-harness.js';

t.setTimeout(180_000);

for (const mode of ['w', 'r'] as const) {
  t.test(`file: add and remove, mode ${mode}`, async (t) => {
    const h = await harness(t);
    const img = h.image(`disk-${mode}.img`);
    const be = await h.disk({ domid: 5, devid: 51712, params: img, mode });
    const add = await h.run('add', be);
    t.equal(add.code, 0, `add exits 0 (stderr: ${add.stderr})`);
    const node = await h.read(`${be}/node`);
    t.match(node, /^\/dev\/loop\d+$/, 'node names the loop device');
    t.equal(await h.read(`${be}/physical-device-path`), node, 'physical-device-path is the loop device');
    t.equal(await h.read(`${be}/physical-device`), hexOf(node as string), 'physical-device is its major:minor in hex');
    t.equal(await h.read(`${be}/hotplug-status`), 'connected');
    t.equal(await h.read(`${be}/hotplug-error`), undefined, 'no hotplug-error');
    const mine = h.loopsOnImages();
    t.same(
      mine.map((l) => l.name),
      [node],
      'exactly one loop over the image, the one reported',
    );
    t.equal(mine[0]?.ro, mode === 'r', `the loop is ${mode === 'r' ? 'read-only' : 'writable'}`);
    t.ok(readdirSync(join(h.stateDir, 'journal')).length === 1, 'a journal record exists');

    const rm = await h.run('remove', be);
    t.equal(rm.code, 0, `remove exits 0 (stderr: ${rm.stderr})`);
    t.same(h.loopsOnImages(), [], 'the loop is detached');
    t.same(readdirSync(join(h.stateDir, 'journal')), [], 'the journal record is gone');
  });
}

t.test('add twice is idempotent, remove twice is harmless', async (t) => {
  const h = await harness(t);
  const img = h.image('twice.img');
  const be = await h.disk({ domid: 6, devid: 51712, params: img, mode: 'w' });
  t.equal((await h.run('add', be)).code, 0, 'first add');
  const pd = await h.read(`${be}/physical-device`);
  const again = await h.run('add', be);
  t.equal(again.code, 0, 'second add exits 0');
  t.equal(await h.read(`${be}/physical-device`), pd, 'physical-device unchanged');
  t.equal(h.loopsOnImages().length, 1, 'still one loop');
  t.equal((await h.run('remove', be)).code, 0, 'first remove');
  const rm2 = await h.run('remove', be);
  t.equal(rm2.code, 0, `second remove exits 0 (stderr: ${rm2.stderr})`);
  t.same(h.loopsOnImages(), [], 'nothing left');
});

t.test('remove after the image was deleted still detaches its loop (stale node)', async (t) => {
  const h = await harness(t);
  const img = h.image('deleted.img');
  const be = await h.disk({ domid: 7, devid: 51712, params: img, mode: 'w' });
  t.equal((await h.run('add', be)).code, 0, 'add');
  const node = await h.read(`${be}/node`);
  unlinkSync(img);
  const before = h.loopsOnImages();
  t.same(
    before.map((l) => l.name),
    [node],
    'the loop still backs the deleted image',
  );
  t.match(before[0]?.backFile, /\(deleted\)/, 'losetup shows the backing file as deleted');
  const rm = await h.run('remove', be);
  t.equal(rm.code, 0, `remove exits 0 (stderr: ${rm.stderr})`);
  t.same(h.loopsOnImages(), [], 'the loop of the deleted image is detached');
});

t.test('remove does not detach a loop that no longer backs the recorded file', async (t) => {
  const h = await harness(t);
  const img = h.image('mine.img');
  const other = h.image('other.img');
  const be = await h.disk({ domid: 8, devid: 51712, params: img, mode: 'w' });
  t.equal((await h.run('add', be)).code, 0, 'add');
  const node = (await h.read(`${be}/node`)) as string;
  // Someone detaches our loop by hand and the same device number is reused for another file.
  const { execFileSync } = await import('node:child_process');
  execFileSync('losetup', ['--detach', node]);
  execFileSync('losetup', [node, '--', other]);
  const rm = await h.run('remove', be);
  t.equal(rm.code, 0, 'remove exits 0');
  t.same(
    h.loopsOnImages().map((l) => [l.name, l.back]),
    [[node, identity(other)]],
    'the reused loop over the other file is left alone',
  );
  execFileSync('losetup', ['--detach', node]);
});

t.test('refuses w on a read-only file with busy, builds nothing', async (t) => {
  const h = await harness(t);
  const img = h.image('ro.img');
  chmodSync(img, 0o444);
  const be = await h.disk({ domid: 9, devid: 51712, params: img, mode: 'w' });
  const add = await h.run('add', be);
  t.equal(add.code, 1, 'add exits 1');
  t.equal(await h.read(`${be}/hotplug-status`), 'busy');
  t.match(await h.read(`${be}/hotplug-error`), /read-only/);
  t.equal(await h.read(`${be}/physical-device`), undefined, 'no physical-device');
  t.same(h.loopsOnImages(), [], 'no loop');
  t.same(readdirSync(join(h.stateDir, 'journal')), [], 'no journal record');
  // The same file read-only is fine.
  const be2 = await h.disk({ domid: 9, devid: 51728, params: img, mode: 'r' });
  t.equal((await h.run('add', be2)).code, 0, 'mode r on the read-only file works');
  t.equal((await h.run('remove', be2)).code, 0);
});

t.test('state guard: a backend that is not waiting (InitWait) gets no loop', async (t) => {
  const h = await harness(t);
  const img = h.image('state.img');
  const be = await h.disk({ domid: 10, devid: 51712, params: img, mode: 'w', state: 1 });
  const add = await h.run('add', be);
  t.equal(add.code, 1);
  t.equal(await h.read(`${be}/hotplug-status`), 'error');
  t.match(
    await h.read(`${be}/hotplug-error`),
    /Path closed or removed during hotplug add: backend\/vbd\/10\/51712 state: 1/,
  );
  t.same(h.loopsOnImages(), []);
});

t.test('a missing image or a directory is a clear error', async (t) => {
  const h = await harness(t);
  const be = await h.disk({ domid: 11, devid: 51712, params: join(h.dir, 'img', 'nope.img'), mode: 'w' });
  const add = await h.run('add', be);
  t.equal(add.code, 1);
  t.equal(await h.read(`${be}/hotplug-status`), 'error');
  t.match(await h.read(`${be}/hotplug-error`), /nope\.img does not exist/);
  const be2 = await h.disk({ domid: 11, devid: 51728, params: join(h.dir, 'img'), mode: 'w' });
  t.equal((await h.run('add', be2)).code, 1);
  t.match(await h.read(`${be2}/hotplug-error`), /is a directory/);
});

t.test('a symbolic link is resolved to the file it names', async (t) => {
  const h = await harness(t);
  const img = h.image('target.img');
  const link = join(h.dir, 'link.img');
  symlinkSync(img, link);
  const be = await h.disk({ domid: 12, devid: 51712, params: link, mode: 'r' });
  t.equal((await h.run('add', be)).code, 0);
  const l = h.loopsOnImages();
  t.equal(l.length, 1);
  t.equal(l[0]?.backFile, img, 'the loop backs the link target');
  t.equal((await h.run('remove', be)).code, 0);
  t.ok(existsSync(img));
});

t.test(
  'remove of a loop that something holds open fails loudly, keeps the record, and the next remove finishes',
  async (t) => {
    const h = await harness(t);
    const img = h.image('held.img');
    const be = await h.disk({ domid: 13, devid: 51712, params: img, mode: 'w' });
    t.equal((await h.run('add', be)).code, 0, 'add');
    const node = (await h.read(`${be}/node`)) as string;
    const fd = openSync(node, 'r');
    let closed = false;
    t.teardown(() => {
      if (!closed) closeSync(fd);
    });
    const rm = await h.run('remove', be);
    t.equal(rm.code, 1, 'remove exits 1 while the loop is open');
    t.match(
      await h.read(`${be}/hotplug-error`),
      new RegExp(`${node} \\(loop of .*held\\.img\\) is still open`),
      'hotplug-error names the busy loop',
    );
    t.equal(readdirSync(join(h.stateDir, 'journal')).length, 1, 'the record stays');
    t.same(
      h.loopsOnImages().map((l) => l.name),
      [node],
      'the loop is still bound while open',
    );
    closeSync(fd);
    closed = true;
    // losetup -d set autoclear: the kernel detaches the loop at the last close.
    t.same(h.loopsOnImages(), [], 'closing it detached it (autoclear)');
    const again = await h.run('remove', be);
    t.equal(again.code, 0, `the next remove exits 0 (stderr: ${again.stderr})`);
    t.same(readdirSync(join(h.stateDir, 'journal')), [], 'the record is gone');
  },
);

t.test('file: an image under a directory with a space in its name (a medium mounted under its label)', async (t) => {
  const h = await harness(t);
  mkdirSync(join(h.dir, 'img', 'LIVE CD'));
  const img = h.image('LIVE CD/root fs.img');
  const be = await h.disk({ domid: 10, devid: 51712, params: img, mode: 'r' });
  const add = await h.run('add', be);
  t.equal(add.code, 0, `add exits 0 (stderr: ${add.stderr})`);
  t.equal(await h.read(`${be}/hotplug-status`), 'connected');
  const node = await h.read(`${be}/node`);
  const mine = h.loopsOnImages();
  t.same(
    mine.map((l) => [l.name, l.backFile]),
    [[node, img]],
    'one loop, over the whole spaced path',
  );
  const [entry] = new Journal(h.stateDir).list().entries;
  t.equal(entry && paramsSource(entry.script, entry.disk.params), img, 'status shows the whole path as the base');
  const rm = await h.run('remove', be);
  t.equal(rm.code, 0, `remove exits 0 (stderr: ${rm.stderr})`);
  t.same(h.loopsOnImages(), [], 'the loop is detached');
});

t.test('no loop device is left over any image of these tests', async (t) => {
  t.same(harnessLoops(), []);
});

t.test(
  "Xen's block lock held past lock_timeout_ms: block waits, as the stock script would, and attaches",
  async (t) => {
    const h = await harness(t);
    const img = h.image('waits.img');
    const be = await h.disk({ domid: 9, devid: 51712, params: img, mode: 'w' });
    mkdirSync(h.xenLockDir, { recursive: true });
    // Another script holds the lock for 3 s (flock(1) on the same file, as locking.sh would).
    const holder = spawn('flock', ['-x', join(h.xenLockDir, 'block'), 'sleep', '3'], { stdio: 'ignore' });
    t.teardown(() => holder.kill());
    await new Promise((r) => setTimeout(r, 300));
    const t0 = Date.now();
    const add = await h.run('add', be, { XEN_BLOCKHOOKS_LOCK_TIMEOUT_MS: '1000' });
    const took = Date.now() - t0;
    t.equal(add.code, 0, `add exits 0 (stderr: ${add.stderr})`);
    t.ok(took > 2000, `it waited for the holder (${took} ms), past the configured 1 s`);
    t.equal(await h.read(`${be}/hotplug-status`), 'connected');
    t.equal((await h.run('remove', be)).code, 0, 'remove');
    t.same(h.loopsOnImages(), [], 'nothing left');
  },
);
