/**
 * One truth about Node versions: the oldest Node the bundles are claimed to run on is
 * package.json's engines.node (">=X.Y.Z"), and ./install, post-install, the README and the
 * Debian package (test/host/deb-package.test.ts) all say the same. Then the claim is tried: Debian
 * 12's own nodejs of exactly that version (apt-get download, cached in .cache/node-floor/; nothing
 * is installed) runs every bundle, makes the startup snapshots through post-install, and a hook's
 * wrapper starts from one. Debian's node loads some builtins from /usr/share/nodejs, so each run
 * happens in a private mount namespace with the packages' /usr/share laid over this machine's.
 */
import t from 'tap';
import { spawnSync } from 'node:child_process';
import {
  copyFileSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  readdirSync,
  rmSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const ROOT = join(import.meta.dirname, '../..');
const DIST = join(ROOT, 'dist');
const CACHE = join(ROOT, '.cache', 'node-floor');
const pkg = JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as {
  version: string;
  engines: { node: string };
};
const FLOOR = /^>=(\d+\.\d+\.\d+)$/.exec(pkg.engines.node)?.[1] ?? '';

function sh(cmd: string, args: string[], opts: { cwd?: string; env?: NodeJS.ProcessEnv } = {}) {
  const r = spawnSync(cmd, args, { encoding: 'utf8', maxBuffer: 64 << 20, ...opts });
  return { code: r.status, out: r.stdout ?? '', err: `${r.stderr ?? ''}${r.error ? String(r.error) : ''}` };
}

t.test('engines.node, ./install, post-install and the README name the same oldest Node', async (t) => {
  t.match(FLOOR, /^\d+\.\d+\.\d+$/, `engines.node is ">=X.Y.Z": ${pkg.engines.node}`);
  for (const f of ['install', 'packaging/post-install']) {
    t.match(
      readFileSync(join(ROOT, f), 'utf8'),
      new RegExp(`^MIN_NODE=${FLOOR.replace(/\./g, '\\.')}$`, 'm'),
      `${f}: MIN_NODE=${FLOOR}`,
    );
  }
  const readme = readFileSync(join(ROOT, 'README.md'), 'utf8');
  const installing = readme.slice(readme.indexOf('## Installing on a dom0'));
  t.ok(installing.includes(`Node.js ${FLOOR}`), `the README's "Installing on a dom0" says Node.js ${FLOOR}`);
  // Every version of the floor's major the README names is the floor (or its major.minor); other
  // majors are about building (the toolchain), not about running the bundles.
  const major = FLOOR.split('.')[0]!;
  const claims = [...readme.matchAll(/\b(?:node(?:js)?|Node(?:\.js)?) (\d+(?:\.\d+){1,2})\b/g)]
    .map((m) => m[1]!)
    .filter((v) => v.split('.')[0] === major);
  t.ok(claims.length > 0, `the README names Node ${major} versions: ${claims.join(', ')}`);
  for (const c of claims)
    t.ok(FLOOR === c || FLOOR.startsWith(`${c}.`), `the README's Node ${c} is the floor ${FLOOR}`);
});

/** Debian's nodejs at the floor and the packages it needs that this machine lacks, unpacked into one tree. */
function debianNodeRoot(): string {
  const madison = sh('apt-cache', ['madison', 'nodejs']);
  if (madison.code !== 0) throw new Error(`apt-cache madison nodejs failed: ${madison.err}`);
  const version = madison.out
    .split('\n')
    .map((l) => l.split('|').map((s) => s.trim()))
    .find((c) => /debian/.test(c[2] ?? '') && (c[1] ?? '').replace(/^\d+:/, '').split(/[+~-]/)[0] === FLOOR)?.[1];
  if (!version)
    throw new Error(
      `apt knows no Debian nodejs ${FLOOR} (the oldest Node claimed, engines.node); apt-cache madison nodejs says:\n${madison.out}(if Debian has moved on, the claim must move too)`,
    );
  const tree = join(CACHE, version.replace(/[^A-Za-z0-9.+~-]/g, '_'));
  if (existsSync(join(tree, '.done'))) return tree;
  const debs = join(CACHE, 'debs');
  mkdirSync(debs, { recursive: true });
  const deps = sh('apt-cache', [
    'depends',
    '--no-recommends',
    '--no-suggests',
    '--no-conflicts',
    '--no-breaks',
    '--no-replaces',
    '--no-enhances',
    'libnode108',
  ])
    .out.split('\n')
    .map((l) => /^\s*Depends:\s*([^\s<>]+)\s*$/.exec(l)?.[1])
    .filter((p): p is string => Boolean(p))
    .filter((p) => !/install ok installed/.test(sh('dpkg-query', ['-W', '-f=${Status}', p]).out));
  const want = [`nodejs=${version}`, `libnode108=${version}`, ...deps];
  const dl = sh('apt-get', ['download', ...want], { cwd: debs });
  if (dl.code !== 0) throw new Error(`apt-get download ${want.join(' ')} failed (run apt-get update?): ${dl.err}`);
  rmSync(tree, { recursive: true, force: true });
  mkdirSync(tree, { recursive: true });
  for (const name of ['nodejs', 'libnode108', ...deps]) {
    const v = name === 'nodejs' || name === 'libnode108' ? `${version.replace(/^\d+:/, '')}_` : '';
    const f = readdirSync(debs).find((d) => d.startsWith(`${name}_${v}`) && d.endsWith('.deb'));
    if (!f) throw new Error(`apt-get download left no ${name} .deb in ${debs}`);
    const x = sh('dpkg-deb', ['-x', join(debs, f), tree]);
    if (x.code !== 0) throw new Error(`dpkg-deb -x ${f}: ${x.err}`);
  }
  writeFileSync(join(tree, '.done'), `${version}\n`);
  return tree;
}

t.test(
  `Debian 12's nodejs ${FLOOR} runs every bundle and starts a hook from a snapshot post-install made`,
  async (t) => {
    let tree: string;
    try {
      tree = debianNodeRoot();
    } catch (e) {
      return t.fail((e as Error).message);
    }
    const top = mkdtempSync(join(tmpdir(), 'xbh-floor-'));
    t.teardown(() => rmSync(top, { recursive: true, force: true }));
    // Runs argv in a private mount namespace with the tree's /usr/share over this machine's and its
    // libraries first on the library path; nothing outside the namespace sees it. Without the
    // NODE_OPTIONS the test runner gives every node it spawns (they load its modules from here).
    const inNs = join(top, 'in-ns');
    writeFileSync(
      inNs,
      `#!/bin/sh\nset -e\nunset NODE_OPTIONS\nmount -t overlay overlay -o lowerdir=${tree}/usr/share:/usr/share /usr/share\nLD_LIBRARY_PATH=${tree}/usr/lib/x86_64-linux-gnu\nexport LD_LIBRARY_PATH\nexec "$@"\n`,
      { mode: 0o755 },
    );
    const run = (args: string[]) =>
      sh('unshare', ['--mount', '--propagation', 'private', inNs, ...args], {
        env: { PATH: '/usr/sbin:/usr/bin:/sbin:/bin' },
      });
    const node = join(tree, 'usr/bin/node');

    const v = run([node, '--version']);
    t.equal(v.out.trim(), `v${FLOOR}`, `Debian's node is ${FLOOR}: ${v.err}`);

    const bundles = readdirSync(DIST)
      .filter((f) => f.endsWith('.cjs') && f !== 'snapshot.cjs')
      .map((f) => f.replace(/\.cjs$/, ''));
    t.ok(bundles.length >= 7, `the bundles are built: ${bundles.join(', ')}`);
    const lib = join(top, 'lib');
    mkdirSync(lib);
    for (const b of bundles)
      for (const ext of ['cjs', 'mjs']) copyFileSync(join(DIST, `${b}.${ext}`), join(lib, `${b}.${ext}`));
    copyFileSync(join(DIST, 'snapshot.cjs'), join(lib, 'snapshot.cjs'));
    copyFileSync(join(ROOT, 'packaging/post-install'), join(lib, 'post-install'));
    for (const b of bundles) {
      const r = run([node, join(lib, `${b}.mjs`), '--version']);
      t.equal(r.code, 0, `${b} --version exits 0 under ${FLOOR}: ${r.err}`);
      t.equal(
        r.out.trim(),
        b === 'xen-blockhooks' ? `xen-blockhooks ${pkg.version}` : `${b} (xen-blockhooks) ${pkg.version}`,
        `${b} prints its version`,
      );
      t.equal(r.err, '', 'quietly');
    }
    const help = run([node, join(lib, 'xen-blockhooks.mjs'), '--help']);
    t.equal(help.code, 0, help.err);
    t.match(help.out, /Commands:/, 'the command runs its help');

    const p = run(['sh', join(lib, 'post-install'), node]);
    t.equal(p.code, 0, p.err);
    const hooks = bundles.filter((b) => b === 'block' || b.startsWith('block-'));
    t.match(
      p.out,
      new RegExp(
        `post-install: node ${node.replace(/[.+]/g, '\\$&')} \\(v${FLOOR.replace(/\./g, '\\.')}\\); startup snapshots: ${hooks.join(' ')}\\n`,
      ),
      "post-install made every hook's snapshot with it",
    );
    t.equal(p.err, '', 'without a warning');
    t.ok(existsSync(join(lib, 'block-cow.snapshot.lib')), 'stamped with the libnode it runs on');
    const wrapper = readFileSync(join(ROOT, 'packaging/wrapper.sh.in'), 'utf8')
      .replaceAll('@NAME@', 'block-cow')
      .replaceAll('@LIBDIR@', lib)
      .replace('@BUNDLE@', join(lib, 'block-cow.mjs'))
      .replace('@SNAPSHOT@', join(lib, 'block-cow.snapshot'))
      .replace('@CONF@', '');
    writeFileSync(join(top, 'block-cow'), wrapper, { mode: 0o755 });
    const w = run([join(top, 'block-cow'), '--version']);
    t.equal(w.code, 0, w.err);
    t.equal(
      w.out.trim(),
      `block-cow (xen-blockhooks) ${pkg.version} (startup snapshot)`,
      'the wrapper starts block-cow from its snapshot',
    );
    t.equal(w.err, '', 'quietly');
  },
);
