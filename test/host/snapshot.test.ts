/**
 * Startup snapshots (scripts/snapshot.cjs, made by post-install, used by the wrappers from
 * packaging/wrapper.sh.in): made and checked by the Node that will run them, used by the wrapper
 * only while that Node is unchanged, and a hook run from one does the same work as from the
 * bundle: a real file: add and remove on a loop device, with the bundle itself moved away.
 */
import t from 'tap';
import { spawnSync } from 'node:child_process';
import {
  chmodSync,
  copyFileSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  readdirSync,
  realpathSync,
  renameSync,
  rmSync,
  statSync,
  utimesSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { harness, hexOf } from '../lib/block-harness.js';

t.setTimeout(240_000);

const ROOT = join(import.meta.dirname, '..', '..');
const DIST = join(ROOT, 'dist');
const LIB = '/usr/lib/xen-blockhooks/';

function tmp(t: { teardown(f: () => void): void }, prefix = 'xbh-snap-'): string {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

function make(dir: string, bundle: string, name = 'block') {
  const r = spawnSync(process.execPath, [join(DIST, 'snapshot.cjs'), bundle, join(dir, `${name}.snapshot`)], {
    encoding: 'utf8',
  });
  return { code: r.status, out: r.stdout, err: r.stderr };
}

/** The installed tree in a DESTDIR, post-install run in it, with wrappers pointed at the staged library. */
function installed(t: { teardown(f: () => void): void }, node = process.execPath) {
  const dest = tmp(t, 'xbh-snap-dest-');
  const r = spawnSync(join(ROOT, 'install'), ['--replace-block'], {
    encoding: 'utf8',
    env: { ...process.env, DESTDIR: dest, NODE: node },
  });
  if (r.status !== 0) throw new Error(`install failed: ${r.stderr}`);
  const lib = join(dest, LIB);
  // What the target does after a DESTDIR install: post-install, with the node that will run the hooks.
  const p = spawnSync(join(lib, 'post-install'), [node], { encoding: 'utf8', env: { PATH: process.env.PATH } });
  if (p.status !== 0) throw new Error(`post-install failed: ${p.stderr}`);
  const wrapper = (name: string) => {
    const f = join(dest, 'staged', name);
    const text = readFileSync(join(dest, 'etc/xen/scripts', name), 'utf8').replaceAll(LIB, `${lib}/`);
    mkdirSync(join(dest, 'staged'), { recursive: true });
    writeFileSync(f, text, { mode: 0o755 });
    return f;
  };
  return { dest, lib, wrapper, out: r.stdout + p.stdout, err: r.stderr + p.stderr };
}

function run(file: string, args: string[], env: Record<string, string> = {}) {
  const r = spawnSync(file, args, { encoding: 'utf8', env: { PATH: process.env.PATH ?? '/usr/bin:/bin', ...env } });
  return { code: r.status, out: r.stdout, err: r.stderr };
}

t.test('made by this Node, checked, and stamped with the node binary it belongs to', async (t) => {
  if (!existsSync(join(DIST, 'snapshot.cjs'))) return t.fail('dist/snapshot.cjs missing: run npm run build');
  const dir = tmp(t);
  copyFileSync(join(DIST, 'block.cjs'), join(dir, 'block.cjs'));
  const r = make(dir, join(dir, 'block.cjs'));
  t.equal(r.code, 0, r.err);
  const node = realpathSync(process.execPath);
  t.match(
    r.out,
    new RegExp(`^node ${node.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}\n`),
    'prints the node binary it belongs to',
  );
  t.equal(readFileSync(join(dir, 'block.snapshot.node'), 'utf8'), `${node}\n`, 'the .node stamp names it');
  t.equal(
    statSync(join(dir, 'block.snapshot.node')).mtimeMs,
    statSync(node).mtimeMs,
    'and carries its modification time',
  );
  t.ok(statSync(join(dir, 'block.snapshot')).size > 1_000_000, 'the snapshot holds a heap');
  t.same(
    readdirSync(dir).sort(),
    ['block.cjs', 'block.snapshot', 'block.snapshot.node'],
    'no entry or temporary file left',
  );
  const v = run(process.execPath, ['--snapshot-blob', join(dir, 'block.snapshot'), '--', '--version']);
  t.equal(v.code, 0, v.err);
  t.match(v.out, /^block \(xen-blockhooks\) \S+ \(startup snapshot\)\n$/, 'it starts and answers as the hook');
  const usage = run(process.execPath, ['--snapshot-blob', join(dir, 'block.snapshot'), '--', 'frobnicate']);
  t.equal(usage.code, 2, 'bad usage is still exit 2');
  t.match(usage.err, /^block: /);
});

t.test('a bundle that is not a hook, or reads a deferred module while it loads, gets no snapshot', async (t) => {
  const dir = tmp(t);
  const cli = make(dir, join(DIST, 'xen-blockhooks.cjs'), 'cli');
  t.equal(cli.code, 1, 'the command (no hook main) is refused');
  t.match(cli.err, /did not hand over a main function/);
  const reads = join(dir, 'reads.cjs');
  writeFileSync(
    reads,
    "const net = require('node:net');\nconst connect = net.connect;\nglobalThis.__xbhSnapshot.setMain(() => connect);\n",
  );
  const bad = make(dir, reads, 'reads');
  t.equal(bad.code, 1);
  t.match(bad.err, /reads node:net\.connect while it loads/, 'the read is named');
  t.same(readdirSync(dir).sort(), ['reads.cjs'], 'nothing left behind by either');
});

t.test('the installed wrapper uses the snapshot: a real file: add and remove with the bundle moved away', async (t) => {
  const ins = installed(t);
  t.match(ins.out, /post-install: node .*; startup snapshots:.* block\n/, 'post-install made the snapshot');
  t.ok(existsSync(join(ins.lib, 'block.snapshot')), 'block.snapshot installed');
  const block = ins.wrapper('block');
  t.match(run(block, ['--version']).out, /\(startup snapshot\)/, 'the wrapper starts from the snapshot');

  // Without the bundle and its starter, only the snapshot can run the hook.
  for (const f of ['block.cjs', 'block.mjs']) renameSync(join(ins.lib, f), join(ins.lib, `${f}.away`));
  const h = await harness(t);
  const img = h.image('snap.img');
  const be = await h.disk({ domid: 41, devid: 51712, params: img, mode: 'w' });
  const add = await h.run('add', be, {}, block);
  t.equal(add.code, 0, `add exits 0 (stderr: ${add.stderr})`);
  t.equal(add.stderr, '', "nothing on stderr (xl shows a hook's stderr to its user)");
  const node = await h.read(`${be}/node`);
  t.match(node, /^\/dev\/loop\d+$/);
  t.equal(await h.read(`${be}/physical-device`), hexOf(node as string), 'physical-device is the loop');
  t.equal(await h.read(`${be}/hotplug-status`), 'connected');
  t.same(
    h.loopsOnImages().map((l) => l.name),
    [node],
    'one loop over the image',
  );
  const rm = await h.run('remove', be, {}, block);
  t.equal(rm.code, 0, `remove exits 0 (stderr: ${rm.stderr})`);
  t.same(h.loopsOnImages(), [], 'the loop is detached');
  t.same(readdirSync(join(h.stateDir, 'journal')), [], 'no journal record left');
  const log = readFileSync(join(h.dir, 'hotplug.log'), 'utf8');
  t.match(log, /add/, 'the log lines reached the file');

  // The environment is the run's, not the snapshot builder's: the fault knob read when the first
  // device command runs kills this add there.
  const killed = await h.run('add', be, { XEN_BLOCKHOOKS_FAULT_KILL_AFTER: '1' }, block);
  t.equal(killed.signal, 'SIGKILL', 'XEN_BLOCKHOOKS_FAULT_KILL_AFTER=1 reached the hook started from the snapshot');
  const after = await h.run('remove', be, {}, block);
  t.equal(after.code, 0, `remove after the kill exits 0 (stderr: ${after.stderr})`);
  t.same(h.loopsOnImages(), [], 'nothing left after the killed add and its remove');
  for (const f of ['block.cjs', 'block.mjs']) renameSync(join(ins.lib, `${f}.away`), join(ins.lib, f));
});

t.test(
  'a changed node (stamp time differs), a missing libnode or a missing snapshot: the wrapper falls back to the code cache',
  async (t) => {
    const ins = installed(t);
    const block = ins.wrapper('block');
    const stamp = join(ins.lib, 'block.snapshot.node');
    const st = statSync(stamp);
    utimesSync(stamp, st.atime, new Date(st.mtimeMs - 5000));
    let v = run(block, ['--version']);
    t.equal(v.code, 0, v.err);
    t.match(v.out, /^block \(xen-blockhooks\) \S+\n$/, 'an older stamp: the bundle runs, not the snapshot');
    utimesSync(stamp, st.atime, new Date(st.mtimeMs + 5000));
    t.notMatch(run(block, ['--version']).out, /snapshot/, 'a newer stamp: the bundle runs');
    utimesSync(stamp, st.atime, st.mtime);
    t.match(run(block, ['--version']).out, /\(startup snapshot\)/, 'the same time again: the snapshot');

    writeFileSync(join(ins.lib, 'block.snapshot.lib'), '/nonexistent/libnode.so.108\n');
    v = run(block, ['--version']);
    t.equal(v.code, 0, v.err);
    t.notMatch(v.out, /snapshot/, 'a libnode that is gone: the bundle runs');
    t.equal(v.err, '', 'quietly');
    rmSync(join(ins.lib, 'block.snapshot.lib'));

    rmSync(join(ins.lib, 'block.snapshot'));
    v = run(block, ['--version']);
    t.equal(v.code, 0, v.err);
    t.notMatch(v.out, /snapshot/, 'no snapshot: the bundle runs');
    t.equal(v.err, '', 'quietly');

    const un = spawnSync(join(ROOT, 'install'), ['--uninstall'], {
      encoding: 'utf8',
      env: { ...process.env, DESTDIR: ins.dest },
    });
    t.equal(un.status, 0, un.stderr);
    t.notOk(existsSync(join(ins.lib)), 'uninstall removes the snapshots and their stamps with the rest');
  },
);

t.test(
  'a node whose modification time has nanoseconds (built or unpacked, not from dpkg) still gets its snapshot used',
  async (t) => {
    const dir = tmp(t, 'xbh-snap-node-');
    const node = join(dir, 'node');
    copyFileSync(process.execPath, node);
    chmodSync(node, 0o755);
    spawnSync('touch', ['-d', '2026-01-02 03:04:05.123456789', '--', node]);
    t.equal(statSync(node, { bigint: true }).mtimeNs % 1_000_000_000n, 123_456_789n, 'the copy has a sub-second time');
    const ins = installed(t, node);
    const stamp = join(ins.lib, 'block.snapshot.node');
    t.equal(
      statSync(stamp, { bigint: true }).mtimeNs,
      statSync(node, { bigint: true }).mtimeNs,
      'the stamp carries it to the nanosecond',
    );
    t.match(
      run(ins.wrapper('block'), ['--version']).out,
      /\(startup snapshot\)/,
      'the wrapper starts from the snapshot',
    );
  },
);
