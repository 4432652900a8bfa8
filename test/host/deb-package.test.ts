/**
 * The Debian package (scripts/package.mjs, `npm run package`), built from the bundles in dist/
 * into a temporary folder: its control fields, its file list and modes, its conffiles, its
 * maintainer scripts and trigger, its copyright (every bundled npm package with its licence), and
 * lintian on it: no error and no warning, and each remaining tag explained in docs/packaging.md.
 */
import t from 'tap';
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const ROOT = join(import.meta.dirname, '../..');
const DIST = join(ROOT, 'dist');
const pkg = JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as {
  version: string;
  engines: { node: string };
};

function sh(cmd: string, args: string[]) {
  const r = spawnSync(cmd, args, { encoding: 'utf8', maxBuffer: 64 << 20 });
  return { code: r.status, out: r.stdout ?? '', err: r.stderr ?? (r.error ? String(r.error) : '') };
}

const out = mkdtempSync(join(tmpdir(), 'xbh-deb-'));
t.teardown(() => rmSync(out, { recursive: true, force: true }));
const built = sh(process.execPath, [join(ROOT, 'scripts/package.mjs'), '--out', out]);
const deb = join(out, `xen-blockhooks_${pkg.version}_all.deb`);

t.test('npm run package builds xen-blockhooks_<version>_all.deb', async (t) => {
  t.equal(built.code, 0, built.err);
  t.ok(existsSync(deb), deb);
  t.match(built.out, new RegExp(`built .*xen-blockhooks_${pkg.version.replace(/\./g, '\\.')}_all\\.deb`));
  const readme = readFileSync(join(ROOT, 'README.md'), 'utf8');
  const names = new Set([...readme.matchAll(/xen-blockhooks_[^\s/]+_all\.deb/g)].map((m) => m[0]));
  t.same([...names], [`xen-blockhooks_${pkg.version}_all.deb`], 'the README names the package npm run package builds');
});

const field = (name: string) => sh('dpkg-deb', ['-f', deb, name]).out.trim();

t.test('control fields', async (t) => {
  t.equal(field('Package'), 'xen-blockhooks');
  t.equal(field('Version'), pkg.version, "package.json's version");
  t.equal(field('Architecture'), 'all');
  const floor = /^>=(\d+\.\d+\.\d+)$/.exec(pkg.engines.node)?.[1];
  t.ok(floor, `engines.node is ">=X.Y.Z": ${pkg.engines.node}`);
  const depends = field('Depends').split(/,\s*/);
  t.same(
    depends,
    [`nodejs (>= ${floor})`, 'dmsetup', 'mount', 'xen-utils-common', 'init-system-helpers (>= 1.52)'],
    "the node floor is engines.node's; losetup (mount), dmsetup, Xen's scripts package",
  );
  t.same(field('Recommends').split(/,\s*/), ['qemu-utils', 'lvm2']);
  t.same(field('Suggests').split(/,\s*/), ['ceph-common', 'thin-provisioning-tools', 'kpartx']);
  t.match(field('Maintainer'), /^.+ <[^@\s]+@[^@\s]+>$/);
  t.ok(Number(field('Installed-Size')) > 1000, `Installed-Size ${field('Installed-Size')} KiB`);
});

t.test('file list and modes: bundles, wrappers, configuration, man pages, units; nothing made on a dom0', async (t) => {
  const list = sh('dpkg-deb', ['-c', deb])
    .out.trim()
    .split('\n')
    .map((l) => l.split(/\s+/))
    .filter((c) => !c[0]!.startsWith('d'))
    .map((c) => `${c[0]} ${c[1]} ${c[5]!.replace(/^\./, '')}`);
  const bundles = readdirSync(DIST)
    .filter((f) => f.endsWith('.cjs') && f !== 'snapshot.cjs')
    .map((f) => f.replace(/\.cjs$/, ''));
  const hooks = bundles.filter((b) => b.startsWith('block-'));
  const pages = readdirSync(join(ROOT, 'packaging/man')).map((p) => `/usr/share/man/man${p.split('.').pop()}/${p}.gz`);
  const f = (mode: string, path: string) => `${mode} root/root ${path}`;
  const expected = [
    f('-rw-r--r--', '/etc/logrotate.d/xen-blockhooks'),
    f('-rw-r--r--', '/etc/xen/blockhooks.conf'),
    ...hooks.map((h) => f('-rwxr-xr-x', `/etc/xen/scripts/${h}`)),
    f('-rw-r--r--', '/lib/systemd/system/xen-blockhooks-boot.service'),
    f('-rw-r--r--', '/lib/systemd/system/xen-blockhooks.service'),
    ...bundles.flatMap((b) => [
      f('-rw-r--r--', `/usr/lib/xen-blockhooks/${b}.cjs`),
      f('-rwxr-xr-x', `/usr/lib/xen-blockhooks/${b}.mjs`),
    ]),
    f('-rwxr-xr-x', '/usr/lib/xen-blockhooks/block.wrapper'),
    f('-rwxr-xr-x', '/usr/lib/xen-blockhooks/post-install'),
    f('-rwxr-xr-x', '/usr/lib/xen-blockhooks/snapshot.cjs'),
    f('-rwxr-xr-x', '/usr/sbin/xen-blockhooks'),
    f('-rwxr-xr-x', '/usr/sbin/xen-blockhooks-replace-block'),
    f('-rw-r--r--', '/usr/share/doc/xen-blockhooks/changelog.gz'),
    f('-rw-r--r--', '/usr/share/doc/xen-blockhooks/copyright'),
    ...pages.map((p) => f('-rw-r--r--', p)),
  ];
  const byPath = (a: string, b: string) => (a.split(' ')[2]! < b.split(' ')[2]! ? -1 : 1);
  t.same(list.sort(byPath), expected.sort(byPath), 'exactly these files, owned by root, with these modes');
  t.ok(
    hooks.length >= 5 && pages.includes('/usr/share/man/man5/blockhooks.conf.5.gz'),
    'the hooks and blockhooks.conf(5) are among them',
  );
  t.notOk(
    list.some((l) => /\.snapshot|\.v8cache|\/node$/.test(l)),
    'no snapshot, code cache or node path: post-install makes those on the dom0',
  );
  t.notOk(
    list.some((l) => l.endsWith('/etc/xen/scripts/block')),
    'the stock block is not in the package (xen-blockhooks-replace-block diverts it)',
  );

  const x = mkdtempSync(join(out, 'x-'));
  t.equal(sh('dpkg-deb', ['-x', deb, x]).code, 0);
  const wrapper = readFileSync(join(x, 'etc/xen/scripts/block-cow'), 'utf8');
  t.match(
    wrapper,
    /^s='\/usr\/lib\/xen-blockhooks\/block-cow\.snapshot'$/m,
    'the wrapper uses the snapshot post-install makes',
  );
  t.match(
    wrapper,
    /^exec "\$n" '\/usr\/lib\/xen-blockhooks\/block-cow\.mjs' "\$@"$/m,
    'or runs the bundle with the node post-install found',
  );
  t.notMatch(wrapper, /@[A-Z]+@/, 'no placeholder is left');
  t.match(
    readFileSync(join(x, 'lib/systemd/system/xen-blockhooks-boot.service'), 'utf8'),
    /^ExecStart=\/usr\/sbin\/xen-blockhooks gc --apply$/m,
  );
});

t.test('conffiles, maintainer scripts, trigger', async (t) => {
  const c = mkdtempSync(join(out, 'c-'));
  t.equal(sh('dpkg-deb', ['-e', deb, c]).code, 0);
  const hooks = readdirSync(DIST)
    .filter((f) => f.startsWith('block-') && f.endsWith('.cjs'))
    .map((f) => `/etc/xen/scripts/${f.replace(/\.cjs$/, '')}`);
  t.same(
    readFileSync(join(c, 'conffiles'), 'utf8').trim().split('\n').sort(),
    ['/etc/logrotate.d/xen-blockhooks', '/etc/xen/blockhooks.conf', ...hooks].sort(),
    'every file in /etc is a conffile',
  );
  for (const s of ['postinst', 'prerm', 'postrm']) {
    const r = sh('sh', ['-n', join(c, s)]);
    t.equal(r.code, 0, `${s} parses: ${r.err}`);
  }
  const postinst = readFileSync(join(c, 'postinst'), 'utf8');
  t.match(
    postinst,
    /configure \| triggered\)\n(?:.*\n)*?\s+if ! "\$LIBDIR\/post-install" \/usr\/bin\/node; then/,
    'postinst runs post-install on configure and when triggered',
  );
  t.match(
    readFileSync(join(c, 'triggers'), 'utf8'),
    /^interest-noawait \/usr\/bin\/node$/m,
    'a nodejs upgrade or reinstall triggers it',
  );
  const prerm = readFileSync(join(c, 'prerm'), 'utf8');
  t.match(prerm, /--live-disks/, 'prerm looks for live disks');
  t.match(prerm, /XEN_BLOCKHOOKS_FORCE_REMOVE/, 'and refuses without the force');
  const postrm = readFileSync(join(c, 'postrm'), 'utf8');
  t.match(postrm, /rm -rf \/run\/xen-blockhooks/, 'purge removes the runtime state');
  t.notMatch(postrm, /rm -r[f]* \/var\/lib\/xen-blockhooks/, 'and never the stores');
});

t.test('copyright: ours and every npm package in the bundles, with its licence', async (t) => {
  const x = mkdtempSync(join(out, 'd-'));
  t.equal(sh('dpkg-deb', ['-x', deb, x]).code, 0);
  const copyright = readFileSync(join(x, 'usr/share/doc/xen-blockhooks/copyright'), 'utf8');
  t.ok(copyright.includes(readFileSync(join(ROOT, 'LICENSE'), 'utf8').trim()), "the project's LICENSE");
  const licences = JSON.parse(readFileSync(join(DIST, 'licenses.json'), 'utf8')) as {
    name: string;
    version: string;
    license: string;
    text: string;
  }[];
  t.ok(
    licences.some((l) => l.name === 'winston'),
    'winston is among the bundled packages',
  );
  for (const l of licences) {
    t.ok(
      copyright.includes(`  ${l.name} ${l.version}: ${l.license}\n`),
      `${l.name} ${l.version} is listed with its licence ${l.license}`,
    );
    t.ok(copyright.includes(l.text), `and its licence text is there`);
  }
});

t.test('lintian: no error, no warning; every remaining tag is explained in docs/packaging.md', async (t) => {
  const probe = sh('lintian', ['--version']);
  t.equal(probe.code, 0, 'lintian is installed (a Debian package; scripts/setup.sh installs it)');
  if (probe.code !== 0) return;
  const r = sh('lintian', ['--pedantic', '-I', '--fail-on', 'error,warning', deb]);
  t.equal(r.code, 0, `lintian --fail-on error,warning:\n${r.out}${r.err}`);
  const tags = new Set(
    [...r.out.matchAll(/^([EWIPX]): xen-blockhooks: ([a-z0-9.+-]+)/gm)].map((m) => `${m[1]} ${m[2]}`),
  );
  t.notOk(
    [...tags].some((tag) => /^[EW] /.test(tag)),
    `no E: or W: tag: ${[...tags].join(', ')}`,
  );
  const notes = readFileSync(join(ROOT, 'docs/packaging.md'), 'utf8');
  for (const tag of tags) t.ok(notes.includes(tag.slice(2)), `${tag.slice(2)} is explained in docs/packaging.md`);
});
