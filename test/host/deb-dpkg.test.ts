/**
 * The Debian package under real dpkg, in a Debian 12 root (scripts/deb-chroot.mjs: debootstrap
 * with Debian's own nodejs 18, xen-utils-common and the rest of the package's Depends) with a
 * writable overlay of its own, in a private mount namespace: nothing on this machine changes.
 * Install, replace the stock block (dpkg-divert), a nodejs reinstall firing the trigger, an
 * upgrade to the same version +1, a remove refused while the journal holds a disk and forced, and
 * a purge that leaves nothing of ours but a store, with the stock block back. No Xen here: the
 * hooks run --version, which goes through the wrappers, the node post-install found and the
 * startup snapshots.
 */
import t from 'tap';
import { spawnSync } from 'node:child_process';
import {
  cpSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  readdirSync,
  rmSync,
  statSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { debChroot } from '../../scripts/deb-chroot.mjs';

t.setTimeout(15 * 60_000); // a first debootstrap downloads ~100 MB; scripts/setup.sh builds it beforehand

const ROOT = join(import.meta.dirname, '../..');
const pkg = JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as {
  version: string;
  engines: { node: string };
};
const FLOOR = /^>=(\d+\.\d+\.\d+)$/.exec(pkg.engines.node)?.[1] ?? '';
const V1 = pkg.version;
const V2 = `${pkg.version}+1`;

function sh(cmd: string, args: string[], env: NodeJS.ProcessEnv = { PATH: '/usr/sbin:/usr/bin:/sbin:/bin' }) {
  const r = spawnSync(cmd, args, { encoding: 'utf8', maxBuffer: 64 << 20, env });
  return { code: r.status, out: r.stdout ?? '', err: `${r.stderr ?? ''}${r.error ? String(r.error) : ''}` };
}

let base: string;
try {
  base = debChroot();
} catch (e) {
  t.fail(`the Debian 12 root: ${(e as Error).message}`);
  t.end();
  process.exit();
}

const top = mkdtempSync(join(tmpdir(), 'xbh-dpkg-'));
t.teardown(() => rmSync(top, { recursive: true, force: true }));
for (const d of ['upper', 'work', 'merged']) mkdirSync(join(top, d));
// One command in the root: overlay (the cached root below, this test's changes above), /proc, an
// empty /run, then chroot with a plain environment (as dpkg would be run by a root shell).
const enter = join(top, 'enter');
writeFileSync(
  enter,
  `#!/bin/sh
set -e
unset NODE_OPTIONS
m=${top}/merged
mount -t overlay overlay -o lowerdir=${base},upperdir=${top}/upper,workdir=${top}/work "$m"
mount -t proc proc "$m/proc"
mount -t tmpfs tmpfs "$m/run"
[ ! -d ${top}/run-state ] || cp -a ${top}/run-state/. "$m/run/"
set +e
chroot "$m" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C "$@"
rc=$?
rm -rf ${top}/run-state && cp -a "$m/run" ${top}/run-state
exit $rc
`,
  { mode: 0o755 },
);
/** Runs argv in the root (each call a fresh namespace; /run is carried from call to call). */
const inRoot = (args: string[], env: Record<string, string> = {}) =>
  sh('unshare', [
    '--mount',
    '--propagation',
    'private',
    enter,
    ...Object.entries(env).map(([k, v]) => `${k}=${v}`),
    ...args,
  ]);
const file = (p: string) => join(top, 'upper', p);

t.test('build the package twice (the version and the version +1) into the root', async (t) => {
  mkdirSync(file('root'), { recursive: true });
  for (const v of [V1, V2]) {
    const r = sh(process.execPath, [join(ROOT, 'scripts/package.mjs'), '--version', v, '--out', file('root')], {
      PATH: process.env.PATH,
    });
    t.equal(r.code, 0, r.err);
  }
  const node = inRoot(['node', '--version']);
  t.equal(node.out.trim(), `v${FLOOR}`, `the root's node is Debian 12's ${FLOOR}: ${node.err}`);
});

t.test('dpkg -i: post-install makes every snapshot with the installed node; the hooks start from them', async (t) => {
  const r = inRoot(['dpkg', '-i', `/root/xen-blockhooks_${V1}_all.deb`]);
  t.equal(r.code, 0, r.out + r.err);
  t.match(
    r.out,
    new RegExp(
      `post-install: node /usr/bin/node \\(v${FLOOR.replace(/\./g, '\\.')}\\); startup snapshots: block-cow block-lvsnap block-qcow block-rbd block-thin block\\n`,
    ),
  );
  t.match(
    r.err,
    /"xen-blockhooks check" found problems/,
    'the check runs (no Xen here: it finds problems) and does not fail the installation',
  );
  t.match(
    inRoot(['dpkg-query', '-W', '-f=${Status} ${Version}', 'xen-blockhooks']).out,
    new RegExp(`^install ok installed ${V1.replace(/\./g, '\\.')}$`),
  );
  t.equal(inRoot(['cat', '/usr/lib/xen-blockhooks/node']).out, '/usr/bin/node\n');
  const v = inRoot(['/etc/xen/scripts/block-cow', '--version']);
  t.equal(v.out.trim(), `block-cow (xen-blockhooks) ${V1} (startup snapshot)`, v.err);
  t.equal(inRoot(['xen-blockhooks', '--version']).out.trim(), `xen-blockhooks ${V1}`);
  t.equal(
    inRoot(['cat', '/etc/xen/scripts/block']).out,
    readFileSync(join(base, 'etc/xen/scripts/block'), 'utf8'),
    'the stock block is untouched',
  );
});

t.test('xen-blockhooks-replace-block diverts the stock block; --status says so', async (t) => {
  const stock = readFileSync(join(base, 'etc/xen/scripts/block'), 'utf8');
  const r = inRoot(['xen-blockhooks-replace-block']);
  t.equal(r.code, 0, r.err);
  t.equal(
    inRoot(['dpkg-divert', '--list', '/etc/xen/scripts/block']).out.trim(),
    'diversion of /etc/xen/scripts/block to /etc/xen/scripts/block.stock by xen-blockhooks',
  );
  t.equal(readFileSync(file('etc/xen/scripts/block.stock'), 'utf8'), stock, 'the stock script is block.stock');
  t.equal(
    inRoot(['/etc/xen/scripts/block', '--version']).out.trim(),
    `block (xen-blockhooks) ${V1} (startup snapshot)`,
  );
  t.match(inRoot(['xen-blockhooks-replace-block', '--status']).out, /is xen-blockhooks' block/);
  t.equal(inRoot(['xen-blockhooks-replace-block']).code, 0, 'again: nothing changes');
});

t.test('reinstalling nodejs fires the trigger: every hook starts from a snapshot made again', async (t) => {
  const before = statSync(file('usr/lib/xen-blockhooks/block-cow.snapshot')).mtimeMs;
  await new Promise((r) => setTimeout(r, 1100));
  const r = inRoot(['sh', '-c', 'dpkg -i /var/cache/apt/archives/nodejs_*.deb']);
  t.equal(r.code, 0, r.err);
  t.match(r.out, /Processing triggers for xen-blockhooks/);
  t.match(
    r.out,
    /post-install: node \/usr\/bin\/node .*startup snapshots: block-cow block-lvsnap block-qcow block-rbd block-thin block\n/,
  );
  t.ok(statSync(file('usr/lib/xen-blockhooks/block-cow.snapshot')).mtimeMs > before, 'the snapshot is new');
  for (const h of ['block-cow', 'block-lvsnap', 'block-qcow', 'block-rbd', 'block-thin', 'block']) {
    t.equal(
      inRoot([`/etc/xen/scripts/${h}`, '--version']).out.trim(),
      `${h} (xen-blockhooks) ${V1} (startup snapshot)`,
      `${h} starts from its snapshot`,
    );
  }
});

t.test('upgrade to the version +1: the new hooks, snapshots again, the diversion kept', async (t) => {
  const r = inRoot(['dpkg', '-i', `/root/xen-blockhooks_${V2}_all.deb`]);
  t.equal(r.code, 0, r.out + r.err);
  t.match(inRoot(['dpkg-query', '-W', '-f=${Version}', 'xen-blockhooks']).out, V2);
  t.match(inRoot(['/etc/xen/scripts/block-cow', '--version']).out, /\(startup snapshot\)/);
  t.match(
    inRoot(['/etc/xen/scripts/block', '--version']).out,
    /^block \(xen-blockhooks\)/,
    'our block is still in place',
  );
  t.match(inRoot(['dpkg-divert', '--list', '/etc/xen/scripts/block']).out, /by xen-blockhooks/);
});

t.test('remove: refused while the journal holds a disk; forced, it gives the stock block back', async (t) => {
  mkdirSync(join(top, 'run-state/xen-blockhooks/journal'), { recursive: true });
  writeFileSync(join(top, 'run-state/xen-blockhooks/journal/backend~vbd~3~51712.json'), '{}\n');
  mkdirSync(file('var/lib/xen-blockhooks'), { recursive: true });
  writeFileSync(file('var/lib/xen-blockhooks/persistent.img'), 'a persistent store\n');
  const refused = inRoot(['dpkg', '-r', 'xen-blockhooks']);
  t.not(refused.code, 0, 'dpkg -r fails');
  t.match(refused.err, /the journal holds disks .*\n {2}backend\/vbd\/3\/51712\n/, 'naming the disk');
  t.match(refused.err, /XEN_BLOCKHOOKS_FORCE_REMOVE=1/, 'and how to go on');
  t.match(
    inRoot(['dpkg-query', '-W', '-f=${Status}', 'xen-blockhooks']).out,
    /ok installed$/,
    'the package is still installed',
  );
  t.match(inRoot(['/etc/xen/scripts/block-cow', '--version']).out, /startup snapshot/, 'and works');
  const forced = inRoot(['dpkg', '-r', 'xen-blockhooks'], { XEN_BLOCKHOOKS_FORCE_REMOVE: '1' });
  t.equal(forced.code, 0, forced.err);
  t.match(inRoot(['dpkg-query', '-W', '-f=${Status}', 'xen-blockhooks']).out, /config-files$/);
  t.equal(inRoot(['dpkg-divert', '--list', '/etc/xen/scripts/block']).out, '', 'the diversion is undone');
  t.equal(
    inRoot(['dpkg-query', '-S', '/etc/xen/scripts/block']).out.trim(),
    'xen-utils-common: /etc/xen/scripts/block',
  );
  t.notOk(existsSync(file('usr/lib/xen-blockhooks')), 'no snapshot, code cache or node file is left behind');
});

t.test('purge: nothing of ours is left but the store; the stock block is back', async (t) => {
  const r = inRoot(['dpkg', '--purge', 'xen-blockhooks']);
  t.equal(r.code, 0, r.err);
  t.not(inRoot(['dpkg-query', '-W', 'xen-blockhooks']).code, 0, 'dpkg knows the package no more');
  t.notOk(existsSync(join(top, 'run-state/xen-blockhooks')), 'the runtime state is gone');
  t.equal(
    readFileSync(file('var/lib/xen-blockhooks/persistent.img'), 'utf8'),
    'a persistent store\n',
    'the store stays',
  );
  const left = inRoot([
    'sh',
    '-c',
    'find / -xdev \\( -name "*xen-blockhooks*" -o -name "blockhooks.conf" -o -name "block-cow" -o -name "block.stock" \\) -not -path "/proc/*" -not -path "/root/*" -not -path "/var/lib/dpkg/*" -print',
  ]);
  t.same(
    left.out.trim().split('\n').filter(Boolean),
    ['/var/lib/xen-blockhooks'],
    'of ours only the folder holding the store',
  );
  t.equal(
    inRoot(['cat', '/etc/xen/scripts/block']).out,
    readFileSync(join(base, 'etc/xen/scripts/block'), 'utf8'),
    'the stock block is back, unchanged',
  );
  t.equal(inRoot(['sh', '-n', '/etc/xen/scripts/block']).code, 0);
});

t.test(
  './install --replace-block on a Debian root diverts the stock block (dpkg-divert --local); --uninstall gives it back',
  async (t) => {
    const src = file('root/src');
    mkdirSync(join(src, 'dist'), { recursive: true });
    cpSync(join(ROOT, 'install'), join(src, 'install'));
    cpSync(join(ROOT, 'packaging'), join(src, 'packaging'), { recursive: true });
    for (const f of readdirSync(join(ROOT, 'dist')))
      if (/\.(cjs|mjs)$/.test(f)) cpSync(join(ROOT, 'dist', f), join(src, 'dist', f));
    const stock = readFileSync(join(base, 'etc/xen/scripts/block'), 'utf8');
    const r = inRoot(['sh', '/root/src/install', '--replace-block']);
    t.equal(r.code, 0, r.err);
    t.match(r.out, /\/etc\/xen\/scripts\/block belongs to xen-utils-common: diverting it/);
    t.equal(
      inRoot(['dpkg-divert', '--list', '/etc/xen/scripts/block']).out.trim(),
      'local diversion of /etc/xen/scripts/block to /etc/xen/scripts/block.stock',
    );
    t.equal(readFileSync(file('etc/xen/scripts/block.stock'), 'utf8'), stock, 'the stock script is block.stock');
    t.equal(
      inRoot(['/etc/xen/scripts/block', '--version']).out.trim(),
      `block (xen-blockhooks) ${V1} (startup snapshot)`,
      'our block, from the snapshot post-install made',
    );
    const u = inRoot(['sh', '/root/src/install', '--uninstall']);
    t.equal(u.code, 0, u.err);
    t.equal(inRoot(['dpkg-divert', '--list', '/etc/xen/scripts/block']).out, '', 'the diversion is gone');
    t.equal(inRoot(['cat', '/etc/xen/scripts/block']).out, stock, 'and the stock block is back');
    t.equal(inRoot(['test', '-e', '/usr/lib/xen-blockhooks']).code, 1, 'nothing of the installation is left');
  },
);
