/**
 * `xen-blockhooks status` shaped like lvs: the default rows fit 80 columns (long values shortened,
 * paths keeping their tail), -o picks fields (+FIELD adds, all shows everything), -S picks rows,
 * --units sizes the table, --noheadings and --separator serve scripts, --json gives bytes.
 */
import t from 'tap';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { cliMain } from '../../src/cli/main.js';
import { defaultConfig } from '../../src/config/config.js';
import type { Runner } from '../../src/devices/runner.js';
import { makeRow, type Inventory, type Row } from '../../src/cli/inventory.js';
import { parseUsage, type KernelState } from '../../src/cli/kernel.js';
import { formatSize, renderStatus, rowJson, shorten, statusPlan } from '../../src/cli/status.js';

const MiB = 2 ** 20;

function row(over: Partial<Row>): Row {
  return makeRow({ kind: 'record', state: 'active', ...over });
}

const snap = (used: number, total: number) => ({
  target: 'snapshot',
  used,
  total,
  unit: 'sectors' as const,
  problem: undefined,
});

function inventory(rows: Row[]): Inventory {
  return { rows, xenstore: true, dmAvailable: true, unreadable: [], kernel: {} as KernelState };
}

const ROWS = [
  row({
    domid: 1,
    domain: 'web',
    vdev: 'xvda',
    hook: 'block-cow',
    device: '/dev/mapper/xbh-cow-web-xvda-51712',
    majmin: '254:0',
    base: '/var/lib/xen/images/base.img',
    store: '/var/lib/xen-blockhooks/transient-1-51712.cow',
    usage: snap(2072, 8192),
    backendPath: 'backend/vbd/1/51712',
  }),
  row({
    domid: 32001,
    domain: 'a-domain-with-a-very-long-name-indeed',
    vdev: 'xvdb12',
    hook: 'block-lvsnap',
    device: '/dev/mapper/xbh-lvsnap-a-domain-with-a-very-long-name-indeed-xvdb12-51852',
    majmin: '254:12',
    usage: snap(8192, 8192),
    state: 'out_of_data_space',
    why: 'dm status says out_of_data_space',
    backendPath: 'backend/vbd/32001/51852',
  }),
  row({
    kind: 'store',
    hook: undefined,
    store: '/var/lib/xen-blockhooks/transient-9-51712.cow',
    state: 'leaked',
    why: 'transient store file that no record, loop or nbd server uses',
  }),
  row({
    domid: 3,
    domain: 'db',
    vdev: 'xvda',
    hook: 'block-thin',
    device: '/dev/mapper/xbh-thin-db-xvda-51712',
    state: 'orphan',
    why: 'domain 3 no longer exists',
    backendPath: 'backend/vbd/3/51712',
  }),
];

const tableLines = (text: string) => text.split('\n').filter((l) => !l.startsWith('  ') && !/^(Note|Warning):/.test(l));

t.test('the default rows fit 80 columns; long values are shortened, -o shows them whole', async (t) => {
  const text = renderStatus(inventory(ROWS));
  const lines = tableLines(text);
  t.equal(lines.length, 5, 'a heading and four rows');
  for (const l of lines) t.ok(l.length <= 80, `${l.length} columns: ${l}`);
  t.match(lines[0], /^DOM\s+NAME\s+VDEV\s+HOOK\s+DEVICE\s+SIZE\s+USE%\s+STATE$/);
  t.equal(
    lines[2],
    '32001  a-dom…  xvdb12  block-lvsnap  xbh-…51852  4.0M  100.0%  out_of_data_space',
    'the widest first: a long name cut at its end, a device in its middle (its devid kept), to the 80 columns',
  );
  t.equal(lines[2]?.length, 80);
  t.equal(lines[1], '1      web     xvda    block-cow     xbh-…51712  4.0M  25.3%   active');
  const web = tableLines(renderStatus(inventory(ROWS.slice(0, 1))));
  t.same(
    web,
    [
      'DOM  NAME  VDEV  HOOK       DEVICE                  SIZE  USE%   STATE',
      '1    web   xvda  block-cow  xbh-cow-web-xvda-51712  4.0M  25.3%  active',
    ],
    'what fits is not cut; devices named without /dev/mapper/, as lvs does',
  );
  t.match(lines[3], /^-\s+-\s+-\s+-\s+-\s+-\s+-\s+leaked$/);
  t.match(
    text,
    /\n {2}\/var\/lib\/xen-blockhooks\/transient-9-51712\.cow: leaked: transient store file/,
    'the note after the table names the whole object',
  );
  t.match(text, /\n {2}\/dev\/mapper\/xbh-thin-db-xvda-51712: orphan: domain 3 no longer exists/);
  const all = renderStatus(inventory(ROWS), { fields: ['all'] });
  t.match(
    all,
    /a-domain-with-a-very-long-name-indeed\s+xvdb12\s+block-lvsnap\s+\/dev\/mapper\/xbh-lvsnap-a-domain-with-a-very-long-name-indeed-xvdb12-51852\s/,
    '-o all: whole values',
  );
  t.notMatch(all, /…/);
  t.notMatch(all, /\n {2}\//, 'with the why field shown, no notes after the table');
});

t.test('-o: a list, +FIELD to add to the default, aliases, repeated -o joined', async (t) => {
  const inv = inventory(ROWS.slice(0, 1));
  t.equal(renderStatus(inv, { fields: ['domid,state'] }), 'DOM  STATE\n1    active');
  t.equal(
    renderStatus(inv, { fields: ['name', 'backend'] }),
    'NAME  BACKEND\nweb   backend/vbd/1/51712',
    'name and backend are aliases; a second -o adds',
  );
  t.match(
    renderStatus(inv, { fields: ['+why,store'] }),
    /^DOM\s+NAME\s+VDEV\s+HOOK\s+DEVICE\s+SIZE\s+USE%\s+STATE\s+WHY\s+STORE\n/,
  );
  t.match(
    renderStatus(inv, { fields: ['+majmin'] }),
    /\/dev\/mapper\/xbh-cow-web-xvda-51712/,
    'with -o the device is shown whole',
  );
  t.throws(() => statusPlan({ fields: ['domid,colour'] }), {
    message:
      /^unknown field "colour" \(domid, domain, vdev, hook, device, majmin, base, store, target, used, size, percent, state, why, backendPath, kind\)$/,
  });
  t.throws(() => statusPlan({ fields: ['domid,'] }), { message: '-o "domid,": an empty field name' });
});

t.test('--units, --noheadings, --separator', async (t) => {
  const inv = inventory(ROWS.slice(0, 1));
  const o = { fields: ['used,size'] };
  t.equal(renderStatus(inv, { ...o, noHeadings: true }), '1.0M  4.0M', 'h: human, the default');
  t.equal(renderStatus(inv, { ...o, noHeadings: true, units: 'b' }), `${2072 * 512}B  ${4 * MiB}B`);
  t.equal(renderStatus(inv, { ...o, noHeadings: true, units: 's' }), '2072S  8192S');
  t.equal(renderStatus(inv, { ...o, noHeadings: true, units: 'k' }), '1036.00k  4096.00k');
  t.equal(renderStatus(inv, { ...o, noHeadings: true, units: 'm' }), '1.01m  4.00m');
  t.equal(formatSize(3 * 2 ** 40, 't'), '3.00t');
  t.equal(formatSize(3 * 2 ** 30, 'g'), '3.00g');
  t.throws(() => statusPlan({ units: 'x' }), { message: '--units must be one of h, b, s, k, m, g, t, not "x"' });
  t.equal(renderStatus(inv, { fields: ['domid,domain,state'], separator: ':' }), 'DOM:NAME:STATE\n1:web:active');
  t.equal(
    renderStatus(inventory(ROWS), { fields: ['domid,state'], separator: '|', noHeadings: true }),
    '1|active\n32001|out_of_data_space\n-|leaked\n3|orphan',
    'no heading, no notes: only rows',
  );
  t.equal(renderStatus(inventory([]), { noHeadings: true }), '', 'nothing at all when there is nothing');
  t.throws(() => statusPlan({ json: true, units: 'b' }), /--json gives sizes in bytes/);
});

t.test('-S: rows by domain, hook, state, percent; conditions all hold', async (t) => {
  const inv = inventory(ROWS);
  const pick = (...select: string[]) =>
    renderStatus(inv, { fields: ['domid'], select, noHeadings: true, separator: ',' })
      .split('\n')
      .filter(Boolean);
  t.same(pick('domain=web'), ['1']);
  t.same(pick('name=WEB'), ['1'], 'values compare without regard to case');
  t.same(pick('hook=block-thin'), ['3']);
  t.same(pick('state=leaked'), ['-']);
  t.same(pick('state!=active'), ['32001', '-', '3']);
  t.same(pick('percent>=80'), ['32001']);
  t.same(pick('percent<80'), ['1'], 'a row without usage is not below anything');
  t.same(pick('domid>1,state!=orphan'), ['32001'], 'comma: and');
  t.same(pick('domid>1 && state!=orphan'), ['32001'], '&&: and');
  t.same(pick('domid>1', 'hook=block-thin'), ['3'], 'several -S: and');
  t.same(pick('domain='), ['-'], 'an empty value selects rows without one');
  t.equal(renderStatus(inv, { select: ['domain=nobody'] }), 'No device matches -S "domain=nobody".');
  t.throws(() => statusPlan({ select: ['state'] }), {
    message: '-S "state": "state" is not FIELD=VALUE, FIELD!=VALUE or FIELD<NUMBER (<, <=, >, >=)',
  });
  t.throws(() => statusPlan({ select: ['hook>2'] }), {
    message: '-S "hook>2": > compares numbers, and hook is not one (domid, used, size, percent are)',
  });
  t.throws(() => statusPlan({ select: ['percent>lots'] }), {
    message: '-S "percent>lots": percent> needs a number, not "lots"',
  });
  t.throws(() => statusPlan({ select: ['colour=red'] }), /^unknown field "colour"/);
  const json = JSON.parse(renderStatus(inv, { json: true, select: ['hook=block-cow'], fields: ['domain,used,size'] }));
  t.same(
    json.devices,
    [{ domain: 'web', used: 2072 * 512, size: 4 * MiB }],
    '--json with -S and -o: those rows, those fields',
  );
});

t.test('JSON sizes are bytes, thin-pool blocks included', async (t) => {
  t.match(rowJson(ROWS[0] as Row), { used: 2072 * 512, size: 8192 * 512, unit: 'bytes', percent: 25.3 });
  const pool = parseUsage(
    ['0 8192 thin-pool 0 112/1024 16/64 - rw discard_passdown error_if_no_space - 256'],
    ['0 8192 thin-pool 7:3 7:4 128 0 1 error_if_no_space'],
  );
  t.match(pool, { unit: 'blocks', used: 16, total: 64, blockSectors: 128 });
  t.match(rowJson(row({ usage: pool })), { used: 16 * 128 * 512, size: 4 * MiB, percent: 25, unit: 'bytes' });
  t.match(rowJson(row({})), { used: null, size: null, unit: null });
});

t.test('shorten', async (t) => {
  t.equal(shorten('abcdef', 6, 'end'), 'abcdef');
  t.equal(shorten('abcdefgh', 6, 'end'), 'abcde…');
  t.equal(shorten('abcdefgh', 6, 'middle'), 'ab…fgh');
});

t.test('--noheadings: only rows on stdout; an unreadable record is still said, on stderr', async (t) => {
  const dir = t.testdir({});
  mkdirSync(join(dir, 'journal'), { recursive: true });
  writeFileSync(join(dir, 'journal', 'backend~vbd~3~51712.json'), '{ broken');
  const config = { ...defaultConfig(), stateDir: dir, storeDir: join(dir, 'stores'), logFile: '' };
  const answer = async (f: string, a: readonly string[]) => ({
    command: [f, ...a].join(' '),
    exitCode: 0,
    signal: undefined,
    stdout: '',
    stderr: '',
    durationMs: 1,
    failed: false,
    timedOut: false,
  });
  const run: Runner = { run: answer, probe: answer };
  const out: string[] = [];
  const err: string[] = [];
  const deps = {
    config,
    run,
    isRoot: true,
    connect: async () => {
      throw new Error('no xenstore');
    },
    out: (s: string) => out.push(s),
    err: (s: string) => err.push(s),
  };
  t.equal(await cliMain(['status', '--noheadings'], {}, deps), 0);
  t.same(out, [], 'no rows, no notes');
  t.match(err, [/^xen-blockhooks status: warning: unreadable record .*backend~vbd~3~51712\.json: /]);
  err.length = 0;
  t.equal(await cliMain(['status'], {}, deps), 0);
  t.match(out.join('\n'), /Warning: unreadable record/, 'with headings it is in the output, as before');
  t.same(err, []);
});
