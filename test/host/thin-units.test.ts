/**
 * block-thin without device-mapper: the params grammar, the plan (base checks, names, sizes),
 * devices/thin.ts (pool table, messages, ids, usage from the kernel's own status lines captured
 * in the guest), growth size arithmetic, and the hook refusing bad params with nothing run.
 */
import t from 'tap';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseStatus, parseThinPoolStatus } from '../../src/devices/dmsetup.js';
import { execRunner } from '../../src/devices/exec.js';
import type { RunOptions, RunResult, Runner } from '../../src/devices/runner.js';
import {
  blockSectors,
  createThinArgs,
  deleteThinArgs,
  freeThinId,
  isExists,
  isNoData,
  poolSectors,
  poolTable,
  poolUsage,
} from '../../src/devices/thin.js';
import {
  leftoverPoolFiles,
  leftoverThinIds,
  readTransientIds,
  reclaimThinIds,
  parseThinParams,
  planThin,
  poolFiles,
  readVolumes,
  thinBackend,
  thinDmName,
  volumeKey,
  writeVolumes,
} from '../../src/backends/thin.js';
import { targetBytes } from '../../src/backends/growth.js';
import { cowParts } from '../../src/backends/cow.js';
import { lvsnapRef } from '../../src/backends/lvsnap.js';
import { runHook } from '../../src/hotplug/main.js';
import { defaultConfig } from '../../src/config/config.js';
import { memoryLogger } from '../../src/log/logger.js';
import { startXenstoreServer } from '../../src/xenstore/server.js';
import { connectXenstore } from '../../src/xenstore/client.js';
import { backendPath, writeBackendNodes } from '../lib/backend-nodes.js';
import { Journal } from '../../src/journal/journal.js';

const FIX = fileURLToPath(new URL('../fixtures/', import.meta.url));
const status = (c: string) => {
  const l = parseStatus(readFileSync(join(FIX, `dmsetup-1.02.185-k6.1-${c}.txt`), 'utf8'))[0]!;
  return parseThinPoolStatus(l.params);
};

t.test('params grammar', async (t) => {
  t.same(parseThinParams('/srv/xen/a.img'), { base: '/srv/xen/a.img', sizeMiB: undefined, persistent: false });
  t.same(parseThinParams('/srv/xen/a.img 20G persistent'), {
    base: '/srv/xen/a.img',
    sizeMiB: 20480,
    persistent: true,
  });
  t.same(parseThinParams('  /srv/xen/a.img   512M  persistent=no '), {
    base: '/srv/xen/a.img',
    sizeMiB: 512,
    persistent: false,
  });
  const bad: [string, RegExp][] = [
    ['', /no base image/],
    ['a.img', /not an absolute path/],
    ['size=3 /a.img', /looks like an option/],
    ['/a.img 3Q', /"3Q" is not a size: a number with an optional unit K, M, G or T/],
    ['/a.img persistent 3G', /must come right after/],
    ['/a.img 0', /at least 1 MiB/],
    ['/a.img 99999999', /more than 16 TiB/],
    ['/a.img persistent=perhaps', /yes or no/],
    ['/a.img persistent persistent', /given twice/],
    ['/a.img 1G chunk=64K', /unknown option "chunk"/],
    ['/a.img 1G extra=1', /unknown option "extra"/],
    ['/a.img 1G 2G', /"2G" is a second size/],
    ['/a\tb.img 1G', /holds a tab or a line break/],
  ];
  for (const [p, re] of bad) t.throws(() => parseThinParams(p), re, p);
});

t.test('params: a base path with spaces, sizes in the one grammar', async (t) => {
  t.same(parseThinParams('/media/LIVE CD/rootfs.img'), {
    base: '/media/LIVE CD/rootfs.img',
    sizeMiB: undefined,
    persistent: false,
  });
  t.same(parseThinParams('/media/LIVE CD/rootfs.img 1.5G persistent'), {
    base: '/media/LIVE CD/rootfs.img',
    sizeMiB: 1536,
    persistent: true,
  });
  t.same(parseThinParams('/media/My  Disk/a b.img 1T'), {
    base: '/media/My  Disk/a b.img',
    sizeMiB: 1048576,
    persistent: false,
  });
  t.same(
    parseThinParams('/srv/a.img 100K'),
    { base: '/srv/a.img', sizeMiB: 1, persistent: false },
    'rounded up to whole MiB',
  );
  const msg = (params: string, what: string) =>
    `block-thin params "${params}": ${what}. Expected: <base-image> [<size>] [persistent[=yes|no]], e.g. "/srv/xen/rootfs.img 20G".`;
  const refused: [string, string][] = [
    [
      '/media/LIVE CD/rootfs.img 20X',
      '"20X" is not a size: a number with an optional unit K, M, G or T (e.g. 512M, 1.5G, 2T); a bare number is MiB (a path cannot end in a word that looks like a size)',
    ],
    ['/media/LIVE CD/rootfs.img persistent 2G', 'the size "2G" must come right after the base image'],
    ['/media/LIVE CD/rootfs.img 17T', 'the size "17T" is more than 16 TiB (a bare number is MiB)'],
  ];
  for (const [params, what] of refused) t.throws(() => parseThinParams(params), { message: msg(params, what) }, params);
});

t.test('plan: base checks, names, default size', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'thin-plan-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const images = join(dir, 'images');
  mkdirSync(images);
  const base = join(images, 'base.img');
  writeFileSync(base, '');
  truncateSync(base, 3 * 1048576 + 1000);
  writeFileSync(join(images, 'tiny.img'), 'x');
  const config = { ...defaultConfig(), imageDirs: [images], storeDir: join(dir, 'store') };
  const disk = {
    params: `${base}`,
    mode: 'w' as const,
    frontendId: 7,
    vdev: 'xvdb',
    type: 'phy',
    state: 2,
    domainName: 'web',
  };
  const p = planThin(disk, { config, xenbusPath: 'backend/vbd/7/51728' });
  t.equal(p.name, 'xbh-thin-web-xvdb-51728');
  t.equal(p.key, 'web-xvdb');
  t.equal(p.sectors, 6145, 'default: the base, whole sectors');
  t.equal(planThin({ ...disk, params: `${base} 64M` }, { config, xenbusPath: 'backend/vbd/7/51728' }).sectors, 131072);
  t.throws(
    () => planThin({ ...disk, params: '/etc/passwd' }, { config, xenbusPath: 'backend/vbd/7/51728' }),
    /outside the allowed image directories/,
  );
  t.throws(
    () => planThin({ ...disk, params: join(images, 'nope.img') }, { config, xenbusPath: 'backend/vbd/7/51728' }),
    /does not exist/,
  );
  t.throws(() => planThin({ ...disk, params: images }, { config, xenbusPath: 'backend/vbd/7/51728' }), /a directory/);
  t.throws(
    () => planThin({ ...disk, params: join(images, 'tiny.img') }, { config, xenbusPath: 'backend/vbd/7/51728' }),
    /at least one 512-byte sector/,
  );
  t.throws(
    () => planThin({ ...disk, mode: 'r', params: `${base} persistent` }, { config, xenbusPath: 'backend/vbd/7/51728' }),
    /read-only/,
  );
  t.equal(
    thinDmName({ domainName: undefined, frontendId: 3, vdev: undefined }, 'backend/vbd/3/768'),
    'xbh-thin-d3-disk-768',
  );
  t.equal(volumeKey({ domainName: undefined, frontendId: 3, vdev: undefined }, 'backend/vbd/3/768'), 'd3-768');
  const f = poolFiles(config);
  t.same(f, {
    name: 'xbh-thinpool',
    data: join(dir, 'store', 'thin-pool.data'),
    meta: join(dir, 'store', 'thin-pool.meta'),
    volumes: join(dir, 'store', 'thin-pool.volumes.json'),
    transient: join(dir, 'store', 'thin-pool.transient.json'),
  });
  mkdirSync(join(dir, 'store'));
  t.same(readVolumes(f.volumes), {});
  writeVolumes(f.volumes, { 'web-xvdb': { id: 3, sectors: 2048, base: { file: base, dev: '1:2', ino: '3' } } });
  t.equal(readVolumes(f.volumes)['web-xvdb']?.id, 3);
  writeVolumes(f.volumes, {});
  t.same(readVolumes(f.volumes), {}, 'an empty list removes the file');
});

t.test('plan: a base under a directory with a space, and how a typo after it is reported', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'thin-plan-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const images = join(dir, 'images');
  mkdirSync(join(images, 'LIVE CD'), { recursive: true });
  const base = join(images, 'LIVE CD', 'root fs.img');
  writeFileSync(base, '');
  truncateSync(base, 4 * 1048576);
  const config = { ...defaultConfig(), imageDirs: [images], storeDir: join(dir, 'store') };
  const disk = {
    params: `${base} 1.5G persistent`,
    mode: 'w' as const,
    frontendId: 7,
    vdev: 'xvdb',
    type: 'phy',
    state: 2,
    domainName: 'web',
  };
  const p = planThin(disk, { config, xenbusPath: 'backend/vbd/7/51728' });
  t.equal(p.params.base, base);
  t.equal(p.sectors, 1536 * 2048, '1.5G in sectors');
  t.equal(thinBackend.source?.(disk.params), base, 'status shows the whole path');
  t.throws(() => planThin({ ...disk, params: `${base} 2G extra` }, { config, xenbusPath: 'backend/vbd/7/51728' }), {
    message: `The base image ${base} 2G extra does not exist (or a symlink on the way leads nowhere). The params were read as the path "${base} 2G extra" and the words the grammar takes after it: a path may hold spaces, and a word after it that is neither a size nor an option is part of it.`,
  });
});

t.test('devices/thin.ts', async (t) => {
  t.equal(blockSectors(64), 128);
  t.equal(blockSectors(1024), 2048);
  t.throws(() => blockSectors(96), /multiple of 64K/);
  t.throws(() => blockSectors(32), /multiple of 64K/);
  t.equal(poolSectors(8 * 1048576, 64), 16384n);
  t.equal(poolSectors(8 * 1048576 + 65535, 64), 16384n, 'rounded down to whole blocks');
  t.equal(
    poolTable(8192n, { major: 7, minor: 3 }, { major: 7, minor: 4 }, 64),
    readFileSync(join(FIX, 'dmsetup-1.02.185-k6.1-table-thin-pool.txt'), 'utf8').trim(),
    'what the kernel echoed back',
  );
  t.same(createThinArgs('xbh-thinpool', 5), ['message', 'xbh-thinpool', '0', 'create_thin', '5']);
  t.same(deleteThinArgs('xbh-thinpool', 0), ['message', 'xbh-thinpool', '0', 'delete', '0']);
  t.throws(() => createThinArgs('xbh-thinpool', -1), /0\.\.16777215/);
  t.throws(() => createThinArgs('xbh-thinpool', 1.5), /0\.\.16777215/);
  t.equal(freeThinId([]), 0);
  t.equal(freeThinId([0, 1, 3]), 2);
  t.ok(isExists('device-mapper: message ioctl on xbh-thinpool  failed: File exists'));
  t.ok(isNoData('device-mapper: message ioctl on xbh-thinpool  failed: No data available'));
  t.match(poolUsage(status('status-thin-pool-fresh')), { problem: undefined });
  const used = poolUsage(status('status-thin-pool-used'));
  t.ok(used.dataPercent > 0 && used.dataPercent < 100, `used ${used.dataPercent}%`);
  t.same(poolUsage(status('status-thin-pool-full')), {
    dataPercent: 100,
    metadataPercent: 10.93,
    problem: 'out of data space',
  });
  t.match(poolUsage({ state: 'fail' }), { problem: 'Fail' });
});

t.test('growth arithmetic and journal lookups', async (t) => {
  const MiB = 1048576;
  t.equal(targetBytes(8 * MiB, undefined, 25, MiB), 10 * MiB, 'by the step percent');
  t.equal(targetBytes(8 * MiB, undefined, 1, MiB), 9 * MiB, 'at least one unit');
  t.equal(targetBytes(8 * MiB, { relative: true, bytes: 24 * MiB }, 25, MiB), 32 * MiB);
  t.equal(targetBytes(8 * MiB, { relative: false, bytes: 20 * MiB + 1 }, 25, MiB), 21 * MiB, 'rounded up to the unit');
  const entry = Journal.begin('block-cow', 'backend/vbd/1/51712', {
    params: '/a 8',
    mode: 'w',
    frontendId: 1,
    vdev: 'xvda',
    domainName: 'a',
  });
  entry.steps.push(
    {
      kind: 'base-ref',
      data: { key: '8:1:12', file: '/a', dev: '8:1', ino: '12', counted: true, loop: '/dev/loop0' },
      done: true,
    },
    { kind: 'store-file', data: { path: '/s/t.cow', persistent: false }, done: true },
    {
      kind: 'loop',
      data: { file: '/s/t.cow', dev: '8:1', ino: '13', readOnly: false, loop: '/dev/loop1' },
      done: true,
    },
    {
      kind: 'dm',
      data: { name: 'xbh-cow-a-xvda-51712', table: '0 16384 snapshot 7:0 7:1 N 8', readOnly: false },
      done: true,
    },
  );
  t.same(cowParts(entry), { dmName: 'xbh-cow-a-xvda-51712', storeFile: '/s/t.cow', loop: '/dev/loop1' });
  t.equal(lvsnapRef(entry), undefined);
  entry.steps = [
    {
      kind: 'lv-snapshot',
      data: { vg: 'vg0', lv: 'xbh-a-xvda', origin: 'golden', persistent: false, existed: false, thin: false },
      done: true,
    },
  ];
  t.same(lvsnapRef(entry), { vg: 'vg0', lv: 'xbh-a-xvda' });
  t.equal(cowParts(entry), undefined);
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

t.test('bad params through the hook: hotplug-error, exit 1, nothing run, nothing created', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'thin-hook-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const images = join(dir, 'images');
  mkdirSync(images);
  const sock = join(dir, 'xs.sock');
  const server = await startXenstoreServer({ socketPath: sock });
  const xs = await connectXenstore({ path: sock });
  t.teardown(async () => {
    await xs.close();
    await server.close();
  });
  const config = {
    ...defaultConfig(),
    imageDirs: [images],
    stateDir: join(dir, 'state'),
    storeDir: join(dir, 'store'),
    xenLockDir: join(dir, 'xl'),
    logFile: '',
  };
  const cases: [string, RegExp][] = [
    ['base.img', /not an absolute path/],
    [`${images}/base.img 3X`, /"3X" is not a size/],
    [`${images}/missing.img`, /does not exist/],
    ['/etc/hostname', /outside the allowed image directories/],
  ];
  for (const [params, re] of cases) {
    const d = { domid: 4, devid: 51712, params, script: '/etc/xen/scripts/block-thin' };
    await writeBackendNodes(xs, d);
    const run = recorder();
    const code = await runHook(
      thinBackend,
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
      'no device command was run',
    );
    await xs.rm(backendPath(d));
  }
  t.same(new Journal(config.stateDir).list().entries, [], 'no journal record left');
  t.throws(() => readFileSync(join(dir, 'store', 'thin-pool.data')), /ENOENT/, 'no pool file');
});

t.test("a crash's leftovers: transient ids no record holds; pool files only when nothing needs them", async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'xbh-thin-left-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const config = { ...defaultConfig(), storeDir: dir };
  const f = poolFiles(config);
  const thinStep = (id: number) => ({ steps: [{ kind: 'thin', data: { id, pool: 'xbh-thinpool' }, done: true }] });
  const poolStep = { steps: [{ kind: 'thin-pool', data: {}, done: true }] };
  t.same(leftoverThinIds(config, []), [], 'no list, no leftover');
  writeFileSync(
    f.transient,
    JSON.stringify({
      version: 1,
      ids: { 4: 'backend/vbd/1/51712', 2: 'backend/vbd/2/51712', 7: 'backend/vbd/3/51712' },
    }),
  );
  writeVolumes(f.volumes, { 'web-xvda': { id: 7, sectors: 2048, base: { file: '/b', dev: '1:2', ino: '3' } } });
  t.same(
    leftoverThinIds(config, [thinStep(4)] as never),
    [2],
    "a recorded id and a persistent volume's id are never leftovers",
  );
  writeFileSync(f.data, '');
  writeFileSync(f.meta, '');
  const none = () => false;
  t.same(leftoverPoolFiles(config, [], false, none), [], 'a persistent volume lives in them');
  writeVolumes(f.volumes, {});
  t.same(leftoverPoolFiles(config, [], false, none), [f.data, f.meta, f.transient], 'nothing needs them');
  t.same(leftoverPoolFiles(config, [], true, none), [], 'the pool runs');
  t.same(leftoverPoolFiles(config, [poolStep] as never, false, none), [], 'a record holds the pool');
  t.same(
    leftoverPoolFiles(config, [], false, (file) => file === f.meta),
    [],
    'a loop holds one of them',
  );
  t.same(
    leftoverPoolFiles({ ...config, thin: { ...config.thin, keepPool: true } }, [], false, none),
    [],
    'thin.keep_pool keeps them',
  );
  t.same(
    leftoverPoolFiles(
      { ...config, thin: { ...config.thin, dataDevice: '/dev/a', metadataDevice: '/dev/b' } },
      [],
      false,
      none,
    ),
    [],
    'a pool on devices has no files to delete',
  );
});

t.test(
  "reclaiming leftovers at a pool's start never fails the add: a refused delete stays listed, the others go",
  async (t) => {
    const dir = mkdtempSync(join(tmpdir(), 'xbh-thin-reclaim-'));
    t.teardown(() => rmSync(dir, { recursive: true, force: true }));
    const config = { ...defaultConfig(), storeDir: dir };
    const f = poolFiles(config);
    writeFileSync(
      f.transient,
      JSON.stringify({ version: 1, ids: { 3: 'backend/vbd/1/51712', 5: 'backend/vbd/2/51712' } }),
    );
    const calls: string[] = [];
    const answer = (args: readonly string[]): RunResult => {
      calls.push(args.join(' '));
      const refused = /delete 3$/.test(args.join(' '));
      return {
        command: `dmsetup ${args.join(' ')}`,
        exitCode: refused ? 1 : 0,
        signal: undefined,
        stdout: '',
        stderr: refused ? 'device-mapper: message ioctl on xbh-thinpool failed: Operation not permitted\n' : '',
        durationMs: 1,
        failed: refused,
        timedOut: false,
      };
    };
    const run: Runner = { run: async (_f, a) => answer(a), probe: async (_f, a) => answer(a) };
    const log = memoryLogger();
    const done = await reclaimThinIds(run, config, { list: () => ({ entries: [] }) }, log);
    t.same(done, [5], 'the id the pool deleted');
    t.same(Object.keys(readTransientIds(f.transient)), ['3'], 'the refused one stays listed for gc or the next start');
    t.ok(
      log.lines.some(
        (l) =>
          l.level === 'warn' &&
          /could not delete leftover transient thin volume id 3 .*Operation not permitted.*stays listed/.test(l.msg),
      ),
    );
    t.ok(calls.some((c) => /delete 5/.test(c)));
  },
);
