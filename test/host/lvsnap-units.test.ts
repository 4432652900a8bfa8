/**
 * block-lvsnap and devices/lvm.ts without LVM: the params grammar, LVM's naming rules, the argv
 * builders, the `lvs --reportformat json` parser on output captured from lvm 2.03.16 in the guest
 * (test/fixtures/capture-lvm.mjs), and the hook refusing bad params with nothing run.
 */
import t from 'tap';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  isLvNotFound,
  lvActivateArgs,
  lvcreateSnapshotArgs,
  lvDmName,
  lvextendArgs,
  lvNameProblem,
  lvremoveArgs,
  lvsArgs,
  parseLvRef,
  parseLvs,
  vgNameProblem,
} from '../../src/devices/lvm.js';
import type { RunOptions, RunResult, Runner } from '../../src/devices/runner.js';
import { execRunner } from '../../src/devices/exec.js';
import { lvsnapBackend, parseLvsnapParams, snapshotName } from '../../src/backends/lvsnap.js';
import { runHook } from '../../src/hotplug/main.js';
import { defaultConfig } from '../../src/config/config.js';
import { memoryLogger } from '../../src/log/logger.js';
import { startXenstoreServer } from '../../src/xenstore/server.js';
import { connectXenstore } from '../../src/xenstore/client.js';
import { backendPath, writeBackendNodes } from '../lib/backend-nodes.js';

const FIX = fileURLToPath(new URL('../fixtures/', import.meta.url));
const fx = (c: string) => readFileSync(join(FIX, `lvm-2.03.16-${c}.txt`), 'utf8');

t.test('LVM names', async (t) => {
  t.equal(vgNameProblem('vg0'), undefined);
  t.equal(vgNameProblem('vg+a_b.c-d'), undefined);
  t.match(vgNameProblem(''), /empty/);
  t.match(vgNameProblem('-vg'), /must not start with "-"/);
  t.match(vgNameProblem('v g'), /only letters/);
  t.match(vgNameProblem('vg/x'), /only letters/);
  t.match(vgNameProblem('..'), /not a name/);
  t.match(vgNameProblem('x'.repeat(128)), /longer than 127/);
  t.equal(lvNameProblem('golden'), undefined);
  t.match(lvNameProblem('snapshot'), /reserved/);
  t.match(lvNameProblem('pvmove0'), /reserved/);
  t.match(lvNameProblem('a_tdata'), /_tdata/);
  t.match(lvNameProblem('a_rimage_0'), /_rimage/);
  t.match(lvNameProblem('a$(reboot)'), /only letters/);
  t.same(parseLvRef('vg0/golden'), { vg: 'vg0', lv: 'golden' });
  t.throws(() => parseLvRef('golden'), /VG\/LV/);
  t.throws(() => parseLvRef('a/b/c'), /VG\/LV/);
  t.throws(() => parseLvRef('vg/-x'), /must not start/);
  t.equal(lvDmName({ vg: 'my-vg', lv: 'xbh-a-xvda' }), 'my--vg-xbh--a--xvda');
});

t.test('argv builders', async (t) => {
  const o = { vg: 'vg0', lv: 'golden' };
  t.same(lvcreateSnapshotArgs(o, 'xbh-a-xvda', 512, { addTag: 'xbh_transient' }), [
    'lvcreate',
    '-q',
    '-y',
    '-s',
    '-n',
    'xbh-a-xvda',
    '-L',
    '512m',
    '--addtag',
    'xbh_transient',
    '--',
    'vg0/golden',
  ]);
  t.same(
    lvcreateSnapshotArgs(o, 'xbh-a-xvda'),
    ['lvcreate', '-q', '-y', '-s', '-n', 'xbh-a-xvda', '-kn', '--', 'vg0/golden'],
    'thin: no size, activate',
  );
  t.throws(() => lvcreateSnapshotArgs(o, '-n'), /must not start/);
  t.throws(() => lvcreateSnapshotArgs(o, 'x', 0), /MiB >= 1/);
  t.throws(() => lvcreateSnapshotArgs(o, 'x', 1.5), /whole number/);
  t.throws(() => lvcreateSnapshotArgs(o, 'x', 1, { addTag: 'a b' }), /invalid LVM tag/);
  t.same(lvremoveArgs(o), ['lvremove', '-q', '-f', '--', 'vg0/golden']);
  t.same(lvextendArgs(o, 64), ['lvextend', '-q', '-L', '+64m', '--', 'vg0/golden']);
  t.same(lvActivateArgs(o), ['lvchange', '-q', '-ay', '-K', '--', 'vg0/golden']);
  t.same(lvsArgs([o]).slice(-1), ['vg0/golden']);
  t.same(lvsArgs(['vg0']).slice(0, 6), ['lvs', '--reportformat', 'json', '--units', 'b', '--nosuffix']);
  t.throws(() => lvsArgs(['-vg']), /invalid volume group/);
  t.throws(() => lvremoveArgs({ vg: 'vg0', lv: '--all' }), /invalid logical volume/);
});

t.test('lvs JSON on real lvm 2.03.16 output', async (t) => {
  const fresh = parseLvs(fx('lvs-snapshot-fresh'));
  t.equal(fresh.length, 2);
  const [origin, snap] = fresh;
  t.match(origin, {
    vg: 'capvg',
    lv: 'origin',
    kind: 'origin',
    sizeBytes: 16777216n,
    invalid: false,
    active: true,
    major: 254,
    minor: 0,
  });
  t.match(snap, {
    lv: 'snap',
    kind: 'snapshot',
    origin: 'origin',
    dataPercent: 0,
    sizeBytes: 4194304n,
    dmPath: '/dev/mapper/capvg-snap',
    invalid: false,
  });
  const used = parseLvs(fx('lvs-snapshot-used'));
  t.equal(used[0]?.dataPercent, 25.29);
  const ext = parseLvs(fx('lvs-snapshot-extended'));
  t.equal(ext.length, 1, 'lvs repeats a snapshot row when it is selected by name: folded');
  t.equal(ext[0]?.sizeBytes, 8388608n);
  const inv = parseLvs(fx('lvs-snapshot-invalid'));
  t.equal(inv.length, 1);
  t.match(inv[0], { attr: 'swi-I-s---', invalid: true, active: false, dataPercent: 100 });
  const thin = parseLvs(fx('lvs-thin'));
  const byName = Object.fromEntries(thin.map((l) => [l.lv, l]));
  t.match(byName.pool, { kind: 'thin-pool', segtype: 'thin-pool', dataPercent: 12.5, metadataPercent: 11.04 });
  t.match(byName.thinorigin, { kind: 'thin', pool: 'pool', origin: undefined });
  t.match(byName.thinsnap, { kind: 'thin', pool: 'pool', origin: 'thinorigin', dataPercent: 6.25 });
  t.same(byName.thinsnap?.tags, ['xbh_persistent']);
  t.same(byName.snap?.tags, ['xbh_transient']);
  t.same(byName.origin?.tags, []);
  t.same(parseLvs(''), []);
  t.throws(() => parseLvs('{"report":[{"lv":[{"vg_name":"a"}]}]}'), /unexpected row/);
  t.ok(isLvNotFound(fx('lvs-missing-stderr')));
  t.ok(isLvNotFound(fx('lvs-missing-vg-stderr')));
  t.ok(isLvNotFound(fx('lvremove-missing-stderr')));
  t.notOk(isLvNotFound(fx('lvcreate-exists-stderr')));
  t.equal(
    fx('lvextend-invalid-stderr'),
    '',
    'lvextend of an Invalid snapshot succeeds silently: the grow code must check first',
  );
});

t.test('params grammar', async (t) => {
  t.same(parseLvsnapParams('vg0/golden'), {
    origin: { vg: 'vg0', lv: 'golden' },
    sizeMiB: undefined,
    persistent: false,
  });
  t.same(parseLvsnapParams('/dev/vg0/golden 2G persistent'), {
    origin: { vg: 'vg0', lv: 'golden' },
    sizeMiB: 2048,
    persistent: true,
  });
  t.same(parseLvsnapParams('vg0/golden 300 persistent=no'), {
    origin: { vg: 'vg0', lv: 'golden' },
    sizeMiB: 300,
    persistent: false,
  });
  const bad: [string, RegExp][] = [
    ['', /no origin volume/],
    ['golden', /not a valid VG\/LV/],
    ['vg0/golden 2X', /"2X" is not a size: a number with an optional unit K, M, G or T/],
    ['vg0/golden persistent 2G', /must come right after/],
    ['vg0/golden 0', /at least 1 MiB/],
    ['vg0/golden 99999999', /more than 16 TiB/],
    ['vg0/golden persistent persistent', /given twice/],
    ['vg0/golden persistent=maybe', /yes or no/],
    ['vg0/golden chunk=4K', /unknown option "chunk"/],
    ['vg0/golden;reboot', /only letters/],
  ];
  for (const [p, re] of bad) t.throws(() => parseLvsnapParams(p), re, p);
  t.same(parseLvsnapParams('vg0/golden 1.5G'), {
    origin: { vg: 'vg0', lv: 'golden' },
    sizeMiB: 1536,
    persistent: false,
  });
  t.same(parseLvsnapParams('vg0/golden 1T persistent'), {
    origin: { vg: 'vg0', lv: 'golden' },
    sizeMiB: 1048576,
    persistent: true,
  });
  const expected = 'Expected: <vg>/<origin-lv> [<cow-size>] [persistent[=yes|no]], e.g. "vg0/golden 2G".';
  t.throws(
    () => parseLvsnapParams('vg0/my golden 2G'),
    {
      message: `block-lvsnap params "vg0/my golden 2G": "golden" is neither a size (a number with an optional unit K, M, G or T (e.g. 512M, 1.5G, 2T); a bare number is MiB) nor an option (known: persistent); the origin is VG/LV, and LVM names cannot contain spaces. ${expected}`,
    },
    'an origin with a space: refused, saying why',
  );
  t.throws(() => parseLvsnapParams('vg0/golden 64X persistent'), {
    message: `block-lvsnap params "vg0/golden 64X persistent": "64X" is not a size: a number with an optional unit K, M, G or T (e.g. 512M, 1.5G, 2T); a bare number is MiB. ${expected}`,
  });
  t.equal(snapshotName({ domainName: 'web01', frontendId: 3, vdev: 'xvda' }, 'backend/vbd/3/51712'), 'xbh-web01-xvda');
  t.equal(
    snapshotName({ domainName: undefined, frontendId: 3, vdev: undefined }, 'backend/vbd/3/51712'),
    'xbh-d3-51712',
  );
});

/** Records every command; only flock (the locks) really runs. */
function recorder(): Runner & { calls: string[] } {
  const calls: string[] = [];
  const real = execRunner();
  const res = (file: string, args: readonly string[]): RunResult => ({
    command: [file, ...args].join(' '),
    exitCode: 1,
    signal: undefined,
    stdout: '',
    stderr: 'not expected here',
    durationMs: 0,
    failed: true,
    timedOut: false,
  });
  return {
    calls,
    async run(file: string, args: readonly string[], o?: RunOptions) {
      calls.push([file, ...args].join(' '));
      if (file === 'flock') return real.run(file, args, o);
      throw new Error(`unexpected command ${file} ${args.join(' ')}`);
    },
    async probe(file: string, args: readonly string[], o?: RunOptions) {
      calls.push([file, ...args].join(' '));
      if (file === 'flock') return real.probe(file, args, o);
      return res(file, args);
    },
  };
}

t.test('bad params through the hook: hotplug-error, exit 1, no command run', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'lvsnap-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const sock = join(dir, 'xs.sock');
  const server = await startXenstoreServer({ socketPath: sock });
  const xs = await connectXenstore({ path: sock });
  t.teardown(async () => {
    await xs.close();
    await server.close();
  });
  const config = {
    ...defaultConfig(),
    stateDir: join(dir, 'state'),
    storeDir: join(dir, 'store'),
    xenLockDir: join(dir, 'xl'),
    logFile: '',
  };
  for (const [params, re] of [
    ['vg0', /not a valid VG\/LV/],
    ['vg0/golden 5X', /"5X" is not a size/],
    ['vg0/x_tmeta', /internal volumes/],
  ] as const) {
    const d = { domid: 4, devid: 51712, params, script: '/etc/xen/scripts/block-lvsnap' };
    await writeBackendNodes(xs, d);
    const run = recorder();
    const code = await runHook(
      lvsnapBackend,
      ['add'],
      { XENBUS_PATH: backendPath(d) },
      { connect: () => connectXenstore({ path: sock }), run, config, logger: memoryLogger(), err: () => {} },
    );
    t.equal(code, 1, params);
    t.match(await xs.read(`${backendPath(d)}/hotplug-error`), re);
    t.equal(await xs.read(`${backendPath(d)}/hotplug-status`), 'error');
    t.same(
      run.calls.filter((c) => !c.startsWith('flock')),
      [],
      'nothing but locks was run',
    );
    await xs.rm(backendPath(d));
  }
});
