#!/usr/bin/env node
/**
 * Builds the Debian package dist/xen-blockhooks_<version>_all.deb from the bundles in dist/ (npm
 * run build) and packaging/, with dpkg-deb. `npm run package` builds the bundles, then this.
 *
 *   /usr/lib/xen-blockhooks/        the bundles (*.cjs, *.mjs), snapshot.cjs, post-install (run by
 *                                   postinst and the nodejs trigger: node path, startup snapshots,
 *                                   code caches), block.wrapper (for xen-blockhooks-replace-block)
 *   /etc/xen/scripts/block-*        the hooks' wrappers (conffiles, as Xen's own scripts are)
 *   /usr/sbin/xen-blockhooks        the command's wrapper; xen-blockhooks-replace-block
 *   /etc/xen/blockhooks.conf        the defaults, all commented (a conffile)
 *   /etc/logrotate.d/xen-blockhooks the log's rotation (a conffile)
 *   /lib/systemd/system/            xen-blockhooks-boot.service and xen-blockhooks.service (both enabled)
 *   /usr/share/man/                 the man pages, gzipped
 *   /usr/share/doc/xen-blockhooks/  copyright (ours and every bundled npm package's, from
 *                                   dist/licenses.json), changelog.gz
 *   DEBIAN/                         control, conffiles, md5sums, triggers, postinst, prerm, postrm
 *
 * `node scripts/package.mjs [--version V] [--out DIR] [--dist DIR]` (V: the package version,
 * default package.json's; --out: where the .deb goes, default dist/; --dist: where the bundles
 * are, default dist/).
 */
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import {
  chmodSync,
  existsSync,
  lstatSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  readdirSync,
  rmSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';
import { gzipSync } from 'node:zlib';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const pkg = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8'));
const option = (name) => {
  const at = process.argv.indexOf(name);
  return at > 0 ? process.argv[at + 1] : undefined;
};
const version = option('--version') ?? pkg.version;
const dist = option('--dist') ?? join(root, 'dist');
const outDir = option('--out') ?? join(root, 'dist');
if (!version || !/^[0-9][A-Za-z0-9.+~-]*$/.test(version)) throw new Error(`not a Debian version: ${version}`);

/** Node's oldest version the bundles run on: package.json's engines (">=X.Y.Z"). */
export const MIN_NODE = /^>=(\d+\.\d+\.\d+)$/.exec(pkg.engines?.node ?? '')?.[1];
if (!MIN_NODE) throw new Error(`package.json engines.node is not ">=X.Y.Z": ${pkg.engines?.node}`);

const LIB = '/usr/lib/xen-blockhooks';
const SCRIPTS = '/etc/xen/scripts';
const UNITS = '/lib/systemd/system';
const DOC = '/usr/share/doc/xen-blockhooks';

const bundles = readdirSync(dist)
  .filter((f) => f.endsWith('.cjs') && f !== 'snapshot.cjs')
  .map((f) => f.replace(/\.cjs$/, ''))
  .sort();
for (const need of ['xen-blockhooks', 'block', 'block-cow']) {
  if (!bundles.includes(need)) throw new Error(`dist/ has no ${need}.cjs: run npm run build first`);
}
for (const f of ['snapshot.cjs', 'licenses.json'])
  if (!existsSync(join(dist, f))) throw new Error(`dist/${f} is missing: run npm run build first`);
const hooks = bundles.filter((b) => b.startsWith('block-'));

const stage = mkdtempSync(join(tmpdir(), 'xen-blockhooks-deb-'));
chmodSync(stage, 0o755);
try {
  const put = (path, content, mode = 0o644) => {
    const f = join(stage, path);
    mkdirSync(dirname(f), { recursive: true });
    writeFileSync(f, content);
    chmodSync(f, mode);
  };
  const copy = (from, path, mode = 0o644) => put(path, readFileSync(from), mode);

  // The bundles and their starters (scripts: #!/usr/bin/env node, though the wrappers run them
  // with the node post-install found).
  for (const b of bundles) {
    copy(join(dist, `${b}.cjs`), `${LIB}/${b}.cjs`);
    copy(join(dist, `${b}.mjs`), `${LIB}/${b}.mjs`, 0o755);
  }
  copy(join(dist, 'snapshot.cjs'), `${LIB}/snapshot.cjs`, 0o755);
  copy(join(root, 'packaging/post-install'), `${LIB}/post-install`, 0o755);

  // The wrappers (packaging/wrapper.sh.in, as ./install writes them for PREFIX=/usr).
  const template = readFileSync(join(root, 'packaging/wrapper.sh.in'), 'utf8');
  const wrapper = (name, snapshot) =>
    template
      .replaceAll('@NAME@', name)
      .replaceAll('@LIBDIR@', LIB)
      .replace('@BUNDLE@', `${LIB}/${name}.mjs`)
      .replace('@SNAPSHOT@', snapshot ? `${LIB}/${name}.snapshot` : '')
      .replace('@CONF@', '');
  for (const h of hooks) put(`${SCRIPTS}/${h}`, wrapper(h, true), 0o755);
  put(`${LIB}/block.wrapper`, wrapper('block', true), 0o755);
  put('/usr/sbin/xen-blockhooks', wrapper('xen-blockhooks', false), 0o755);
  copy(join(root, 'packaging/xen-blockhooks-replace-block'), '/usr/sbin/xen-blockhooks-replace-block', 0o755);

  copy(join(root, 'packaging/blockhooks.conf'), '/etc/xen/blockhooks.conf');
  copy(join(root, 'packaging/logrotate'), '/etc/logrotate.d/xen-blockhooks');
  for (const u of ['xen-blockhooks-boot.service', 'xen-blockhooks.service']) {
    put(`${UNITS}/${u}`, readFileSync(join(root, 'packaging', `${u}.in`), 'utf8').replaceAll('@SBINDIR@', '/usr/sbin'));
  }
  for (const page of readdirSync(join(root, 'packaging/man')).sort()) {
    const section = page.split('.').pop();
    put(
      `/usr/share/man/man${section}/${page}.gz`,
      gzipSync(readFileSync(join(root, 'packaging/man', page)), { level: 9 }),
    );
  }

  // copyright: ours, then every npm package inside the bundles with its licence text.
  const licences = JSON.parse(readFileSync(join(dist, 'licenses.json'), 'utf8'));
  put(
    `${DOC}/copyright`,
    [
      `xen-blockhooks ${version}`,
      '',
      'Everything but the npm packages listed below:',
      '',
      readFileSync(join(root, 'LICENSE'), 'utf8').trim(),
      '',
      `The bundles in ${LIB} (*.cjs) also contain these npm packages, each under its own licence:`,
      '',
      ...licences.map((l) => `  ${l.name} ${l.version}: ${l.license}`),
      '',
      'Their licence texts follow.',
      '',
      ...licences.map(
        (l) => `${'-'.repeat(72)}\n${l.name} ${l.version} (${l.license})\n${'-'.repeat(72)}\n\n${l.text}\n`,
      ),
    ].join('\n'),
  );
  const date = execFileSync(
    'date',
    [
      '-R',
      '-u',
      '-d',
      `@${Number(execFileSync('git', ['-C', root, 'log', '-1', '--format=%ct'], { encoding: 'utf8' }).trim() || 0)}`,
    ],
    { encoding: 'utf8' },
  ).trim();
  put(
    `${DOC}/changelog.gz`,
    gzipSync(
      `xen-blockhooks (${version}) unstable; urgency=medium\n\n  * Built from the xen-blockhooks repository; its git history is the change log.\n\n -- ${pkg.author}  ${date}\n`,
      { level: 9 },
    ),
  );

  // DEBIAN/
  const files = [];
  const walk = (d) => {
    for (const n of readdirSync(d).sort()) {
      const p = join(d, n);
      if (lstatSync(p).isDirectory()) walk(p);
      else files.push(relative(stage, p));
    }
  };
  walk(stage);
  const conffiles = files.filter((f) => f.startsWith('etc/')).map((f) => `/${f}`);
  const sizeKiB = files.reduce((s, f) => s + Math.ceil(lstatSync(join(stage, f)).size / 1024), 0);
  const md5sums = files.map(
    (f) =>
      `${createHash('md5')
        .update(readFileSync(join(stage, f)))
        .digest('hex')}  ${f}`,
  );
  const control = [
    'Package: xen-blockhooks',
    `Version: ${version}`,
    'Architecture: all',
    `Maintainer: ${pkg.author}`,
    `Installed-Size: ${sizeKiB}`,
    `Depends: nodejs (>= ${MIN_NODE}), dmsetup, mount, xen-utils-common, init-system-helpers (>= 1.52)`,
    'Recommends: qemu-utils, lvm2',
    'Suggests: ceph-common, thin-provisioning-tools, kpartx',
    'Section: admin',
    'Priority: optional',
    `Description: ${pkg.description.replace(/\.$/, '').slice(0, 80).split(':')[0]}`,
    ' Block hotplug scripts for a Xen dom0, written in TypeScript and run by the',
    " dom0's own Node.js: copy-on-write disks on device-mapper (block-cow), qcow2",
    ' overlays (block-qcow), thin provisioning (block-thin), LVM snapshots',
    ' (block-lvsnap), Ceph RBD clones (block-rbd), and a drop-in for the stock',
    ' block script. Every step is journalled before it runs, so a remove, or the',
    ' boot cleanup, undoes exactly what an add built.',
    ' .',
    ' The stock block stays in place unless xen-blockhooks-replace-block is run.',
    '',
  ].join('\n');
  put('/DEBIAN/control', control);
  put('/DEBIAN/conffiles', `${conffiles.join('\n')}\n`);
  put('/DEBIAN/md5sums', `${md5sums.join('\n')}\n`);
  copy(join(root, 'packaging/debian/triggers'), '/DEBIAN/triggers');
  for (const s of ['postinst', 'prerm', 'postrm']) copy(join(root, 'packaging/debian', s), `/DEBIAN/${s}`, 0o755);

  const out = join(outDir, `xen-blockhooks_${version}_all.deb`);
  mkdirSync(outDir, { recursive: true });
  rmSync(out, { force: true });
  execFileSync('dpkg-deb', ['--root-owner-group', '-Zxz', '--build', stage, out], {
    stdio: ['ignore', 'ignore', 'inherit'],
  });
  console.log(`built ${relative(root, out)} (${files.length} files, ${sizeKiB} KiB installed)`);
} finally {
  rmSync(stage, { recursive: true, force: true });
}
