/**
 * The bundled `block` hook on phy: disks (a real loop device stands in for a disk), the xend
 * dialect and the type dispatch to block-<type>. The keys are read back with Debian's
 * xenstore-read, the way other tools see them.
 */
import t from 'tap';
import { execFileSync } from 'node:child_process';
import { chmodSync, readFileSync, symlinkSync, writeFileSync } from 'node:fs';
import { basename, join } from 'node:path';
import { detachIfBacks, harness, harnessLoops, hexOf, runProcess, type BlockHarness } from '../lib/block-harness.js';

t.setTimeout(180_000);

/** Debian's xenstore-read against the test's server (asynchronously: the server is in this process). */
async function xenstoreRead(h: BlockHarness, ...keys: string[]): Promise<{ code: number | null; out: string }> {
  const r = await runProcess('xenstore-read', keys, {
    PATH: process.env.PATH ?? '',
    XENSTORED_PATH: h.store.socketPath,
  });
  return { code: r.code, out: r.stdout };
}

function attachLoop(t: { teardown(fn: () => void): void }, file: string, ro = false): string {
  const loop = execFileSync('losetup', ['--find', '--show', ...(ro ? ['--read-only'] : []), '--', file], {
    encoding: 'utf8',
  }).trim();
  t.teardown(() => detachIfBacks(loop, file));
  return loop;
}

t.test('phy: on a real loop device: the keys, readable by xenstore-read; remove leaves the device', async (t) => {
  const h = await harness(t);
  const img = h.image('disk.img');
  const loop = attachLoop(t, img);
  const be = await h.disk({ domid: 5, devid: 51712, params: loop, mode: 'w' });
  const add = await h.run('add', be);
  t.equal(add.code, 0, `add exits 0 (stderr: ${add.stderr})`);
  const r = await xenstoreRead(
    h,
    `${be}/physical-device`,
    `${be}/physical-device-path`,
    `${be}/hotplug-status`,
    `${be}/node`,
  );
  t.equal(r.code, 0, 'xenstore-read reads them');
  t.equal(r.out, `${hexOf(loop)}\n${loop}\nconnected\n${loop}\n`);
  t.equal((await xenstoreRead(h, `${be}/hotplug-error`)).code, 1, 'no hotplug-error');
  const rm = await h.run('remove', be);
  t.equal(rm.code, 0);
  t.same(
    h.loopsOnImages().map((l) => l.name),
    [loop],
    'remove of a phy: disk leaves the device alone',
  );
  execFileSync('losetup', ['--detach', loop]);
});

t.test('phy: relative names are under /dev, symbolic links are resolved', async (t) => {
  const h = await harness(t);
  const img = h.image('rel.img');
  const loop = attachLoop(t, img);
  const be = await h.disk({ domid: 6, devid: 51712, params: basename(loop), mode: 'r' });
  t.equal((await h.run('add', be)).code, 0, 'relative name');
  t.equal(await h.read(`${be}/physical-device-path`), loop);
  const link = join(h.dir, 'disk-link');
  symlinkSync(loop, link);
  const be2 = await h.disk({ domid: 6, devid: 51728, params: link, mode: 'r' });
  t.equal((await h.run('add', be2)).code, 0, 'symlink');
  t.equal(await h.read(`${be2}/physical-device-path`), loop, 'the link is resolved');
  for (const b of [be, be2]) t.equal((await h.run('remove', b)).code, 0);
  execFileSync('losetup', ['--detach', loop]);
});

t.test('phy: a failing run leaves hotplug-error and hotplug-status=error and exits 1', async (t) => {
  const h = await harness(t);
  const be = await h.disk({ domid: 7, devid: 51712, params: '/dev/xbh-no-such-disk', mode: 'w' });
  const add = await h.run('add', be);
  t.equal(add.code, 1, 'exit 1');
  const r = await xenstoreRead(h, `${be}/hotplug-status`, `${be}/hotplug-error`);
  t.equal(r.code, 0);
  t.match(r.out, /^error\n.*\/dev\/xbh-no-such-disk does not exist/);
  t.equal((await xenstoreRead(h, `${be}/physical-device`)).code, 1, 'no physical-device');
});

t.test(
  'phy: sharing: a device given writable to one domain is refused to another; w on a read-only device is refused',
  async (t) => {
    const h = await harness(t);
    const img = h.image('phy-share.img');
    const loop = attachLoop(t, img);
    const a = await h.disk({ domid: 2, devid: 51712, params: loop, mode: 'w', domainName: 'alpha' });
    const b = await h.disk({ domid: 3, devid: 51712, params: loop, mode: 'r' });
    t.equal((await h.run('add', a)).code, 0);
    t.equal((await h.run('add', b)).code, 1, 'second domain refused');
    t.match(await h.read(`${b}/hotplug-error`), /Device .* is already given read-write to domain 2 \(alpha\)/);
    // The file behind the loop is the same data: file: of it is refused as well.
    const c = await h.disk({ domid: 4, devid: 51712, params: img, mode: 'r' });
    t.equal((await h.run('add', c)).code, 1, "file: of the loop's backing file refused");
    t.equal(await h.read(`${c}/hotplug-status`), 'busy');
    for (const be of [c, b, a]) t.equal((await h.run('remove', be)).code, 0);
    const roImg = h.image('ro-dev.img');
    const roLoop = attachLoop(t, roImg, true);
    const d = await h.disk({ domid: 5, devid: 51712, params: roLoop, mode: 'w' });
    t.equal((await h.run('add', d)).code, 1, 'w on a read-only device refused');
    t.match(await h.read(`${d}/hotplug-error`), /is read-only/);
    t.equal(await h.read(`${d}/hotplug-status`), 'busy');
    execFileSync('losetup', ['--detach', loop]);
    execFileSync('losetup', ['--detach', roLoop]);
  },
);

t.test('xend dialect: create/destroy of a file: disk', async (t) => {
  const h = await harness(t);
  const img = h.image('xend.img');
  const be = await h.disk({ domid: 8, devid: 51712, params: img, mode: 'w', type: 'file', dialect: 'xend' });
  const c = await h.run('create', be);
  t.equal(c.code, 0, `create exits 0 (stderr: ${c.stderr})`);
  t.equal(await h.read(`${be}/hotplug-status`), 'connected');
  t.equal(h.loopsOnImages().length, 1);
  t.equal((await h.run('destroy', be)).code, 0);
  t.same(h.loopsOnImages(), []);
});

t.test('xend type dispatch: type=cow runs <script dir>/block-cow with the same argv and environment', async (t) => {
  const h = await harness(t);
  const scripts = join(h.dir, 'scripts');
  execFileSync('mkdir', ['-p', '--', scripts]);
  const record = join(h.dir, 'record.json');
  const fake = join(scripts, 'block-cow');
  writeFileSync(
    fake,
    `#!${process.execPath}\nrequire('node:fs').writeFileSync(${JSON.stringify(record)}, JSON.stringify({ argv: process.argv.slice(2), xenbus: process.env.XENBUS_PATH, type: process.env.XENBUS_TYPE, base: process.env.XENBUS_BASE_PATH }));\nprocess.exitCode = Number(process.argv[2] === 'create' ? 3 : 0);\n`,
  );
  chmodSync(fake, 0o755);
  const be = await h.disk({
    domid: 9,
    devid: 51712,
    params: '/mnt/cdrom/rootfs.img 30',
    mode: 'w',
    type: 'cow',
    dialect: 'xend',
  });
  const c = await h.run('create', be, { XEN_SCRIPT_DIR: scripts });
  t.equal(c.code, 3, 'the exit code of block-cow is passed through');
  t.same(
    JSON.parse(readFileSync(record, 'utf8')),
    { argv: ['create'], xenbus: be, type: 'vbd', base: 'backend' },
    'argv and environment as given',
  );
  const d = await h.run('destroy', be, { XEN_SCRIPT_DIR: scripts });
  t.equal(d.code, 0);
  t.same(JSON.parse(readFileSync(record, 'utf8')).argv, ['destroy']);
  t.equal(await h.read(`${be}/physical-device`), undefined, 'block itself wrote nothing');
});

t.test('no loop device is left over any image of these tests', async (t) => {
  t.same(harnessLoops(), []);
});
