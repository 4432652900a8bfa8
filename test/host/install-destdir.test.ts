/**
 * The installer, run for real into a DESTDIR from a copy of the package layout whose dist/ holds
 * small stand-in bundles (so the test does not depend on a build): file list and modes, the
 * wrappers it writes (run them), dry run, uninstall, the stock block, the configuration, Node.
 * One test takes the real bundles: a DESTDIR install leaves no snapshot, code cache or node path
 * of the build machine in the tree, and post-install, run on the target, makes them.
 */
import t from 'tap';
import { spawnSync } from 'node:child_process';
import {
  chmodSync,
  cpSync,
  existsSync,
  lstatSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  readdirSync,
  readlinkSync,
  rmSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join, relative } from 'node:path';

const ROOT = join(import.meta.dirname, '../..');

function tree(dir: string): string[] {
  const out: string[] = [];
  const walk = (d: string) => {
    for (const n of readdirSync(d)) {
      const p = join(d, n);
      const st = lstatSync(p);
      if (st.isDirectory()) walk(p);
      else out.push(`${(st.mode & 0o7777).toString(8)} /${relative(dir, p)}`);
    }
  };
  if (existsSync(dir)) walk(dir);
  return out.sort((a, b) => (a.split(' ')[1]! < b.split(' ')[1]! ? -1 : 1));
}

/** A wrapper without its fixed fallback list (/usr/bin/node /usr/local/bin/node), which may name this machine's node too. */
function withoutFallback(wrapper: string): string {
  const lines = wrapper.split('\n');
  const fallback: string[] = lines.filter((l) => l === "\tfallback='/usr/bin/node /usr/local/bin/node'");
  if (fallback.length !== 1) throw new Error(`the wrapper has ${fallback.length} fallback lines, not 1`);
  return lines.filter((l) => !fallback.includes(l)).join('\n');
}

function setup(t: { teardown(f: () => void): void }) {
  const top = mkdtempSync(join(tmpdir(), 'xbh-install-'));
  t.teardown(() => rmSync(top, { recursive: true, force: true }));
  const src = join(top, 'src');
  mkdirSync(join(src, 'dist'), { recursive: true });
  cpSync(join(ROOT, 'install'), join(src, 'install'));
  cpSync(join(ROOT, 'packaging'), join(src, 'packaging'), { recursive: true });
  // Like the real ones: --version writes the bundle's code cache beside it (scripts/loader.mjs.in).
  const hook = (name: string) =>
    `#!/usr/bin/env node\nimport { writeFileSync } from 'node:fs';\nif (process.argv[2] === '--version') writeFileSync(new URL('./${name}.cjs.0123456789abcdef.v0-x64.v8cache', import.meta.url), 'cache');\nprocess.stdout.write(JSON.stringify({ name: ${JSON.stringify(name)}, argv: process.argv.slice(2), nodeOptions: process.env.NODE_OPTIONS ?? null, nodePath: process.env.NODE_PATH ?? null, conf: process.env.XEN_BLOCKHOOKS_CONF ?? null, execPath: process.execPath }));\n`;
  for (const b of ['block', 'block-cow', 'block-qcow', 'xen-blockhooks'])
    writeFileSync(join(src, 'dist', `${b}.cjs`), `// the ${b} bundle\n`);
  for (const b of ['block', 'block-cow', 'block-qcow']) writeFileSync(join(src, 'dist', `${b}.mjs`), hook(b));
  // check: says which configuration and script directory it was given; FAKE_CHECK_EXIT makes it find problems.
  writeFileSync(
    join(src, 'dist', 'xen-blockhooks.mjs'),
    `${hook('xen-blockhooks').replace(/\n$/, '')}\nif (process.argv[2] === 'serve') process.exitCode = 2;\n` +
      "if (process.argv[2] === 'check') { process.stdout.write(`\\ncheck env: ${process.env.XEN_BLOCKHOOKS_CONF} ${process.env.XEN_SCRIPT_DIR}\\n`); if (process.env.FAKE_CHECK_EXIT) { process.stdout.write('problem: the fake check found one\\n1 problem found.\\n'); process.exitCode = Number(process.env.FAKE_CHECK_EXIT); } }\n",
  );
  const dest = join(top, 'dest');
  mkdirSync(dest);
  const install = (args: string[], env: Record<string, string> = {}) => {
    const r = spawnSync('/bin/sh', [join(src, 'install'), ...args], {
      encoding: 'utf8',
      env: { PATH: process.env.PATH, DESTDIR: dest, NODE: process.execPath, ...env },
    });
    return { code: r.status, out: r.stdout, err: r.stderr };
  };
  const stock = '#!/bin/bash\n# the stock Xen block script\nexit 0\n';
  const seed = () => {
    mkdirSync(join(dest, 'etc/xen/scripts'), { recursive: true });
    writeFileSync(join(dest, 'etc/xen/scripts/block'), stock, { mode: 0o755 });
    writeFileSync(join(dest, 'etc/xen/scripts/vif-bridge'), '#!/bin/sh\n', { mode: 0o755 });
    chmodSync(join(dest, 'etc/xen/scripts/block'), 0o755);
    chmodSync(join(dest, 'etc/xen/scripts/vif-bridge'), 0o755);
  };
  return { top, src, dest, install, seed, stock };
}

const INSTALLED = [
  '644 /etc/logrotate.d/xen-blockhooks',
  '777 /etc/systemd/system/multi-user.target.wants/xen-blockhooks-boot.service',
  '644 /etc/xen/blockhooks.conf',
  '755 /etc/xen/scripts/block',
  '755 /etc/xen/scripts/block-cow',
  '755 /etc/xen/scripts/block-qcow',
  '755 /etc/xen/scripts/vif-bridge',
  '644 /usr/lib/systemd/system/xen-blockhooks-boot.service',
  '644 /usr/lib/xen-blockhooks/MANIFEST',
  '644 /usr/lib/xen-blockhooks/block-cow.cjs',
  '644 /usr/lib/xen-blockhooks/block-cow.mjs',
  '644 /usr/lib/xen-blockhooks/block-qcow.cjs',
  '644 /usr/lib/xen-blockhooks/block-qcow.mjs',
  '644 /usr/lib/xen-blockhooks/block.cjs',
  '644 /usr/lib/xen-blockhooks/block.mjs',
  '755 /usr/lib/xen-blockhooks/post-install',
  '644 /usr/lib/xen-blockhooks/xen-blockhooks.cjs',
  '644 /usr/lib/xen-blockhooks/xen-blockhooks.mjs',
  '755 /usr/sbin/xen-blockhooks',
  '644 /usr/share/man/man5/blockhooks.conf.5',
  '644 /usr/share/man/man8/block-cow.8',
  '644 /usr/share/man/man8/block-qcow.8',
  '644 /usr/share/man/man8/xen-blockhooks-block.8',
  '644 /usr/share/man/man8/xen-blockhooks.8',
];

t.test('install into a DESTDIR: files, modes, wrappers; uninstall puts the tree back', async (t) => {
  const h = setup(t);
  h.seed();
  const before = tree(h.dest);
  const r = h.install([]);
  t.equal(r.code, 0, r.err);
  t.same(tree(h.dest), INSTALLED, 'exactly these files, with these modes');
  t.equal(readFileSync(join(h.dest, 'etc/xen/scripts/block'), 'utf8'), h.stock, 'the stock block is untouched');
  const wrapper = readFileSync(join(h.dest, 'etc/xen/scripts/block-cow'), 'utf8');
  t.match(wrapper, /^#!\/bin\/bash\n/);
  t.match(wrapper, /unset NODE_OPTIONS NODE_PATH/);
  t.ok(
    wrapper.includes(`exec "$n" '/usr/lib/xen-blockhooks/block-cow.mjs' "$@"`),
    'execs the node post-install found on the installed bundle',
  );
  t.notOk(withoutFallback(wrapper).includes(process.execPath), "the build machine's node path is not in the wrapper");
  t.notOk(
    wrapper.includes('XEN_BLOCKHOOKS_CONF'),
    'with SYSCONFDIR=/etc the programs read their default configuration',
  );
  t.ok(
    readFileSync(join(h.dest, 'usr/sbin/xen-blockhooks'), 'utf8').includes(
      "'/usr/lib/xen-blockhooks/xen-blockhooks.mjs'",
    ),
  );
  t.notOk(
    existsSync(join(h.dest, 'usr/lib/systemd/system/xen-blockhooks.service')),
    'no service unit when the command has no serve',
  );
  const boot = readFileSync(join(h.dest, 'usr/lib/systemd/system/xen-blockhooks-boot.service'), 'utf8');
  t.match(boot, /^ExecStart=\/usr\/sbin\/xen-blockhooks gc --apply$/m, 'the boot cleanup runs gc --apply');
  t.match(boot, /^Before=xendomains\.service libvirt-guests\.service$/m, 'before xendomains restores saved domains');
  t.match(
    boot,
    /^After=local-fs\.target remote-fs\.target xen\.service xenstored\.service xen-init-dom0\.service$/m,
    "after xenstore: Debian 12's sysv xen (xen.service), upstream's xenstored.service",
  );
  t.equal(
    readlinkSync(join(h.dest, 'etc/systemd/system/multi-user.target.wants/xen-blockhooks-boot.service')),
    '/usr/lib/systemd/system/xen-blockhooks-boot.service',
    'enabled as systemctl enable would',
  );
  t.equal(
    readFileSync(join(h.dest, 'etc/xen/blockhooks.conf'), 'utf8'),
    readFileSync(join(ROOT, 'packaging/blockhooks.conf'), 'utf8'),
  );
  t.ok(r.out.includes(`\n/usr/sbin/xen-blockhooks check --root ${h.dest}\n`), 'the check is announced');
  const ran = JSON.parse(r.out.split('\n').find((l) => l.includes('"argv":["check"')) ?? 'null');
  t.same(ran?.argv, ['check', '--root', h.dest], 'xen-blockhooks check runs on the staged tree');
  t.ok(
    r.out.includes(`check env: ${h.dest}/etc/xen/blockhooks.conf /etc/xen/scripts\n`),
    'with the configuration just written and the script directory the hooks went to',
  );
  t.equal(r.err, '', 'a check without problems adds nothing on stderr');

  // Run a wrapper the way libxl would, with a hostile environment. The bundle path is under /usr,
  // so point a copy of the wrapper at the staged bundle, with the node file post-install writes.
  const staged = wrapper.replaceAll('/usr/lib/xen-blockhooks/', `${h.dest}/usr/lib/xen-blockhooks/`);
  writeFileSync(join(h.top, 'w'), staged, { mode: 0o755 });
  writeFileSync(join(h.dest, 'usr/lib/xen-blockhooks/node'), `${process.execPath}\n`);
  const w = spawnSync(join(h.top, 'w'), ['add', 'x y'], {
    encoding: 'utf8',
    env: { PATH: '/nonexistent', NODE_OPTIONS: '--require /nonexistent.js', NODE_PATH: '/x' },
  });
  t.equal(w.status, 0, w.stderr);
  t.same(
    JSON.parse(w.stdout),
    {
      name: 'block-cow',
      argv: ['add', 'x y'],
      nodeOptions: null,
      nodePath: null,
      conf: null,
      execPath: process.execPath,
    },
    'arguments passed as given, Node options and PATH do not matter',
  );
  writeFileSync(join(h.dest, 'usr/lib/xen-blockhooks/node'), '/nonexistent/node\n');
  const fallback = spawnSync(join(h.top, 'w'), ['add'], { encoding: 'utf8', env: { PATH: '/nonexistent' } });
  if (existsSync('/usr/bin/node') || existsSync('/usr/local/bin/node')) {
    t.equal(
      fallback.status,
      0,
      `a node file naming no node falls back to /usr/bin/node or /usr/local/bin/node: ${fallback.stderr}`,
    );
  } else {
    t.match(fallback.stderr, /no node found/, 'without any node the wrapper says so');
  }
  rmSync(join(h.dest, 'usr/lib/xen-blockhooks/node'));

  const again = h.install([]);
  t.equal(again.code, 0, 'reinstall over our own wrappers works');
  t.same(tree(h.dest), INSTALLED);

  const u = h.install(['--uninstall']);
  t.equal(u.code, 0, u.err);
  t.same(tree(h.dest), before, 'uninstall removes exactly what was installed');
  t.equal(h.install(['--uninstall']).code, 1, 'a second uninstall has nothing to do and says so');
});

t.test('dry run prints every action and writes nothing', async (t) => {
  const h = setup(t);
  h.seed();
  const before = tree(h.dest);
  const r = h.install(['--dry-run', '--replace-block']);
  t.equal(r.code, 0, r.err);
  t.match(r.out, /install -D -m 0644 .*\/dist\/block-cow\.mjs .*\/usr\/lib\/xen-blockhooks\/block-cow\.mjs/);
  t.match(r.out, /write .*\/etc\/xen\/scripts\/block-cow \(exec /);
  t.match(r.out, /mv .*\/etc\/xen\/scripts\/block .*\/etc\/xen\/scripts\/block\.stock/);
  t.match(r.out, /dry run: nothing was written/);
  t.same(tree(h.dest), before, 'nothing written');
  h.install([]);
  const installed = tree(h.dest);
  const u = h.install(['--uninstall', '--dry-run']);
  t.equal(u.code, 0);
  t.match(u.out, /rm -f .*block-cow/);
  t.same(tree(h.dest), installed, 'a dry uninstall removes nothing');
});

t.test('--replace-block keeps the stock script as block.stock and uninstall restores it', async (t) => {
  const h = setup(t);
  h.seed();
  const before = tree(h.dest);
  const r = h.install(['--replace-block']);
  t.equal(r.code, 0, r.err);
  t.equal(readFileSync(join(h.dest, 'etc/xen/scripts/block.stock'), 'utf8'), h.stock, 'the original is kept');
  t.match(
    readFileSync(join(h.dest, 'etc/xen/scripts/block'), 'utf8'),
    /^# xen-blockhooks: block /m,
    'block is our wrapper',
  );
  t.ok(existsSync(join(h.dest, 'usr/share/man/man8/xen-blockhooks-block.8')));
  t.equal(h.install(['--replace-block']).code, 0, 'again: our own block wrapper is simply rewritten');
  t.equal(
    readFileSync(join(h.dest, 'etc/xen/scripts/block.stock'), 'utf8'),
    h.stock,
    'and block.stock is still the original',
  );
  t.equal(h.install(['--uninstall']).code, 0);
  t.same(tree(h.dest), before, 'the stock block is back and nothing else is left');
  t.equal(readFileSync(join(h.dest, 'etc/xen/scripts/block'), 'utf8'), h.stock);
});

t.test('an edited configuration is never replaced or removed', async (t) => {
  const h = setup(t);
  mkdirSync(join(h.dest, 'etc/xen'), { recursive: true });
  writeFileSync(join(h.dest, 'etc/xen/blockhooks.conf'), 'store_dir = /srv/stores\n');
  t.equal(h.install([]).code, 0);
  t.equal(
    readFileSync(join(h.dest, 'etc/xen/blockhooks.conf'), 'utf8'),
    'store_dir = /srv/stores\n',
    'kept on install',
  );
  t.equal(h.install(['--uninstall']).code, 0);
  t.equal(
    readFileSync(join(h.dest, 'etc/xen/blockhooks.conf'), 'utf8'),
    'store_dir = /srv/stores\n',
    'kept on uninstall',
  );
  const h2 = setup(t);
  t.equal(h2.install([]).code, 0);
  writeFileSync(join(h2.dest, 'etc/xen/blockhooks.conf'), '# mine\n', { flag: 'a' });
  const u = h2.install(['--uninstall']);
  t.match(u.err, /keeping .*blockhooks\.conf: it was edited/);
  t.ok(existsSync(join(h2.dest, 'etc/xen/blockhooks.conf')), 'our file, edited after install, stays');
});

t.test('refusals: old Node, a foreign block-cow, bad arguments', async (t) => {
  const h = setup(t);
  const fake = (v: string) => {
    const f = join(h.top, `node-${v}`);
    writeFileSync(f, `#!/bin/sh\necho v${v}\n`, { mode: 0o755 });
    return f;
  };
  for (const v of ['18.20.3', '18.19.0', '16.20.0', '12.22.12']) {
    const r = h.install([], { NODE: fake(v) });
    t.equal(r.code, 1, `Node ${v} is refused`);
    t.match(r.err, new RegExp(`is Node.js ${v.replace(/\./g, '\\.')}; xen-blockhooks needs 18\\.20\\.4 or newer`));
    t.same(tree(h.dest), [], 'and nothing is written');
  }
  for (const v of ['18.20.4', '20.5.0', '22.1.0']) {
    t.equal(h.install(['--dry-run'], { NODE: fake(v) }).code, 0, `Node ${v} is accepted`);
  }
  t.equal(h.install([], { NODE: '/nonexistent/node' }).code, 1);
  mkdirSync(join(h.dest, 'etc/xen/scripts'), { recursive: true });
  writeFileSync(join(h.dest, 'etc/xen/scripts/block-cow'), '#!/bin/sh\n# someone else\n', { mode: 0o755 });
  const r = h.install([]);
  t.equal(r.code, 1);
  t.match(r.err, /block-cow exists and is not an xen-blockhooks wrapper/);
  t.same(tree(h.dest), ['755 /etc/xen/scripts/block-cow'], 'nothing installed');
  const bad = h.install(['--frobnicate']);
  t.equal(bad.code, 2);
  t.match(bad.err, /unknown argument "--frobnicate"/);
  t.equal(h.install(['--help']).code, 0);
});

t.test('PREFIX, XEN_SCRIPT_DIR, and a logrotate file that already rotates the log', async (t) => {
  const h = setup(t);
  mkdirSync(join(h.dest, 'etc/logrotate.d'), { recursive: true });
  writeFileSync(join(h.dest, 'etc/logrotate.d/xen-utils-common'), '/var/log/xen/*.log {\n\tweekly\n}\n');
  const r = h.install([], { PREFIX: '/opt/xbh', XEN_SCRIPT_DIR: '/usr/local/etc/xen/scripts' });
  t.equal(r.code, 0, r.err);
  const files = tree(h.dest);
  t.ok(files.includes('755 /opt/xbh/sbin/xen-blockhooks'));
  t.ok(files.includes('755 /usr/local/etc/xen/scripts/block-cow'));
  t.ok(files.includes('644 /opt/xbh/share/man/man8/block-cow.8'));
  t.ok(files.includes('644 /opt/xbh/share/man/man5/blockhooks.conf.5'), 'the configuration page under PREFIX');
  t.notOk(files.includes('644 /etc/logrotate.d/xen-blockhooks'), 'no duplicate logrotate entry');
  t.match(r.out, /xen-utils-common already rotates the log/);
  t.ok(
    readFileSync(join(h.dest, 'usr/local/etc/xen/scripts/block-cow'), 'utf8').includes(
      "'/opt/xbh/lib/xen-blockhooks/block-cow.mjs'",
    ),
  );
  t.equal(h.install(['--uninstall'], { PREFIX: '/opt/xbh', XEN_SCRIPT_DIR: '/usr/local/etc/xen/scripts' }).code, 0);
  t.same(tree(h.dest), ['644 /etc/logrotate.d/xen-utils-common']);
});

t.test('the shipped configuration documents every key and parses', async (t) => {
  const { CONFIG_KEYS, parseConfig, defaultConfig } = await import('../../src/config/config.js');
  const text = readFileSync(join(ROOT, 'packaging/blockhooks.conf'), 'utf8');
  for (const k of CONFIG_KEYS) t.match(text, new RegExp(`^#${k.replace(/\./g, '\\.')} = `, 'm'), `${k} is documented`);
  const active = text
    .split('\n')
    .map((l) => l.replace(/^#([a-z_.]+ = )/, '$1'))
    .join('\n');
  t.same(parseConfig(active, 'blockhooks.conf'), defaultConfig(), 'uncommented, it states exactly the defaults');
});

t.test('the service unit is installed, not enabled (and uninstalled) when the CLI has the serve command', async (t) => {
  const h = setup(t);
  h.seed();
  writeFileSync(join(h.src, 'dist', 'xen-blockhooks.mjs'), '#!/usr/bin/env node\n');
  const r = h.install([]);
  t.equal(r.code, 0, r.err);
  const unit = join(h.dest, 'usr/lib/systemd/system/xen-blockhooks.service');
  const wants = join(h.dest, 'etc/systemd/system/multi-user.target.wants/xen-blockhooks.service');
  t.ok(existsSync(unit), 'unit written');
  const text = readFileSync(unit, 'utf8');
  t.match(text, /^ExecStart=\/usr\/sbin\/xen-blockhooks serve$/m);
  t.match(text, /^KillMode=process$/m, "a stop signals the service alone, never a disk's qemu-nbd");
  t.notOk(existsSync(wants), 'not enabled: the wrappers work without it');
  t.equal(h.install(['--uninstall']).code, 0);
  t.notOk(existsSync(unit), 'removed by --uninstall');
});

t.test('a check that finds problems is shown, and the installation is still complete', async (t) => {
  const h = setup(t);
  h.seed();
  const r = h.install([], { FAKE_CHECK_EXIT: '1' });
  t.equal(r.code, 0, 'the files are installed: the install itself did not fail');
  t.same(tree(h.dest), INSTALLED, 'every file is there');
  t.match(r.out, /\nproblem: the fake check found one\n1 problem found\.\n/, "the check's list is printed");
  t.equal(
    r.err,
    'install: xen-blockhooks check found problems (exit status 1, listed above): the files are installed, but the hooks will fail until they are fixed; run "xen-blockhooks check" again after fixing them\n',
  );
  const dry = h.install(['--dry-run'], { FAKE_CHECK_EXIT: '1' });
  t.match(
    dry.out,
    /\/usr\/sbin\/xen-blockhooks check --root .*\ndry run: nothing was written\n$/,
    'a dry run names the check and does not run it',
  );
  t.equal(dry.err, '');
});

t.test('SYSCONFDIR reaches the programs: the wrappers name its configuration', async (t) => {
  const h = setup(t);
  const r = h.install([], { SYSCONFDIR: '/opt/etc' });
  t.equal(r.code, 0, r.err);
  t.ok(existsSync(join(h.dest, 'opt/etc/xen/blockhooks.conf')), 'the configuration is written there');
  const wrapper = readFileSync(join(h.dest, 'usr/sbin/xen-blockhooks'), 'utf8');
  writeFileSync(join(h.top, 'w'), wrapper.replaceAll('/usr/lib/xen-blockhooks/', `${h.dest}/usr/lib/xen-blockhooks/`), {
    mode: 0o755,
  });
  writeFileSync(join(h.dest, 'usr/lib/xen-blockhooks/node'), `${process.execPath}\n`);
  const w = spawnSync(join(h.top, 'w'), ['status'], { encoding: 'utf8', env: { PATH: '/nonexistent' } });
  t.equal(w.status, 0, w.stderr);
  t.equal(
    JSON.parse(w.stdout).conf,
    '/opt/etc/xen/blockhooks.conf',
    'the program is told the configuration under SYSCONFDIR',
  );
  const mine = spawnSync(join(h.top, 'w'), ['status'], {
    encoding: 'utf8',
    env: { PATH: '/nonexistent', XEN_BLOCKHOOKS_CONF: '/tmp/other.conf' },
  });
  t.equal(JSON.parse(mine.stdout).conf, '/tmp/other.conf', "a caller's XEN_BLOCKHOOKS_CONF still wins");
  rmSync(join(h.dest, 'usr/lib/xen-blockhooks/node'));
  t.equal(h.install(['--uninstall'], { SYSCONFDIR: '/opt/etc' }).code, 0);
});

t.test('--uninstall warns about disks the journal still holds', async (t) => {
  const h = setup(t);
  t.equal(h.install([]).code, 0);
  const state = join(h.dest, 'run/xen-blockhooks');
  writeFileSync(join(h.dest, 'etc/xen/blockhooks.conf'), `state_dir = ${state}\n`);
  mkdirSync(join(state, 'journal'), { recursive: true });
  writeFileSync(join(state, 'journal', 'backend~vbd~5~51712.json'), '{}\n');
  const u = h.install(['--uninstall']);
  t.equal(u.code, 0, 'the uninstall itself goes ahead');
  t.match(u.err, /warning: the journal holds disks a hook attached and nothing has removed yet/);
  t.match(u.err, /\n {2}backend\/vbd\/5\/51712\n/, 'each live disk is named by its backend path');
  const h2 = setup(t);
  t.equal(h2.install([]).code, 0);
  const quiet = h2.install(['--uninstall']);
  t.notMatch(quiet.err, /journal holds/, 'no warning without live disks');
});

t.test(
  'the real bundles into a DESTDIR: no snapshot, code cache or node path from this machine; post-install on the target makes them',
  async (t) => {
    const h = setup(t);
    const dist = join(ROOT, 'dist');
    t.ok(
      existsSync(join(dist, 'block-cow.cjs')) && existsSync(join(dist, 'snapshot.cjs')),
      'the bundles are built (npm run build)',
    );
    rmSync(join(h.src, 'dist'), { recursive: true });
    mkdirSync(join(h.src, 'dist'));
    for (const f of readdirSync(dist)) if (!f.includes('.v8cache')) cpSync(join(dist, f), join(h.src, 'dist', f));
    const r = h.install([]);
    t.equal(r.code, 0, r.err);
    const lib = join(h.dest, 'usr/lib/xen-blockhooks');
    const made = (dir: string) => readdirSync(dir).filter((f) => /\.snapshot|\.v8cache/.test(f) || f === 'node');
    t.same(made(lib), [], 'no snapshot, stamp, code cache or node file in the staging tree');
    t.match(r.out, /on the target, run: \/usr\/lib\/xen-blockhooks\/post-install/, 'the target step is named');
    t.ok(existsSync(join(lib, 'THIRD-PARTY-LICENSES')), "the bundled packages' licences are beside the bundles");
    for (const w of ['etc/xen/scripts/block-cow', 'usr/sbin/xen-blockhooks']) {
      t.notOk(
        withoutFallback(readFileSync(join(h.dest, w), 'utf8')).includes(process.execPath),
        `${w} does not name this machine's node`,
      );
    }
    // On the target (here: the staged tree, with this node standing for the target's).
    const p = spawnSync(join(lib, 'post-install'), [], {
      encoding: 'utf8',
      env: { PATH: process.env.PATH, NODE: process.execPath },
    });
    t.equal(p.status, 0, p.stderr);
    t.equal(readFileSync(join(lib, 'node'), 'utf8'), `${process.execPath}\n`, 'post-install writes the node it found');
    t.ok(
      existsSync(join(lib, 'block-cow.snapshot')) && existsSync(join(lib, 'block-cow.snapshot.node')),
      "and each hook's startup snapshot",
    );
    const wrapper = readFileSync(join(h.dest, 'etc/xen/scripts/block-cow'), 'utf8').replaceAll(
      '/usr/lib/xen-blockhooks/',
      `${lib}/`,
    );
    writeFileSync(join(h.top, 'w'), wrapper, { mode: 0o755 });
    const v = spawnSync(join(h.top, 'w'), ['--version'], { encoding: 'utf8', env: { PATH: '/nonexistent' } });
    t.equal(v.status, 0, v.stderr);
    t.match(v.stdout, /\(startup snapshot\)/, 'the wrapper starts the hook from the snapshot post-install made');
    const c = spawnSync(join(lib, 'post-install'), ['--clean'], { encoding: 'utf8' });
    t.equal(c.status, 0, c.stderr);
    t.same(made(lib), [], 'post-install --clean removes all of it');
    const old = join(h.top, 'old-node');
    writeFileSync(old, '#!/bin/sh\necho v18.19.0\n', { mode: 0o755 });
    const refused = spawnSync(join(lib, 'post-install'), [old], { encoding: 'utf8' });
    t.equal(refused.status, 1);
    t.match(refused.stderr, /is Node\.js 18\.19\.0; xen-blockhooks needs 18\.20\.4 or newer/);
  },
);

const analyze = spawnSync('systemd-analyze', ['--version'], { encoding: 'utf8' });

t.test(
  'systemd-analyze verify accepts the staged boot and watch units',
  {
    skip: analyze.error ? 'systemd-analyze is not installed (apt-get install systemd)' : false,
  },
  async (t) => {
    const h = setup(t);
    h.seed();
    // The stand-in CLI has the watch command, so both units are staged.
    writeFileSync(join(h.src, 'dist', 'xen-blockhooks.mjs'), '#!/usr/bin/env node\n');
    const r = h.install([]);
    t.equal(r.code, 0, r.err);
    const units = join(h.dest, 'usr/lib/systemd/system');
    const check = join(h.top, 'verify');
    mkdirSync(check);
    for (const unit of readdirSync(units)) {
      // The command lives in the staged tree, not on this machine: verify checks that it is
      // executable, so the copy verified names the staged one; everything else is as installed.
      const text = readFileSync(join(units, unit), 'utf8');
      t.match(text, /^ExecStart=\/usr\/sbin\/xen-blockhooks /m, `${unit} runs the installed command`);
      writeFileSync(
        join(check, unit),
        text.replaceAll('=/usr/sbin/xen-blockhooks ', `=${h.dest}/usr/sbin/xen-blockhooks `),
      );
      const v = spawnSync('systemd-analyze', ['verify', '--man=no', join(check, unit)], { encoding: 'utf8' });
      t.equal(v.status, 0, `systemd-analyze verify ${unit}: ${v.stderr}`);
      t.equal(v.stderr, '', `${unit}: no warning (an unknown key, a bad value, a unit that cannot load)`);
    }
    t.ok(readdirSync(units).includes('xen-blockhooks-boot.service'), 'the boot unit was verified');
  },
);
