/**
 * Xen's sharing check in the bundled `block` hook: writable to one domain means to no other;
 * read-only may be shared with read-only; the same VM (a stub domain serving its guest) may share.
 */
import t from 'tap';
import { execFileSync } from 'node:child_process';
import { linkSync } from 'node:fs';
import { join } from 'node:path';
import { detachIfBacks, harness, harnessLoops, hexOf } from '../lib/block-harness.js';

t.setTimeout(180_000);

const pairs: { first: 'r' | 'w'; second: 'r' | 'w'; allowed: boolean }[] = [
  { first: 'w', second: 'w', allowed: false },
  { first: 'w', second: 'r', allowed: false },
  { first: 'r', second: 'w', allowed: false },
  { first: 'r', second: 'r', allowed: true },
];

for (const { first, second, allowed } of pairs) {
  t.test(`one file, ${first} to domain 2 then ${second} to domain 3: ${allowed ? 'allowed' : 'refused'}`, async (t) => {
    const h = await harness(t);
    const img = h.image('shared.img');
    const a = await h.disk({ domid: 2, devid: 51712, params: img, mode: first, domainName: 'alpha' });
    const b = await h.disk({ domid: 3, devid: 51712, params: img, mode: second, domainName: 'beta' });
    t.equal((await h.run('add', a)).code, 0, 'first add');
    const r = await h.run('add', b);
    if (allowed) {
      t.equal(r.code, 0, `second add exits 0 (stderr: ${r.stderr})`);
      const l = h.loopsOnImages();
      t.equal(l.length, 2, 'each disk has a loop of its own');
      t.ok(
        l.every((x) => x.ro),
        'both read-only',
      );
      t.not(await h.read(`${a}/physical-device`), await h.read(`${b}/physical-device`), 'different devices');
    } else {
      t.equal(r.code, 1, 'second add exits 1');
      t.equal(await h.read(`${b}/hotplug-status`), 'busy');
      const msg = await h.read(`${b}/hotplug-error`);
      t.match(msg, /domain 2 \(alpha\)/, 'the error names the other domain');
      t.match(msg, new RegExp(`given ${first === 'w' ? 'read-write' : 'read-only'} to domain 2`));
      t.equal(await h.read(`${b}/physical-device`), undefined);
      t.equal(h.loopsOnImages().length, 1, 'no second loop');
    }
    t.equal((await h.run('remove', b)).code, 0);
    t.equal((await h.run('remove', a)).code, 0);
    t.same(h.loopsOnImages(), [], 'all detached');
  });
}

t.test('a hard link to the file is the same file', async (t) => {
  const h = await harness(t);
  const img = h.image('orig.img');
  const link = join(h.dir, 'img', 'hardlink.img');
  linkSync(img, link);
  const a = await h.disk({ domid: 2, devid: 51712, params: img, mode: 'w' });
  const b = await h.disk({ domid: 3, devid: 51712, params: link, mode: 'w' });
  t.equal((await h.run('add', a)).code, 0);
  const r = await h.run('add', b);
  t.equal(r.code, 1, 'refused through the other name');
  t.equal(await h.read(`${b}/hotplug-status`), 'busy');
  t.equal((await h.run('remove', a)).code, 0);
  t.equal((await h.run('remove', b)).code, 0);
  t.same(h.loopsOnImages(), []);
});

t.test(
  'through an existing loop device on the same dev:inode, set up by someone else (what the stock check misses)',
  async (t) => {
    const h = await harness(t);
    const img = h.image('foreign.img');
    // A loop attached outside our hook (as the stock block does: losetup <dev> <file>), given
    // writable to domain 4: its vbd's physical-device names that loop.
    const loop = execFileSync('losetup', ['--find', '--show', '--', img], { encoding: 'utf8' }).trim();
    t.teardown(() => detachIfBacks(loop, img));
    const other = await h.disk({ domid: 4, devid: 51712, params: img, mode: 'w', domainName: 'delta' });
    await h.store.xs.write(`${other}/physical-device`, hexOf(loop));
    await h.store.xs.write(`${other}/node`, loop);
    const be = await h.disk({ domid: 5, devid: 51712, params: img, mode: 'r' });
    const r = await h.run('add', be);
    t.equal(r.code, 1, 'refused');
    t.equal(await h.read(`${be}/hotplug-status`), 'busy');
    t.match(
      await h.read(`${be}/hotplug-error`),
      new RegExp(`given read-write to domain 4 \\(delta\\) through ${loop}`),
    );
    t.same(
      h.loopsOnImages().map((l) => l.name),
      [loop],
      'no loop added',
    );
    // The loop alone, used by nobody, is no conflict (the stock rule).
    await h.store.xs.rm(other);
    const r2 = await h.run('add', be);
    t.equal(r2.code, 0, `allowed once no vbd uses the loop (stderr: ${r2.stderr})`);
    t.equal((await h.run('remove', be)).code, 0);
    execFileSync('losetup', ['--detach', loop]);
    t.same(h.loopsOnImages(), []);
  },
);

t.test('the same VM may share a writable file (device-model stub domain with target)', async (t) => {
  const h = await harness(t);
  const img = h.image('stub.img');
  const guest = await h.disk({ domid: 6, devid: 51712, params: img, mode: 'w' });
  const stub = await h.disk({
    domid: 7,
    devid: 51712,
    params: img,
    mode: 'w',
    target: 6,
    uuid: '00000000-0000-4000-8000-0000000000aa',
  });
  t.equal((await h.run('add', guest)).code, 0);
  const r = await h.run('add', stub);
  t.equal(r.code, 0, `stub domain of the same guest may have it (stderr: ${r.stderr})`);
  // A third, unrelated domain may not.
  const third = await h.disk({ domid: 8, devid: 51712, params: img, mode: 'r' });
  t.equal((await h.run('add', third)).code, 1, 'another VM is refused');
  for (const be of [third, stub, guest]) t.equal((await h.run('remove', be)).code, 0);
  t.same(h.loopsOnImages(), []);
});

t.test(
  "a same-host migration: the receiver (NAME--incoming, same uuid) shares the sender's writable file; the sender's remove keeps it",
  async (t) => {
    // What xl migrate-receive does on one host: the receiving domain, with the sender's uuid, adds
    // the disk while the suspended sender still has it; then the sender is destroyed.
    const h = await harness(t);
    const img = h.image('mig.img');
    const uuid = '00000000-0000-4000-8000-0000000000bb';
    const sender = await h.disk({ domid: 11, devid: 51712, params: img, mode: 'w', uuid, name: 'web' });
    t.equal((await h.run('add', sender)).code, 0);
    const receiver = await h.disk({ domid: 12, devid: 51712, params: img, mode: 'w', uuid, name: 'web--incoming' });
    const r = await h.run('add', receiver);
    t.equal(r.code, 0, `the receiver gets the file (stderr: ${r.stderr})`);
    await h.store.xs.write('/local/domain/11/name', 'web--migratedaway');
    t.equal((await h.run('remove', sender)).code, 0, 'the sender is destroyed');
    const left = h.loopsOnImages();
    t.equal(left.length, 1, "the receiver's loop stays");
    t.equal(left[0]?.name, await h.read(`${receiver}/node`), "and it is the receiver's own");
    t.equal((await h.run('remove', receiver)).code, 0);
    t.same(h.loopsOnImages(), []);
  },
);

t.test('a domain without a vm node is not taken for the same VM', async (t) => {
  const h = await harness(t);
  const img = h.image('novm.img');
  const a = await h.disk({ domid: 9, devid: 51712, params: img, mode: 'w', uuid: null });
  const b = await h.disk({ domid: 10, devid: 51712, params: img, mode: 'w' });
  t.equal((await h.run('add', a)).code, 0);
  t.equal((await h.run('add', b)).code, 1, 'refused (the stock same_vm() would let it through)');
  for (const be of [b, a]) t.equal((await h.run('remove', be)).code, 0);
  t.same(h.loopsOnImages(), []);
});

t.test('mounted in the backend domain: writable use refused', async (t) => {
  const h = await harness(t);
  const img = h.image('fs.img', 16);
  try {
    execFileSync('mkfs.ext4', ['-q', '-F', '--', img], { stdio: 'ignore' });
  } catch (e) {
    t.fail(`mkfs.ext4 cannot make the test filesystem (scripts/setup.sh installs e2fsprogs): ${(e as Error).message}`);
    return;
  }
  const mnt = join(h.dir, 'mnt');
  execFileSync('mkdir', ['-p', '--', mnt]);
  const loop = execFileSync('losetup', ['--find', '--show', '--read-only', '--', img], { encoding: 'utf8' }).trim();
  execFileSync('mount', ['-o', 'ro', '--', loop, mnt]);
  t.teardown(() => {
    try {
      execFileSync('umount', ['--', mnt]);
    } catch {
      /* not mounted */
    }
    detachIfBacks(loop, img);
  });
  const w = await h.disk({ domid: 11, devid: 51712, params: img, mode: 'w' });
  t.equal((await h.run('add', w)).code, 1, 'w refused while mounted (even read-only)');
  t.match(await h.read(`${w}/hotplug-error`), new RegExp(`mounted read-only on ${mnt}`));
  const r = await h.disk({ domid: 12, devid: 51712, params: img, mode: 'r' });
  t.equal((await h.run('add', r)).code, 0, 'r allowed next to a read-only mount');
  t.equal((await h.run('remove', r)).code, 0);
  t.equal((await h.run('remove', w)).code, 0);
  execFileSync('umount', ['--', mnt]);
  execFileSync('losetup', ['--detach', loop]);
  t.same(h.loopsOnImages(), []);
});

t.test('no loop device is left over any image of these tests', async (t) => {
  t.same(harnessLoops(), []);
});
