/**
 * status and gc over a real journal (temporary state directory), a recorded runner answering
 * dmsetup/losetup with captured outputs, and a xenstore that knows some domains and not others.
 */
import t from 'tap';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { defaultConfig, type Config } from '../../src/config/config.js';
import type { RunOptions, RunResult, Runner } from '../../src/devices/runner.js';
import { Journal, type JournalEntry } from '../../src/journal/journal.js';
import type { StepRecord } from '../../src/journal/journal.js';
import type { UndoRegistry } from '../../src/journal/steps.js';
import { memoryLogger } from '../../src/log/logger.js';
import type { XenstoreClient } from '../../src/xenstore/types.js';
import { takeInventory } from '../../src/cli/inventory.js';
import { applyGc, gcPlan } from '../../src/cli/gc.js';
import { parseUsage } from '../../src/cli/kernel.js';
import { renderStatus } from '../../src/cli/status.js';
import { cliMain } from '../../src/cli/main.js';

const fixture = (n: string) => readFileSync(join(import.meta.dirname, '../fixtures', n), 'utf8');

function recorder(answers: Record<string, string>): Runner & { calls: string[] } {
  const calls: string[] = [];
  const exec = async (file: string, args: readonly string[], _o?: RunOptions): Promise<RunResult> => {
    const command = [file, ...args].join(' ');
    calls.push(command);
    const stdout = answers[command];
    return {
      command,
      exitCode: 0,
      signal: undefined,
      stdout: stdout ?? '',
      stderr: '',
      durationMs: 1,
      failed: false,
      timedOut: false,
    };
  };
  return { calls, run: exec, probe: exec };
}

function fakeXs(nodes: Record<string, string>): XenstoreClient {
  const get = async (p: string) => {
    const abs = p.startsWith('/') ? p : `/local/domain/0/${p}`;
    if (abs in nodes) return nodes[abs];
    return Object.keys(nodes).some((k) => k.startsWith(`${abs}/`)) ? '' : undefined;
  };
  const no = async () => {
    throw new Error('not in this fake');
  };
  return {
    tryRead: get,
    read: no,
    write: no,
    mkdir: no,
    rm: no,
    directory: no,
    transaction: no,
    watch: no,
    unwatch: no,
    getDomainPath: no,
    close: async () => {},
  } as unknown as XenstoreClient;
}

function setup(t: { teardown(f: () => void): void }) {
  const dir = mkdtempSync(join(tmpdir(), 'xbh-cli-inv-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const config: Config = {
    ...defaultConfig(),
    stateDir: join(dir, 'state'),
    storeDir: '/var/lib/xen-blockhooks',
    logFile: '',
  };
  const journal = new Journal(config.stateDir);
  const record = (domid: number, name: string, minor: number, over: Partial<JournalEntry> = {}): JournalEntry => {
    const bp = `backend/vbd/${domid}/51712`;
    const dm = `xbh-cow-${name}-xvda-51712`;
    const steps: StepRecord[] = [
      {
        kind: 'base-ref',
        data: {
          key: '8:1:12',
          file: '/srv/xen/base.img',
          dev: '8:1',
          ino: '12',
          counted: true,
          loop: '/dev/loop0',
          major: 7,
          minor: 0,
        },
        done: true,
      },
      { kind: 'store-file', data: { path: `/var/lib/xen-blockhooks/${name}.cow`, persistent: false }, done: true },
      {
        kind: 'loop',
        data: {
          file: `/var/lib/xen-blockhooks/${name}.cow`,
          dev: '8:2',
          ino: String(100 + domid),
          readOnly: false,
          loop: `/dev/loop${domid}`,
          major: 7,
          minor: domid,
        },
        done: true,
      },
      {
        kind: 'dm',
        data: { name: dm, table: `0 131072 snapshot 7:0 7:${domid} N 128`, readOnly: false },
        done: true,
      },
    ];
    const e: JournalEntry = {
      ...Journal.begin('block-cow', bp, {
        params: '/srv/xen/base.img 64',
        mode: 'w',
        frontendId: domid,
        vdev: 'xvda',
        domainName: name,
      }),
      phase: 'ready',
      pid: 999_999_999,
      steps,
      device: { path: `/dev/dm-${minor}`, major: 254, minor },
      ...over,
    };
    journal.save(e);
    return e;
  };
  record(1, 'web', 0);
  record(2, 'db', 1);
  record(3, 'mail', 2);
  record(4, 'dns', 3, { phase: 'adding' });
  const loops = JSON.stringify({
    loopdevices: [
      { name: '/dev/loop0', 'back-file': '/srv/xen/base.img', 'maj:min': '7:0', ro: true },
      { name: '/dev/loop1', 'back-file': '/var/lib/xen-blockhooks/web.cow', 'maj:min': '7:1', ro: false },
      { name: '/dev/loop2', 'back-file': '/var/lib/xen-blockhooks/db.cow', 'maj:min': '7:2', ro: false },
      { name: '/dev/loop3', 'back-file': '/var/lib/xen-blockhooks/mail.cow', 'maj:min': '7:3', ro: false },
      { name: '/dev/loop7', 'back-file': '/srv/xen/old-base.img', 'maj:min': '7:7', ro: true },
      { name: '/dev/loop8', 'back-file': '/var/lib/xen-blockhooks/leak.cow (deleted)', 'maj:min': '7:8', ro: false },
      { name: '/dev/loop9', 'back-file': '/home/someone/other.img', 'maj:min': '7:9', ro: false },
    ],
  });
  const run = recorder({
    'dmsetup info -c --noheadings -o name,major,minor,open,attr':
      'xbh-cow-web-xvda-51712:254:0:1:L--w\nxbh-cow-db-xvda-51712:254:1:1:L--w\nxbh-cow-mail-xvda-51712:254:2:1:L--w\nxbh-cow-old-xvdb-51728:254:5:0:L--w\nvg0-root:254:9:1:L--w\n',
    'dmsetup table':
      'xbh-cow-web-xvda-51712: 0 131072 snapshot 7:0 7:1 N 128\nxbh-cow-db-xvda-51712: 0 131072 snapshot 7:0 7:2 N 128\n' +
      'xbh-cow-mail-xvda-51712: 0 131072 snapshot 7:0 7:3 N 128\nxbh-cow-old-xvdb-51728: 0 131072 snapshot 7:7 7:8 N 128\nvg0-root: 0 2097152 linear 8:2 2048\n',
    'dmsetup status':
      `xbh-cow-web-xvda-51712: 0 131072 snapshot 2072/8192 24\nxbh-cow-db-xvda-51712: 0 131072 snapshot 16/8192 16\n` +
      `xbh-cow-mail-xvda-51712: ${fixture('dmsetup-1.02.185-k6.1-status-snapshot-invalid.txt').trim()}\n` +
      'xbh-cow-old-xvdb-51728: 0 131072 snapshot 4096/8192 16\nvg0-root: 0 2097152 linear \n',
    'losetup --list --json --output NAME,BACK-FILE,BACK-INO,BACK-MAJ:MIN,MAJ:MIN,RO,OFFSET,SIZELIMIT': loops,
  });
  const xs = fakeXs({
    '/local/domain/0/backend/vbd/1/51712/state': '4',
    '/local/domain/1/name': 'web',
    '/local/domain/3/name': 'mail',
    '/local/domain/0/backend/vbd/3/51712/state': '4',
    '/local/domain/4/name': 'dns',
    '/local/domain/0/backend/vbd/4/51712/state': '2',
    // domain 2 is gone, and so is its backend
  });
  return { config, journal, run, xs };
}

t.test('status: the BASE column is the path the params name, spaces and all', async (t) => {
  const { config, journal, run, xs } = setup(t);
  const web = journal.list().entries.find((e) => e.disk.domainName === 'web') as JournalEntry;
  journal.save({ ...web, disk: { ...web.disk, params: '/media/LIVE CD/base.img 1.5G persistent' } });
  const db = journal.list().entries.find((e) => e.disk.domainName === 'db') as JournalEntry;
  journal.save({ ...db, script: 'block-lvsnap', disk: { ...db.disk, params: '/dev/vg0/golden 2G' } });
  const inv = await takeInventory({ config, run, xs, journal, alive: () => false });
  t.equal(inv.rows.find((r) => r.domain === 'web')?.base, '/media/LIVE CD/base.img');
  t.equal(inv.rows.find((r) => r.domain === 'db')?.base, 'vg0/golden', 'an origin volume as block-lvsnap reads it');
});

t.test('usage parsing from captured dmsetup status lines', async (t) => {
  const line = (n: string) =>
    fixture(n)
      .trim()
      .split('\n')
      .map((l) => l.replace(/^[^:]+: /, ''));
  t.match(parseUsage(['0 131072 snapshot 2072/8192 24'], ['0 131072 snapshot 7:0 7:1 N 128']), {
    target: 'snapshot',
    used: 2072,
    total: 8192,
    problem: undefined,
  });
  t.match(parseUsage(line('dmsetup-1.02.185-k6.1-status-snapshot-invalid.txt'), []), { problem: 'Invalid' });
  t.match(parseUsage(line('dmsetup-1.02.185-k6.1-status-snapshot-overflow.txt'), []), { problem: 'Overflow' });
  t.match(parseUsage(line('dmsetup-1.02.185-k6.1-status-thin-used.txt'), ['0 65536 thin 254:3 0 7:0']), {
    target: 'thin',
    total: 65536,
    problem: undefined,
  });
  t.match(parseUsage(line('dmsetup-1.02.185-k6.1-status-thin-pool-full.txt'), []), {
    target: 'thin-pool',
    unit: 'blocks',
    problem: 'out_of_data_space',
  });
});

t.test('status: every state from journal, xenstore and kernel', async (t) => {
  const { config, journal, run, xs } = setup(t);
  const inv = await takeInventory({ config, run, xs, journal, alive: (pid) => (pid === 999_999_999 ? false : true) });
  const byState = (s: string) => inv.rows.filter((r) => r.state === s).map((r) => r.device);
  t.same(byState('active'), ['/dev/dm-0'], 'web is active');
  t.same(byState('orphan'), ['/dev/dm-1'], 'db lost its domain and backend');
  t.same(byState('Invalid'), ['/dev/dm-2'], 'mail overflowed');
  t.same(byState('incomplete'), ['/dev/dm-3'], 'dns: an add whose process died');
  t.same(
    byState('leaked').sort(),
    ['/dev/loop7', '/dev/loop8', '/dev/mapper/xbh-cow-old-xvdb-51728'],
    'our leaked dm device, the loops under it and in the store; not vg0-root, not loop9',
  );
  const web = inv.rows.find((r) => r.domain === 'web');
  t.match(web, {
    domid: 1,
    vdev: 'xvda',
    hook: 'block-cow',
    majmin: '254:0',
    base: '/srv/xen/base.img',
    store: '/var/lib/xen-blockhooks/web.cow',
  });
  t.match(web?.usage, { used: 2072, total: 8192 });
  const text = renderStatus(inv);
  t.match(text, /^DOM\s+NAME\s+VDEV\s+HOOK\s+DEVICE\s+SIZE\s+USE%\s+STATE\n/, 'the default fields');
  t.match(text, /\n1\s+web\s+xvda\s+block-cow\s+dm-0\s+4\.0M\s+25\.3%\s+active\n/);
  t.match(
    text,
    /dm-1: orphan: domain 2 no longer exists|dm-1: orphan: backend backend\/vbd\/2\/51712 no longer exists/,
  );
  const all = renderStatus(inv, { fields: ['all'] });
  t.match(
    all,
    /^DOM\s+NAME\s+VDEV\s+HOOK\s+DEVICE\s+MAJ:MIN\s+BASE\s+STORE\s+TARGET\s+USED\s+SIZE\s+USE%\s+STATE\s+WHY\s+BACKEND\s+KIND\n/,
    '-o all: every field',
  );
  t.match(
    all,
    /\n1\s+web\s+xvda\s+block-cow\s+\/dev\/dm-0\s+254:0\s+\/srv\/xen\/base\.img\s+\/var\/lib\/xen-blockhooks\/web\.cow\s+snapshot\s+1\.0M\s+4\.0M\s+25\.3%\s+active\s+-\s+backend\/vbd\/1\/51712\s+record\n/,
  );
  const json = JSON.parse(renderStatus(inv, { json: true }));
  t.equal(json.devices.length, 7);
  t.match(
    json.devices[0],
    { domid: 1, domain: 'web', percent: 25.3, state: 'active', used: 2072 * 512, size: 8192 * 512, unit: 'bytes' },
    'JSON sizes are bytes',
  );
});

t.test('an add in progress is never collected, and nothing is judged without xenstore', async (t) => {
  const { config, journal, run } = setup(t);
  const inv = await takeInventory({ config, run, xs: undefined, journal, alive: () => true });
  t.equal(inv.rows.find((r) => r.domain === 'dns')?.state, 'adding');
  t.notOk(
    inv.rows.some((r) => r.state === 'orphan'),
    'no orphans without xenstore',
  );
  const plan = gcPlan(inv, { withoutXenstore: false });
  t.same(plan.map((p) => p.row.kind).sort(), ['dm', 'loop', 'loop'], 'only leaked kernel objects');
  const all = gcPlan(inv, { withoutXenstore: true });
  t.notOk(
    all.some((p) => p.row.domain === 'dns'),
    '--without-xenstore still leaves a running add alone',
  );
  t.equal(all.filter((p) => p.row.kind === 'record').length, 3);
});

t.test('gc: plan, then apply through the hook undoers and direct removal', async (t) => {
  const { config, journal, run, xs } = setup(t);
  const inv = await takeInventory({ config, run, xs, journal, alive: () => false });
  const plan = gcPlan(inv, { withoutXenstore: false });
  t.same(
    plan.map((p) => p.row.kind),
    ['record', 'dm', 'loop', 'loop'],
    'the orphan record, then dm before loops',
  );
  t.match(plan[0]?.action, /undo block-cow record for backend\/vbd\/2\/51712/);
  const undone: string[] = [];
  const registry: UndoRegistry = {};
  for (const k of ['base-ref', 'store-file', 'loop', 'dm'] as const)
    registry[k] = async () => {
      undone.push(k);
    };
  run.calls.length = 0;
  const results = await applyGc(plan, {
    config,
    run,
    log: memoryLogger(),
    xs,
    journal,
    hooks: (s) => (s === 'block-cow' ? { undo: registry } : undefined),
  });
  t.ok(
    results.every((r) => r.ok),
    JSON.stringify(results.filter((r) => !r.ok).map((r) => r.error)),
  );
  t.same(undone, ['dm', 'loop', 'store-file', 'base-ref'], 'the record is undone newest step first');
  t.equal(journal.load('backend/vbd/2/51712'), undefined, 'its record is gone');
  t.ok(journal.load('backend/vbd/1/51712'), 'the active record is untouched');
  const device = run.calls.filter((c) => !c.startsWith('flock'));
  t.same(
    device,
    ['dmsetup remove -- xbh-cow-old-xvdb-51728', 'losetup --detach /dev/loop7', 'losetup --detach /dev/loop8'],
    'leaked objects removed directly, dm first',
  );
});

t.test('gc: a record from an unknown hook is a named failure, the others still go', async (t) => {
  const { config, journal, run, xs } = setup(t);
  const inv = await takeInventory({ config, run, xs, journal, alive: () => false });
  const results = await applyGc(gcPlan(inv, { withoutXenstore: false }), {
    config,
    run,
    log: memoryLogger(),
    xs,
    journal,
    hooks: () => undefined,
  });
  t.same(
    results.map((r) => r.ok),
    [false, true, true, true],
  );
  t.match(results[0]?.error, /made by "block-cow", which this version does not know/);
  t.ok(journal.load('backend/vbd/2/51712'), 'the record stays for another try');
});

t.test('the commands: exit codes and output', async (t) => {
  const { config, run, xs } = setup(t);
  const out: string[] = [];
  const err: string[] = [];
  const deps = {
    config,
    run,
    connect: async () => xs,
    out: (s: string) => out.push(s),
    err: (s: string) => err.push(s),
    logger: memoryLogger(),
  };
  t.equal(await cliMain(['status', '--json'], {}, deps), 0);
  t.equal(JSON.parse(out.join('\n')).devices.length, 7);
  out.length = 0;
  t.equal(
    await cliMain(
      [
        'status',
        '-S',
        'domain=web',
        '-S',
        'hook=block-cow',
        '-o',
        'domid,state,size',
        '--units',
        'k',
        '--noheadings',
        '--separator',
        ':',
      ],
      {},
      deps,
    ),
    0,
  );
  t.same(out, ['1:active:4096.00k'], 'status: -S, -o, --units, --noheadings, --separator');
  out.length = 0;
  t.equal(await cliMain(['status', '-Sstate=orphan', '-o+why'], {}, deps), 0);
  t.match(
    out.join('\n'),
    /^DOM\s+NAME\s+VDEV\s+HOOK\s+DEVICE\s+SIZE\s+USE%\s+STATE\s+WHY\n2\s+db\s+xvda\s+block-cow\s+\/dev\/dm-1\s+4\.0M\s+0\.2%\s+orphan\s+(domain 2|backend \S+) no longer exists$/,
  );
  out.length = 0;
  t.equal(await cliMain(['gc'], {}, deps), 3, 'gc with something to collect and no --apply exits 3');
  t.match(out.join('\n'), /Plan \(4; run "xen-blockhooks gc --apply"/);
  t.equal(await cliMain(['gc', 'extra'], {}, deps), 2);
  t.match(err.pop(), /unexpected argument "extra"; run "xen-blockhooks gc --help"/);
  t.equal(await cliMain(['grow', 'web', 'xvda'], {}, deps), 2);
  t.equal(await cliMain(['grow', 'nobody', 'xvda', '+1G'], {}, deps), 1);
  t.match(err.pop(), /^xen-blockhooks grow: no device recorded for domain nobody, vdev xvda \(recorded: /);
  t.equal(await cliMain(['grow', 'web', 'xvda', 'lots'], {}, deps), 2, 'a bad size is bad usage');
  t.match(err.pop(), /"lots" is not a size/);
  t.equal(await cliMain(['simulate'], {}, deps), 2);
  t.equal(await cliMain(['simulate', '--action', 'sideways', 'x'], {}, deps), 2);
  t.equal(
    await cliMain(['simulate', 'vdev=xvda,colour=red,target=/a'], {}, deps),
    2,
    'a disk spec xl would refuse is bad usage',
  );
  t.match(err.pop(), /unknown parameter at "colour=red"/);
  t.equal(await cliMain(['nonsense'], {}, deps), 2);
  t.equal(await cliMain([], {}, deps), 2);
  for (const c of ['simulate', 'status', 'gc', 'grow', 'xenstored']) {
    out.length = 0;
    t.equal(await cliMain([c, '--help'], {}, deps), 0, `${c} --help`);
    t.match(out.join('\n'), /^Usage: xen-blockhooks /);
    t.match(out.join('\n'), /Exit status:/);
    out.length = 0;
    t.equal(await cliMain(['help', c], {}, deps), 0, `help ${c}`);
    t.match(out.join('\n'), new RegExp(`^Usage: xen-blockhooks ${c} `), `help ${c} prints ${c}'s own help`);
  }
  out.length = 0;
  t.equal(await cliMain(['--help'], {}, deps), 0);
  t.match(out.join('\n'), /Hooks known to this build: .*block-cow/);
});

t.test('gc without --apply changes nothing on the machine: no log file or directory is made', async (t) => {
  const { config, run, xs } = setup(t);
  const logDir = join(config.stateDir, '..', 'log-dir');
  const out: string[] = [];
  const code = await cliMain(
    ['gc'],
    {},
    {
      config: { ...config, logFile: join(logDir, 'xen-hotplug.log') },
      run,
      connect: async () => xs,
      out: (s) => out.push(s),
      err: () => {},
    },
  );
  t.equal(code, 3, 'a plan');
  t.notOk(existsSync(logDir), 'no log directory made');
});
