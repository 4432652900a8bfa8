import t from 'tap';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { RunResult, Runner } from '../../src/devices/runner.js';
import {
  createArgs,
  dmInfo,
  dmRemove,
  errorTable,
  infoArgs,
  infoOneArgs,
  linearTable,
  lsArgs,
  messageArgs,
  mknodesArgs,
  parseInfo,
  parseLs,
  parseSnapshotStatus,
  parseStatus,
  parseThinPoolStatus,
  parseThinStatus,
  reloadArgs,
  removeArgs,
  resumeArgs,
  snapshotOriginTable,
  snapshotTable,
  statusArgs,
  suspendArgs,
  tableArgs,
  thinPoolTable,
  thinTable,
  zeroTable,
} from '../../src/devices/dmsetup.js';

const FIX = fileURLToPath(new URL('../fixtures/', import.meta.url));
const real = (c: string) => readFileSync(join(FIX, `dmsetup-1.02.185-k6.1-${c}.txt`), 'utf8');
const doc = (c: string) => readFileSync(join(FIX, `dmsetup-doc-${c}.txt`), 'utf8');
const only = (text: string) => {
  const l = parseStatus(text);
  if (l.length !== 1) throw new Error(`expected one line, got ${l.length}`);
  return l[0]!;
};

t.test('table builders', async (t) => {
  const loop0 = { major: 7, minor: 0 };
  const loop1 = { major: 7, minor: 1 };
  t.equal(
    snapshotTable({ length: 65536 }, loop0, loop1, { persistent: true, chunkSectors: 16 }),
    '0 65536 snapshot 7:0 7:1 P 16',
  );
  t.equal(
    snapshotTable({ length: 65536 }, loop0, loop1, { persistent: true, chunkSectors: 16, overflow: true }),
    '0 65536 snapshot 7:0 7:1 PO 16',
  );
  t.equal(
    snapshotTable({ length: 8n }, '/dev/loop0', '254:3', { persistent: false, chunkSectors: 256 }),
    '0 8 snapshot /dev/loop0 254:3 N 256',
  );
  t.equal(snapshotOriginTable({ length: 65536 }, loop0), '0 65536 snapshot-origin 7:0');
  t.equal(
    thinPoolTable(
      { length: 8192 },
      { major: 7, minor: 3 },
      { major: 7, minor: 4 },
      { blockSectors: 128, lowWaterBlocks: 0, errorIfNoSpace: true },
    ),
    '0 8192 thin-pool 7:3 7:4 128 0 1 error_if_no_space',
    'same as the table the kernel echoed (table-thin-pool fixture)',
  );
  t.equal(
    thinPoolTable({ length: 8192 }, '7:3', '7:4', {
      blockSectors: 256,
      lowWaterBlocks: 10,
      skipBlockZeroing: true,
      noDiscardPassdown: true,
    }),
    '0 8192 thin-pool 7:3 7:4 256 10 2 skip_block_zeroing no_discard_passdown',
  );
  t.equal(thinTable({ length: 65536 }, { major: 254, minor: 3 }, 0, loop0), '0 65536 thin 254:3 0 7:0');
  t.equal(thinTable({ length: 65536 }, '254:3', 5), '0 65536 thin 254:3 5');
  t.equal(linearTable({ start: 100, length: 50 }, loop0, 2048), '100 50 linear 7:0 2048');
  t.equal(zeroTable({ length: 1 }), '0 1 zero');
  t.equal(errorTable({ length: 9 }), '0 9 error');
  t.equal(
    only(real('table-snapshot')).params,
    snapshotTable({ length: 65536 }, loop0, loop1, { persistent: true, chunkSectors: 16 })
      .split(' ')
      .slice(3)
      .join(' '),
  );

  t.throws(() => snapshotTable({ length: 1 }, loop0, loop1, { persistent: true, chunkSectors: 12 }), /power of two/);
  t.throws(
    () => snapshotTable({ length: 0 }, loop0, loop1, { persistent: true, chunkSectors: 16 }),
    /length must be >= 1/,
  );
  t.throws(() => linearTable({ length: 1 }, '/dev/my disk'), /invalid device/);
  t.throws(() => linearTable({ length: 1 }, 'loop0'), /invalid device/);
  t.throws(
    () => thinPoolTable({ length: 1 }, '7:3', '7:4', { blockSectors: 100, lowWaterBlocks: 0 }),
    /multiple of 128/,
  );
  t.throws(() => thinTable({ length: 1 }, '7:3', -1), /thin device id/);
});

t.test('argv builders', async (t) => {
  const table = '0 65536 snapshot 7:0 7:1 P 16';
  t.same(createArgs('xbh-cow-5-51712', table), ['create', '--table', table, '--', 'xbh-cow-5-51712']);
  t.same(createArgs('x', table, { readOnly: true, uuid: 'XBH-x' }), [
    'create',
    '--readonly',
    '--uuid',
    'XBH-x',
    '--table',
    table,
    '--',
    'x',
  ]);
  t.same(removeArgs('x'), ['remove', '--', 'x']);
  t.same(suspendArgs('x'), ['suspend', 'x']);
  t.same(suspendArgs('x', { noFlush: true }), ['suspend', '--noflush', 'x']);
  t.same(resumeArgs('x'), ['resume', 'x']);
  t.same(reloadArgs('x', table), ['reload', 'x', '--table', table]);
  t.same(messageArgs('pool', 0, 'create_thin', '0'), ['message', 'pool', '0', 'create_thin', '0']);
  t.same(statusArgs('x'), ['status', 'x']);
  t.same(statusArgs(), ['status']);
  t.same(statusArgs(undefined, { target: 'snapshot' }), ['status', '--target', 'snapshot']);
  t.same(tableArgs('x'), ['table', 'x']);
  t.same(infoOneArgs('x'), [
    'info',
    '-c',
    '--noheadings',
    '--separator',
    '|',
    '-o',
    'name,major,minor,open,uuid',
    '--',
    'x',
  ]);
  t.same(infoArgs(), ['info', '-c', '--noheadings', '-o', 'name,major,minor,open,attr']);
  t.same(lsArgs(), ['ls']);
  t.same(mknodesArgs(), ['mknodes']);
  t.same(mknodesArgs('x'), ['mknodes', 'x']);
  for (const bad of ['', '-x', 'a b', 'a/b', 'x'.repeat(128), 'a\nb']) {
    t.throws(() => removeArgs(bad), /invalid device-mapper name/, JSON.stringify(bad));
  }
  t.same(
    createArgs('x', '0 1 zero\n1 1 error'),
    ['create', '--table', '0 1 zero\n1 1 error', '--', 'x'],
    'two ranges, one per line',
  );
  t.throws(
    () => createArgs('x', '0 1 zero\n1 1 error\n2 1 zero'),
    /invalid dm table/,
    'three lines: dmsetup before 2.03.17 splits only the first',
  );
  t.throws(() => createArgs('x', '0 1 zero\n'), /invalid dm table/, 'an empty line');
  t.throws(() => createArgs('x', '0 1 zero; 1 1 error'), /invalid dm table/);
  t.throws(() => createArgs('x', ''), /invalid dm table/);
  t.throws(() => messageArgs('p', 0), /invalid dm message/);
  t.throws(() => messageArgs('p', 0, 'a b'), /invalid dm message/);
});

t.test('status parsing: snapshot (real captures, kernel 6.1)', async (t) => {
  const fresh = only(real('status-snapshot-fresh'));
  t.same({ ...fresh }, { start: 0n, length: 65536n, target: 'snapshot', params: '32/8192 32' });
  t.same(parseSnapshotStatus(fresh.params), {
    state: 'active',
    allocatedSectors: 32n,
    totalSectors: 8192n,
    metadataSectors: 32n,
  });
  t.same(parseSnapshotStatus(only(real('status-snapshot-used')).params), {
    state: 'active',
    allocatedSectors: 2080n,
    totalSectors: 8192n,
    metadataSectors: 32n,
  });
  t.same(parseSnapshotStatus(only(real('status-snapshot-invalid')).params), { state: 'invalid' });
  t.same(parseSnapshotStatus(only(real('status-snapshot-overflow')).params), { state: 'overflow' });
  t.same(parseSnapshotStatus(only(doc('status-snapshot-merge-failed')).params), { state: 'merge-failed' });
  const origin = only(real('status-snapshot-origin'));
  t.equal(origin.target, 'snapshot-origin');
  t.equal(origin.params, '');
  t.throws(() => parseSnapshotStatus('12/x 3'), /unexpected snapshot status/);
});

t.test('status parsing: thin-pool and thin', async (t) => {
  t.same(parseThinPoolStatus(only(real('status-thin-pool-fresh')).params), {
    state: 'ok',
    transactionId: 0n,
    usedMetadataBlocks: 111n,
    totalMetadataBlocks: 1024n,
    usedDataBlocks: 0n,
    totalDataBlocks: 64n,
    heldMetadataRoot: null,
    mode: 'rw',
    discard: 'discard_passdown',
    noSpace: 'error_if_no_space',
    needsCheck: false,
    metadataLowWatermark: 256n,
  });
  t.match(parseThinPoolStatus(only(real('status-thin-pool-used')).params), { mode: 'rw', usedDataBlocks: 16n });
  t.match(parseThinPoolStatus(only(real('status-thin-pool-full')).params), {
    mode: 'out_of_data_space',
    usedDataBlocks: 64n,
    totalDataBlocks: 64n,
  });
  t.match(parseThinPoolStatus(only(doc('status-thin-pool-ro-needs-check')).params), {
    transactionId: 7n,
    heldMetadataRoot: 58n,
    mode: 'ro',
    discard: 'no_discard_passdown',
    noSpace: 'queue_if_no_space',
    needsCheck: true,
  });
  t.match(parseThinPoolStatus(only(doc('status-thin-pool-no-watermark')).params), {
    discard: 'ignore_discard',
    metadataLowWatermark: null,
  });
  t.same(parseThinPoolStatus(only(doc('status-thin-pool-fail')).params), { state: 'fail' });
  t.same(parseThinPoolStatus('Error'), { state: 'error' });
  t.throws(() => parseThinPoolStatus('0 1/2 3/4 - rw discard_passdown maybe - 1'), /unexpected thin-pool status/);

  t.same(parseThinStatus(only(real('status-thin-fresh')).params), {
    state: 'ok',
    mappedSectors: 0n,
    highestMappedSector: null,
  });
  t.same(parseThinStatus(only(real('status-thin-used')).params), {
    state: 'ok',
    mappedSectors: 2048n,
    highestMappedSector: 2047n,
  });
  t.same(parseThinStatus(only(real('status-thin-full')).params), {
    state: 'ok',
    mappedSectors: 8192n,
    highestMappedSector: 8191n,
  });
  t.same(parseThinStatus(only(doc('status-thin-fail')).params), { state: 'fail' });
  t.same(parseThinStatus('-'), { state: 'no-device' });
  t.throws(() => parseThinStatus('12'), /unexpected thin status/);
});

t.test('status of all devices, info -c, ls', async (t) => {
  const all = parseStatus(real('status-all'));
  t.same(
    all.map((l) => [l.name, l.target]),
    [
      ['cap-origin', 'snapshot-origin'],
      ['cap-pool', 'thin-pool'],
      ['cap-snap', 'snapshot'],
      ['cap-snap-po', 'snapshot'],
      ['cap-thin', 'thin'],
    ],
  );
  t.same(parseStatus(real('status-none')), []);

  t.same(parseInfo(real('info-c-one')), [
    {
      name: 'cap-snap',
      major: 254,
      minor: 0,
      openCount: 0,
      live: true,
      inactiveTable: false,
      suspended: false,
      readOnly: false,
    },
  ]);
  t.equal(parseInfo(real('info-c-open'))[0]?.openCount, 1);
  t.equal(parseInfo(real('info-c-suspended'))[0]?.suspended, true);
  t.same(
    parseInfo(real('info-c-all')).map((i) => `${i.name}=${i.major}:${i.minor}`),
    ['cap-origin=254:2', 'cap-pool=254:3', 'cap-snap=254:0', 'cap-snap-po=254:1', 'cap-thin=254:4'],
  );
  t.same(parseInfo(real('info-c-none')), []);
  t.same(parseInfo('a:b:254:7:2:LIsr\n'), [
    {
      name: 'a:b',
      major: 254,
      minor: 7,
      openCount: 2,
      live: true,
      inactiveTable: true,
      suspended: true,
      readOnly: true,
    },
  ]);
  t.throws(() => parseInfo('x:1:2'), /unexpected dmsetup info line/);

  t.same(
    parseLs(real('ls')).map((d) => `${d.name} ${d.major}:${d.minor}`),
    ['cap-origin 254:2', 'cap-pool 254:3', 'cap-snap 254:0', 'cap-snap-po 254:1', 'cap-thin 254:4'],
  );
  t.same(parseLs('old\t(253, 9)\n'), [{ name: 'old', major: 253, minor: 9 }]);
  t.same(parseLs('No devices found\n'), []);
});

/** A runner that answers dmsetup with a script of results and records the calls. */
function scripted(answers: { exitCode: number; stdout?: string; stderr?: string }[], sysRoot?: string) {
  const calls: string[][] = [];
  const next = (file: string, args: readonly string[]): RunResult => {
    calls.push([file, ...args]);
    const a = answers.shift();
    if (!a) throw new Error('no more scripted answers');
    return {
      command: [file, ...args].join(' '),
      exitCode: a.exitCode,
      signal: undefined,
      stdout: a.stdout ?? '',
      stderr: a.stderr ?? '',
      durationMs: 1,
      failed: a.exitCode !== 0,
      timedOut: false,
    };
  };
  const runner: Runner = {
    ...(sysRoot !== undefined ? { sysRoot } : {}),
    async run(f, a) {
      const r = next(f, a);
      if (r.failed) throw new Error(r.stderr);
      return r;
    },
    async probe(f, a) {
      return next(f, a);
    },
  };
  return { runner, calls };
}

t.test('dmRemove: retries EBUSY within its bound, "no such device" is success', async (t) => {
  const busy = { exitCode: 1, stderr: real('remove-busy-stderr') };
  const missing = { exitCode: 1, stderr: real('remove-missing-stderr') };
  const infoMissing = { exitCode: 1, stderr: real('info-c-missing-stderr') };

  const a = scripted([busy, busy, { exitCode: 0 }]);
  await dmRemove(a.runner, 'cap-origin', 5000);
  t.same(a.calls, [
    ['dmsetup', 'remove', '--', 'cap-origin'],
    ['dmsetup', 'remove', '--', 'cap-origin'],
    ['dmsetup', 'remove', '--', 'cap-origin'],
  ]);

  const b = scripted([missing, infoMissing]);
  await dmRemove(b.runner, 'cap-missing', 1000);
  t.same(
    b.calls.map((c) => c[1]),
    ['remove', 'info'],
    'already gone: checked, and done',
  );

  const c = scripted(Array(100).fill(busy));
  const t0 = Date.now();
  await t.rejects(dmRemove(c.runner, 'cap-origin', 300), /still busy after 300 ms/);
  t.ok(Date.now() - t0 < 3000, 'gave up near its bound');
  t.ok(c.calls.length >= 2, `retried (${c.calls.length} tries)`);

  const d = scripted([{ exitCode: 1, stderr: '/dev/mapper/control: open failed: No such device\nCommand failed.\n' }]);
  await t.rejects(dmRemove(d.runner, 'x', 1000), 'other failures are errors');
});

t.test('dmInfo: undefined for a missing device; name, numbers, open count and uuid', async (t) => {
  const a = scripted([{ exitCode: 1, stderr: real('info-c-missing-stderr') }]);
  t.equal(await dmInfo(a.runner, 'cap-missing'), undefined);
  const b = scripted([{ exitCode: 0, stdout: 'cap-origin|254|2|1|XBH-0123456789abcdef01234567\n' }]);
  t.same(await dmInfo(b.runner, 'cap-origin'), {
    name: 'cap-origin',
    major: 254,
    minor: 2,
    open: 1,
    uuid: 'XBH-0123456789abcdef01234567',
  });
  t.same(b.calls[0], [
    'dmsetup',
    'info',
    '-c',
    '--noheadings',
    '--separator',
    '|',
    '-o',
    'name,major,minor,open,uuid',
    '--',
    'cap-origin',
  ]);
});

t.test('dmRemove still busy: the devices stacked on it are named (partitions open in dom0)', async (t) => {
  const root = mkdtempSync(join(tmpdir(), 'xbh-sys-'));
  t.teardown(() => {
    rmSync(root, { recursive: true, force: true });
  });
  mkdirSync(join(root, 'dev/block/254:3/holders/dm-4'), { recursive: true });
  mkdirSync(join(root, 'class/block/dm-4/dm'), { recursive: true });
  writeFileSync(join(root, 'class/block/dm-4/dm/name'), 'xbh-cow-web-xvda-51712p1\n');
  const busy = { exitCode: 1, stderr: real('remove-busy-stderr') };
  const s = scripted([busy, { exitCode: 0, stdout: 'xbh-cow-web-xvda-51712|254|3|1|XBH-abc\n' }], root);
  await t.rejects(
    dmRemove(s.runner, 'xbh-cow-web-xvda-51712', 0),
    /still busy after 0 ms: xbh-cow-web-xvda-51712p1 sits on it \(partitions "xen-blockhooks open" mapped\? "xen-blockhooks status" shows them\)\)$/,
  );
  const none = scripted([busy, { exitCode: 0, stdout: 'cap-origin|254|9|1|\n' }]);
  await t.rejects(
    dmRemove(none.runner, 'cap-origin', 0),
    /still busy after 0 ms: something, e\.g\. blkback, still has it open\)$/,
    'nothing stacked on it',
  );
});
