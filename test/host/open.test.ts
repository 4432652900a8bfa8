/**
 * open and close without a kernel: kpartx's argv and its recorded output (kpartx 0.9.4 on kernel
 * 6.1, test/fixtures/kpartx-*), the --rw refusals, made before anything is built (only
 * losetup --list and flock run, no record is left), the status rows and gc's plan for open
 * records, and the undo of a killed open through a recording runner. The maps themselves are made,
 * mounted and removed on a real kernel in test/guest/cli-open.test.ts.
 */
import t from 'tap';
import { mkdtempSync, readdirSync, readFileSync, rmSync, statSync, truncateSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { defaultConfig, type Config } from '../../src/config/config.js';
import {
  addArgs,
  deleteArgs,
  listArgs,
  parseAddOutput,
  parseDeleteOutput,
  partitionMapsIn,
} from '../../src/devices/kpartx.js';
import type { RunOptions, RunResult, Runner } from '../../src/devices/runner.js';
import { devString } from '../../src/devices/sysfs.js';
import { Journal, type JournalEntry } from '../../src/journal/journal.js';
import { memoryLogger } from '../../src/log/logger.js';
import { XsError, type XenstoreClient } from '../../src/xenstore/types.js';
import { closeTarget, openRow, openTarget, OpenError, parseOpenTarget, OPEN_SCRIPT } from '../../src/cli/open.js';
import { applyGc, gcPlan } from '../../src/cli/gc.js';
import { takeInventory } from '../../src/cli/inventory.js';
import { cliMain } from '../../src/cli/main.js';

const FIX = join(import.meta.dirname, '../fixtures');
const fixture = (c: string) => readFileSync(join(FIX, `kpartx-0.9.4-k6.1-${c}.txt`), 'utf8');
const LOSETUP_LIST = 'losetup --list --json --output NAME,BACK-FILE,BACK-INO,BACK-MAJ:MIN,MAJ:MIN,RO,OFFSET,SIZELIMIT';

type Answer = string | { stdout?: string; stderr?: string; exitCode: number };

/** Answers by command line; a function answers from what ran before (a list after a detach). */
function recorder(answers: Record<string, Answer | ((calls: string[]) => Answer)> = {}): Runner & { calls: string[] } {
  const calls: string[] = [];
  const exec = async (file: string, args: readonly string[], _o?: RunOptions): Promise<RunResult> => {
    const command = [file, ...args].join(' ');
    calls.push(command);
    const given = answers[command];
    const a = typeof given === 'function' ? given(calls) : given;
    const r = typeof a === 'object' ? a : { stdout: a ?? '', stderr: '', exitCode: 0 };
    return {
      command,
      exitCode: r.exitCode,
      signal: undefined,
      stdout: r.stdout ?? '',
      stderr: r.stderr ?? '',
      durationMs: 1,
      failed: r.exitCode !== 0,
      timedOut: false,
    };
  };
  return { calls, run: exec, probe: exec };
}

/** A xenstore with `nodes` (absolute paths), directory listing included. */
function fakeXs(nodes: Record<string, string>): XenstoreClient {
  const abs = (p: string) => (p.startsWith('/') ? p : `/local/domain/0/${p}`);
  const tryRead = async (p: string) => nodes[abs(p)];
  const directory = async (p: string) => {
    const pre = `${abs(p)}/`;
    const kids = new Set(
      Object.keys(nodes)
        .filter((k) => k.startsWith(pre))
        .map((k) => k.slice(pre.length).split('/')[0] as string),
    );
    if (kids.size === 0) throw new XsError('ENOENT', 'directory', p);
    return [...kids];
  };
  const no = async () => {
    throw new Error('not in this fake');
  };
  return {
    tryRead,
    read: no,
    write: no,
    mkdir: no,
    rm: no,
    directory,
    transaction: no,
    watch: no,
    unwatch: no,
    getDomainPath: no,
    close: async () => {},
  } as unknown as XenstoreClient;
}

function setup(t: { teardown(f: () => void): void }) {
  const dir = mkdtempSync(join(tmpdir(), 'xbh-open-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const config: Config = {
    ...defaultConfig(),
    stateDir: join(dir, 'state'),
    xenLockDir: join(dir, 'xen-lock'),
    storeDir: join(dir, 'store'),
    logFile: '',
    busyRetryMs: 0,
  };
  const journal = new Journal(config.stateDir);
  const img = join(dir, 'disk.img');
  writeFileSync(img, '');
  truncateSync(img, 1 << 20);
  const st = statSync(img, { bigint: true });
  const id = { dev: devString(st.dev), ino: st.ino.toString() };
  const loopsJson = (loops: { name: string; ro: boolean; mm: string }[]) =>
    JSON.stringify({
      loopdevices: loops.map((l) => ({
        name: l.name,
        'back-file': img,
        'back-ino': Number(id.ino),
        'back-maj:min': id.dev,
        'maj:min': l.mm,
        ro: l.ro,
        offset: 0,
        sizelimit: 0,
      })),
    });
  return { dir, config, journal, img, id, loopsJson };
}

const openRecords = (journal: Journal) => journal.list().entries.filter((e) => e.script === OPEN_SCRIPT);

t.test('kpartx argv: -- before the device, read-only by -r, the delimiter fixed', async (t) => {
  t.same(addArgs('/dev/loop0', { readOnly: true }), ['-a', '-v', '-r', '-s', '-p', 'p', '--', '/dev/loop0']);
  t.same(addArgs('/dev/mapper/xbh-cow-web-xvda-51712', { readOnly: false }), [
    '-a',
    '-v',
    '-s',
    '-p',
    'p',
    '--',
    '/dev/mapper/xbh-cow-web-xvda-51712',
  ]);
  t.same(deleteArgs('/dev/loop0'), ['-d', '-v', '-p', 'p', '--', '/dev/loop0']);
  t.same(listArgs('/dev/nbd0'), ['-l', '-p', 'p', '--', '/dev/nbd0']);
  for (const bad of ['-d', 'loop0', '/srv/a.img', '/dev/a b', '/dev/x\0y', ''])
    t.throws(() => addArgs(bad, { readOnly: true }), /not a device path/, JSON.stringify(bad));
});

t.test('kpartx output, as recorded: MBR, GPT, logical partitions, a dm parent, no table, a failure', async (t) => {
  t.same(parseAddOutput(fixture('add-mbr')), [
    { name: 'loop0p1', major: 254, minor: 0, number: 1, sectors: 8192, parent: '7:0', offset: 2048 },
    { name: 'loop0p2', major: 254, minor: 1, number: 2, sectors: 22528, parent: '7:0', offset: 10240 },
  ]);
  t.same(
    parseAddOutput(fixture('add-again-mbr')),
    parseAddOutput(fixture('add-mbr')),
    'a second -a prints the same maps',
  );
  t.same(
    parseAddOutput(fixture('add-gpt')).map((m) => [m.name, m.sectors, m.offset]),
    [
      ['loop1p1', 8192, 2048],
      ['loop1p2', 8192, 10240],
      ['loop1p3', 12288, 18432],
    ],
  );
  t.same(
    parseAddOutput(fixture('add-extended')).map((m) => [m.number, m.sectors]),
    [
      [1, 4096],
      [2, 2],
      [5, 4096],
    ],
    'the extended container (2 sectors) and logical partition 5',
  );
  t.same(
    parseAddOutput(fixture('add-dm')).map((m) => [m.name, m.parent]),
    [
      ['xbh-cap-parentp1', '254:0'],
      ['xbh-cap-parentp2', '254:0'],
    ],
    'a dm parent: its dm name',
  );
  t.same(parseAddOutput(''), [], 'no table: nothing printed, nothing made');
  t.match(fixture('add-blank'), /^exit 0\n--- stdout\n--- stderr\n$/, 'kpartx exits 0 on a device without a table');
  const missing = /--- stdout\n(.*)\n--- stderr/s.exec(fixture('add-missing'))?.[1] as string;
  t.throws(
    () => parseAddOutput(missing),
    /^kpartx: failed to stat\(\) \/scratch\/.*missing\.img$/,
    'a failure on stdout is thrown',
  );
  t.same(parseDeleteOutput(fixture('delete-mbr')), ['loop0p1', 'loop0p2']);
  t.same(parseDeleteOutput(fixture('delete-extended')), ['loop2p1', 'loop2p2', 'loop2p5']);
  t.same(parseDeleteOutput(fixture('delete-again-mbr')), [], 'a second -d removes nothing');
  t.same(parseDeleteOutput(fixture('delete-dm')), ['xbh-cap-parentp1', 'xbh-cap-parentp2']);
  t.same(partitionMapsIn(fixture('dm-table-mbr'), '7:0', 'loop0'), ['loop0p1', 'loop0p2']);
  t.same(partitionMapsIn(fixture('dm-table-mbr'), '7:1', 'loop0'), [], 'another parent');
  t.same(partitionMapsIn(fixture('dm-table-mbr'), '7:0', 'loop'), [], 'another name');
  t.same(
    partitionMapsIn(
      'loop0p1x: 0 8192 linear 7:0 2048\nloop0p3: 0 8 snapshot 7:0 7:5 N 16\nloop0p4: 0 8 linear 7:0 0\n',
      '7:0',
      'loop0',
    ),
    ['loop0p4'],
  );
});

t.test('the command line: DOMAIN VDEV or IMAGE', async (t) => {
  t.same(parseOpenTarget(['web', 'xvda']), { kind: 'disk', domain: 'web', vdev: 'xvda' });
  t.same(parseOpenTarget(['./a.img']), { kind: 'image', path: './a.img' });
  t.throws(() => parseOpenTarget([]), OpenError);
  t.throws(() => parseOpenTarget(['a', 'b', 'c']), /not 3 arguments/);
  t.throws(() => parseOpenTarget(['web', 'vda']), /not a disk name/);
});

t.test('--rw refusals come before anything is built, and leave no record', async (t) => {
  const s = setup(t);
  const base = { config: s.config, log: memoryLogger(), journal: s.journal };
  const refuse = async (
    run: Runner & { calls: string[] },
    xs: XenstoreClient | undefined,
    msg: RegExp,
    what: string,
    target = { kind: 'image' as const, path: s.img },
  ) => {
    await t.rejects(openTarget(target, { rw: true }, { ...base, run, xs, mountinfo: '' }), msg, what);
    t.same(
      run.calls.filter((c) => !c.startsWith('flock') && c !== LOSETUP_LIST),
      [],
      `${what}: nothing but the listing ran`,
    );
    t.same(openRecords(s.journal), [], `${what}: no record`);
  };
  // Someone's loop on the image.
  await refuse(
    recorder({ [LOSETUP_LIST]: s.loopsJson([{ name: '/dev/loop4', ro: true, mm: '7:4' }]) }),
    fakeXs({}),
    /^--rw refused: image .*disk\.img is attached to \/dev\/loop4 \(read-only\); whoever attached it may be using it: detach it first\.$/,
    'a loop',
  );
  // A base of a block-cow disk, whose loop is not there right now.
  const cow = {
    ...Journal.begin('block-cow', 'backend/vbd/5/51712', {
      params: `${s.img} 64`,
      mode: 'w',
      frontendId: 5,
      vdev: 'xvda',
      domainName: 'web',
    }),
    phase: 'ready' as const,
  };
  cow.steps = [
    {
      kind: 'base-ref',
      data: { key: `${s.id.dev}:${s.id.ino}`, file: s.img, dev: s.id.dev, ino: s.id.ino, counted: true },
      done: true,
    },
  ];
  s.journal.save(cow);
  await refuse(
    recorder({ [LOSETUP_LIST]: s.loopsJson([]) }),
    fakeXs({}),
    /is the base image of block-cow disk web\/xvda \(backend\/vbd\/5\/51712\); a base shared by copy-on-write disks is never opened writable\.$/,
    'a base',
  );
  s.journal.delete('backend/vbd/5/51712');
  // A qcow2 disk's image (served by qemu-nbd, no loop).
  const qcow = {
    ...Journal.begin('block-qcow', 'backend/vbd/6/51712', {
      params: s.img,
      mode: 'w',
      frontendId: 6,
      vdev: 'xvdb',
      domainName: 'db',
    }),
    phase: 'ready' as const,
  };
  s.journal.save(qcow);
  await refuse(
    recorder({ [LOSETUP_LIST]: s.loopsJson([]) }),
    fakeXs({}),
    /is used by block-qcow disk db\/xvdb \(backend\/vbd\/6\/51712\); remove that disk first\.$/,
    'a qcow2 image',
  );
  s.journal.delete('backend/vbd/6/51712');
  // A disk QEMU serves itself (qdisk): no loop, no record; its params name the image.
  await refuse(
    recorder({ [LOSETUP_LIST]: s.loopsJson([]) }),
    fakeXs({
      '/local/domain/0/backend/qdisk/3/51712/params': `raw:${s.img}`,
      '/local/domain/0/backend/vbd/4/51712/params': '/srv/other.img',
    }),
    /^--rw refused: image .*disk\.img is named by the disk backend\/qdisk\/3\/51712; detach it there or shut the domain down first\.$/,
    'a qdisk',
  );
  // No xenstore: whether a domain has it cannot be known.
  await refuse(
    recorder({ [LOSETUP_LIST]: s.loopsJson([]) }),
    undefined,
    /--rw refused: xenstore cannot be reached, so it cannot be made sure that no domain has image /,
    'no xenstore',
  );

  // A domain's disk (a block device: /dev/loop0's node, 7:0), given to domain 7.
  const disk = (mode: 'r' | 'w') => {
    const e = {
      ...Journal.begin('block', 'backend/vbd/7/51712', {
        params: '/srv/a.img',
        mode,
        frontendId: 7,
        vdev: 'xvda',
        domainName: 'web',
      }),
      phase: 'ready' as const,
      device: { path: '/dev/loop0', major: 7, minor: 0 },
    };
    s.journal.save(e);
  };
  const target = { kind: 'disk' as const, domain: 'web', vdev: 'xvda' };
  const vbd = fakeXs({
    '/local/domain/0/backend/vbd/7/51712/physical-device': '7:0',
    '/local/domain/0/backend/vbd/7/51712/mode': 'w',
    '/local/domain/7/name': 'web',
  });
  disk('r');
  await t.rejects(
    openTarget(target, { rw: true }, { ...base, run: recorder(), xs: vbd, mountinfo: '' }),
    /--rw refused: disk web\/xvda \(\/dev\/loop0\) is a read-only disk \(access=r\)/,
    'a read-only disk',
  );
  disk('w');
  await t.rejects(
    openTarget(target, { rw: true }, { ...base, run: recorder(), xs: vbd, mountinfo: '' }),
    /^--rw refused: disk web\/xvda \(\/dev\/loop0\) is attached to domain 7 \(web\) \(backend\/vbd\/7\/51712, through \/dev\/loop0\); detach it there or shut the domain down first\.$/,
    'its domain has it',
  );
  const mounted = '30 1 7:0 / /mnt rw,relatime shared:1 - ext4 /dev/loop0 rw\n';
  await t.rejects(
    openTarget(target, { rw: true }, { ...base, run: recorder(), xs: fakeXs({}), mountinfo: mounted }),
    /--rw refused: disk web\/xvda .* is mounted on \/mnt in dom0/,
    'mounted in dom0',
  );
  await t.rejects(
    openTarget({ kind: 'disk', domain: '9', vdev: 'xvda' }, { rw: false }, { ...base, run: recorder(), xs: undefined }),
    /^no disk recorded for domain 9, vdev xvda \(recorded: web\/xvda\)$/,
  );
  t.same(openRecords(s.journal), []);
});

t.test('a failure after the record was begun is rolled back: no loop of its own, no record', async (t) => {
  const s = setup(t);
  // attachLoop reads the new loop's sysfs; the recording runner cannot make one, so this stops at
  // losetup's answer: the open fails, and its rollback runs the loop step's undo (by the file).
  const run = recorder({
    [LOSETUP_LIST]: s.loopsJson([]),
    [`losetup --find --show --read-only -- ${s.img}`]: 'not-a-loop\n',
  });
  await t.rejects(
    openTarget(
      { kind: 'image', path: s.img },
      { rw: false },
      { config: s.config, log: memoryLogger(), journal: s.journal, run, xs: undefined },
    ),
    /printed "not-a-loop", not a loop device/,
  );
  t.same(openRecords(s.journal), [], 'rolled back: no record');
  t.same(
    run.calls.filter((c) => !c.startsWith('flock')),
    [LOSETUP_LIST, `losetup --find --show --read-only -- ${s.img}`, LOSETUP_LIST, LOSETUP_LIST],
    'the undo looked for a loop of its own on the image and found none',
  );
});

t.test('status rows and gc: an open in use is shown and left alone; a killed one is undone, exactly', async (t) => {
  const s = setup(t);
  const rec = (phase: JournalEntry['phase'], pid: number, done: boolean): JournalEntry => {
    const e = {
      ...Journal.begin(OPEN_SCRIPT, 'open/image/1:2', {
        params: s.img,
        mode: 'r',
        frontendId: undefined,
        vdev: undefined,
        domainName: undefined,
      }),
      phase,
      pid,
    };
    e.steps = [
      {
        kind: 'open-loop',
        data: {
          file: s.img,
          dev: s.id.dev,
          ino: s.id.ino,
          readOnly: true,
          before: ['/dev/loop4'],
          ...(done ? { loop: '/dev/loop5', major: 7, minor: 5 } : {}),
        },
        done,
      },
      {
        kind: 'partitions',
        data: {
          parent: '/dev/loop5',
          majmin: '7:5',
          prefix: 'loop5',
          readOnly: true,
          image: s.img,
          ...(done ? { maps: [{ name: 'loop5p1', major: 254, minor: 3, number: 1, sectors: 8192 }] } : {}),
        },
        done,
      },
    ];
    return e;
  };
  const kernel = { dm: [{ name: 'loop5p1', major: 254, minor: 3 }] };
  const open = openRow(rec('ready', 1, true), kernel, () => false);
  t.match(open, { kind: 'record', hook: 'open', state: 'open', device: '/dev/loop5', majmin: '7:5', base: s.img });
  t.equal(open.why, 'partitions /dev/mapper/loop5p1 (read-only); "xen-blockhooks close" takes them away');
  t.equal(openRow(rec('ready', 1, true), { dm: [] }, () => false).state, 'missing');
  t.equal(openRow(rec('adding', 4242, false), kernel, (p) => p === 4242).state, 'adding');
  t.equal(openRow(rec('failed', 1, true), kernel, () => false).state, 'failed');
  const orphan = openRow(rec('adding', 4242, false), kernel, () => false);
  t.same([orphan.state, orphan.why], ['orphan', 'open by process 4242 stopped half-way (gc undoes it)']);

  const inv = (rows: ReturnType<typeof openRow>[]) => ({
    rows,
    xenstore: false,
    dmAvailable: true,
    unreadable: [],
    kernel: { dmAvailable: true, dm: [], loops: [], nbds: [] },
  });
  t.same(
    gcPlan(inv([open]), { withoutXenstore: true }),
    [],
    'gc never takes an open in use, not even --without-xenstore',
  );
  t.same(
    gcPlan(inv([{ ...open, state: 'failed' }]), { withoutXenstore: false }),
    [],
    'nor a failed close (close again)',
  );
  const plan = gcPlan(inv([orphan]), { withoutXenstore: false });
  t.same(
    plan.map((p) => p.action),
    [
      `undo open record open/image/1:2 (partitions of /dev/loop5): open by process 4242 stopped half-way (gc undoes it)`,
    ],
  );

  // The killed open's record: neither the maps nor the loop were written down. gc finds them by
  // the parent's table and the file's loops, and leaves /dev/loop4 (there before the open) alone.
  s.journal.save(rec('adding', 4242, false));
  const run = recorder({
    'dmsetup table': `${fixture('dm-table-mbr').replace(/loop0/g, 'loop5').replace(/7:0/g, '7:5')}vg-root: 0 8 linear 8:2 0\n`,
    // Numbers no mount of this machine has (the undo reads the real /proc/self/mountinfo).
    'dmsetup info -c --noheadings --separator | -o name,major,minor,open,uuid -- loop5p1':
      'loop5p1|254|250|0|part1-devnode_7:5_x\n',
    'dmsetup info -c --noheadings --separator | -o name,major,minor,open,uuid -- loop5p2':
      'loop5p2|254|251|0|part2-devnode_7:5_x\n',
    [LOSETUP_LIST]: (calls) =>
      s.loopsJson([
        { name: '/dev/loop4', ro: true, mm: '7:4' },
        ...(calls.includes('losetup --detach /dev/loop5') ? [] : [{ name: '/dev/loop5', ro: true, mm: '7:5' }]),
      ]),
  });
  const listed = await takeInventory({
    config: s.config,
    run,
    xs: undefined,
    journal: s.journal,
    kernel: { dmAvailable: true, dm: [], loops: [], nbds: [] },
    alive: () => false,
  });
  const gcItems = gcPlan(listed, { withoutXenstore: false });
  t.same(
    gcItems.map((i) => i.row.backendPath),
    ['open/image/1:2'],
  );
  const results = await applyGc(gcItems, {
    config: s.config,
    run,
    log: memoryLogger(),
    xs: undefined,
    journal: s.journal,
  });
  t.same(
    results.map((r) => [r.ok, r.error]),
    [[true, undefined]],
  );
  const acted = run.calls.filter((c) => /^(dmsetup remove|losetup --detach)/.test(c));
  t.same(
    acted,
    ['dmsetup remove -- loop5p2', 'dmsetup remove -- loop5p1', 'losetup --detach /dev/loop5'],
    'its maps and its loop, not /dev/loop4, not vg-root',
  );
  t.same(
    readdirSync(join(s.config.stateDir, 'journal')).filter((f) => f.endsWith('.json')),
    [],
    'the record is gone',
  );
});

t.test('close: not open, and the exit codes of the commands', async (t) => {
  const s = setup(t);
  await t.rejects(
    closeTarget(
      { kind: 'image', path: s.img },
      { config: s.config, log: memoryLogger(), journal: s.journal, run: recorder(), xs: undefined },
    ),
    /disk\.img is not open \(nothing is open\)$/,
  );
  const out: string[] = [];
  const err: string[] = [];
  const deps = {
    config: s.config,
    run: recorder(),
    connect: async () => {
      throw new Error('no xenstore');
    },
    out: (x: string) => out.push(x),
    err: (x: string) => err.push(x),
    logger: memoryLogger(),
  };
  t.equal(await cliMain(['open', join(s.dir, 'missing.img')], {}, deps), 1);
  t.equal(await cliMain(['open', s.dir], {}, deps), 1);
  t.equal(await cliMain(['close', s.img], {}, deps), 1);
  t.equal(await cliMain(['open', 'web', 'xvda'], {}, deps), 1);
  t.same(err, [
    `xen-blockhooks open: ${join(s.dir, 'missing.img')}: no such file`,
    `xen-blockhooks open: ${s.dir} is neither a disk image file nor a block device`,
    `xen-blockhooks close: ${s.img} is not open (nothing is open)`,
    'xen-blockhooks open: no disk recorded for domain web, vdev xvda (the hooks have built no disk)',
  ]);
  t.same(out, []);
  for (const c of ['open', 'close']) {
    t.equal(await cliMain([c, '--help'], {}, deps), 0);
  }
  t.match(
    out.join('\n'),
    /Usage: xen-blockhooks open DOMAIN VDEV \[--rw\][\s\S]*Usage: xen-blockhooks close DOMAIN VDEV/,
  );
});

t.test('Journal.create: of two records with one key the first stays', async (t) => {
  const s = setup(t);
  const a = Journal.begin(OPEN_SCRIPT, 'open/image/1:2', {
    params: '/a.img',
    mode: 'r',
    frontendId: undefined,
    vdev: undefined,
    domainName: undefined,
  });
  const b = Journal.begin(OPEN_SCRIPT, 'open/image/1:2', {
    params: '/b.img',
    mode: 'w',
    frontendId: undefined,
    vdev: undefined,
    domainName: undefined,
  });
  t.equal(s.journal.create(a), true);
  t.equal(s.journal.create(b), false);
  t.equal(s.journal.load('open/image/1:2')?.disk.params, '/a.img');
  t.same(readdirSync(join(s.config.stateDir, 'journal')), ['open~image~1:2.json'], 'no temporary file is left');
});
