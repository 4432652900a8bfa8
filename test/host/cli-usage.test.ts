/**
 * Every command's bad usage exits 2 with one sentence naming what is wrong (the option, the
 * argument) and where the help is; nothing runs. A survey of each command's options and arguments.
 * The arguments are checked before the configuration is read: with a configuration file that does
 * not load, bad usage still exits 2, and only a well-formed command reports the file (exit 1).
 */
import t from 'tap';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { cliMain } from '../../src/cli/main.js';
import { defaultConfig } from '../../src/config/config.js';
import type { Runner } from '../../src/devices/runner.js';

const CASES: [string[], string][] = [
  // grow: DOMAIN VDEV SIZE
  [
    ['grow', '1', 'xvda', '64X'],
    '"64X" is not a size: a number with an optional unit K, M, G or T (e.g. 512M, 1.5G, 2T); a bare number is MiB; a + in front adds it to the current size (+512M)',
  ],
  [['grow', '1', 'xvda', '+0'], '"+0" must be more than zero'],
  [
    ['grow', '1', 'xvda', '-1G'],
    '"-1G" is not a size: a number with an optional unit K, M, G or T (e.g. 512M, 1.5G, 2T); a bare number is MiB; a + in front adds it to the current size (+512M)',
  ],
  [
    ['grow', '1', 'xvda', '1.5.5G'],
    '"1.5.5G" is not a size: a number with an optional unit K, M, G or T (e.g. 512M, 1.5G, 2T); a bare number is MiB; a + in front adds it to the current size (+512M)',
  ],
  [
    ['grow', '1', 'vda', '+1G'],
    'vdev "vda" is not a disk name libxl understands (xvda, xvdb1, hda, sda1, d0p1 or a number)',
  ],
  [['grow', '1', 'xvda'], 'expected DOMAIN VDEV SIZE, e.g. "grow web xvda +1G"'],
  [['grow', '1', 'xvda', '+1G', '--metadata=yes'], 'option --metadata takes no value'],
  // simulate
  [['simulate', '--timeout', '0', 'x'], 'option --timeout must be at least 1 second, not 0'],
  [['simulate', '--timeout', '-5', 'x'], 'option --timeout needs a whole number, not "-5"'],
  [['simulate', '--timeout', 'soon', 'x'], 'option --timeout needs a whole number, not "soon"'],
  [['simulate', '--timeout=3601', 'x'], 'option --timeout must be at most 3600 seconds, not 3601'],
  [['simulate', '--timeout'], 'option --timeout needs a value'],
  [['simulate', '--domid', '0', 'x'], '--domid 0 is dom0 itself; give the guest a domain id of 1 or more'],
  [['simulate', '--domid', '32752', 'x'], 'option --domid must be at most 32751, not 32752'],
  [['simulate', '--domid', '1.5', 'x'], 'option --domid needs a whole number, not "1.5"'],
  [['simulate', '--name', '', 'x'], 'option --name needs a value, not an empty string'],
  [['simulate', '--script-dir=', 'x'], 'option --script-dir needs a value, not an empty string'],
  [['simulate', '--action', 'sideways', 'x'], '--action must be add or remove, not "sideways"'],
  [['simulate', '--action', 'remove', '--keep', 'x'], '--keep makes no sense with --action remove'],
  [['simulate', '--xl', '--xm', 'x'], '--xl and --xm exclude each other'],
  [['simulate'], 'no disk spec given'],
  [
    ['simulate', 'vdev=xvda,colour=red,target=/a'],
    'disk spec "vdev=xvda,colour=red,target=/a": unknown parameter at "colour=red"',
  ],
  [
    ['simulate', 'vdev=xvdA,target=/a'],
    'vdev "xvdA" is not a disk name libxl understands (xvda, xvdb1, hda, sda1, d0p1 or a number)',
  ],
  [
    ['simulate', '--xm', 'cow:/a,xvda'],
    'disk spec "cow:/a,xvda": xm syntax is "<type>:<params>,<dev>,<mode>" (found 2 comma-separated fields)',
  ],
  // watch
  [['watch', '--interval', '0'], 'option --interval must be at least 100 ms, not 0'],
  [['watch', '--interval', '99'], 'option --interval must be at least 100 ms, not 99'],
  [['watch', '--interval', '86400001'], 'option --interval must be at most 86400000 ms, not 86400001'],
  [['watch', 'now'], 'unexpected argument "now"'],
  // status, gc, check, xenstored
  [['status', '--jsn'], 'unknown option --jsn'],
  [['status', 'all'], 'unexpected argument "all"'],
  [
    ['status', '-o', 'domid,colour'],
    'unknown field "colour" (domid, domain, vdev, hook, device, majmin, base, store, target, used, size, percent, state, why, backendPath, kind)',
  ],
  [['status', '--units', 'q'], '--units must be one of h, b, s, k, m, g, t, not "q"'],
  [['status', '-S', 'state'], '-S "state": "state" is not FIELD=VALUE, FIELD!=VALUE or FIELD<NUMBER (<, <=, >, >=)'],
  [
    ['status', '--json', '--noheadings'],
    '--units, --noheadings and --separator shape the table; --json gives sizes in bytes and has no headings',
  ],
  [['status', '--separator'], 'option --separator needs a value'],
  [['gc', '--apply', 'now'], 'unexpected argument "now"'],
  [['gc', '-x'], 'unknown option -x'],
  [['check', '--root'], 'option --root needs a value'],
  [['check', '--root', 'stage'], '--root needs an absolute path, not "stage"'],
  [['xenstored'], '--socket PATH is required'],
  [['xenstored', '--socket', ''], 'option --socket needs a value, not an empty string'],
  [['xenstored', '--socket', '/tmp/s', 'extra'], 'unexpected argument "extra"'],
  // open, close: DOMAIN VDEV | IMAGE
  [['open'], 'expected DOMAIN VDEV or IMAGE, not 0 arguments'],
  [['open', 'web', 'xvda', 'extra'], 'expected DOMAIN VDEV or IMAGE, not 3 arguments'],
  [
    ['open', 'web', 'vda'],
    'vdev "vda" is not a disk name libxl understands (xvda, xvdb1, hda, sda1, d0p1 or a number)',
  ],
  [['open', '/srv/a.img', '--rw=yes'], 'option --rw takes no value'],
  [['open', '/srv/a.img', '--ro'], 'unknown option --ro'],
  [['close'], 'expected DOMAIN VDEV or IMAGE, not 0 arguments'],
  [['close', '/srv/a.img', '--rw'], 'unknown option --rw'],
];

t.test('bad usage: exit 2, the exact sentence, and nothing run', async (t) => {
  const calls: string[] = [];
  const run: Runner = {
    run: async (f, a) => {
      calls.push([f, ...a].join(' '));
      throw new Error('nothing may run');
    },
    probe: async (f, a) => {
      calls.push([f, ...a].join(' '));
      throw new Error('nothing may run');
    },
  };
  const config = { ...defaultConfig(), stateDir: '/nonexistent/state', logFile: '' };
  for (const [argv, message] of CASES) {
    const out: string[] = [];
    const err: string[] = [];
    const code = await cliMain(
      argv,
      {},
      {
        config,
        run,
        connect: async () => {
          throw new Error('no xenstore');
        },
        out: (s) => out.push(s),
        err: (s) => err.push(s),
      },
    );
    t.same(
      { code, out, err },
      {
        code: 2,
        out: [],
        err: [`xen-blockhooks ${argv[0]}: ${message}; run "xen-blockhooks ${argv[0]} --help" for usage`],
      },
      argv.join(' '),
    );
  }
  t.same(calls, [], 'no command was run');
});

t.test('with a broken configuration file: bad usage still exits 2; good usage reports the file, exit 1', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'xbh-usage-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const conf = join(dir, 'blockhooks.conf');
  writeFileSync(conf, 'store-dir = /var/lib/xen-blockhooks\n');
  const env = { XEN_BLOCKHOOKS_CONF: conf, XEN_BLOCKHOOKS_STATE_DIR: join(dir, 'state'), XEN_BLOCKHOOKS_LOG_FILE: '' };
  const calls: string[] = [];
  const run: Runner = {
    run: async (f, a) => {
      calls.push([f, ...a].join(' '));
      throw new Error('nothing may run');
    },
    probe: async (f, a) => {
      calls.push([f, ...a].join(' '));
      throw new Error('nothing may run');
    },
  };
  const cli = async (argv: string[]) => {
    const out: string[] = [];
    const err: string[] = [];
    const code = await cliMain(argv, env, {
      run,
      connect: async () => {
        throw new Error('no xenstore');
      },
      out: (s) => out.push(s),
      err: (s) => err.push(s),
    });
    return { code, out, err };
  };
  for (const [argv, message] of CASES.filter(([a]) => a[0] !== 'check')) {
    t.same(
      await cli(argv),
      {
        code: 2,
        out: [],
        err: [`xen-blockhooks ${argv[0]}: ${message}; run "xen-blockhooks ${argv[0]} --help" for usage`],
      },
      argv.join(' '),
    );
  }
  const broken = `xen-blockhooks: configuration error: ${conf}:1: unknown key \`store-dir\`; did you mean \`store_dir\`?`;
  for (const argv of [
    ['grow', '1', 'xvda', '+1G'],
    ['resize', '1', 'xvda', '2G'],
    ['status'],
    ['gc'],
    ['watch', '--once'],
    ['open', 'web', 'xvda'],
    ['close', 'web', 'xvda'],
    ['simulate', 'vdev=xvda,target=/srv/xen/base.img'],
  ])
    t.same(await cli(argv), { code: 1, out: [], err: [broken] }, `${argv.join(' ')}: the configuration is reported`);
  t.same(calls, [], 'no command was run');
});

t.test('without a command, or an unknown one', async (t) => {
  const err: string[] = [];
  const deps = { out: () => {}, err: (s: string) => err.push(s) };
  t.equal(await cliMain([], {}, deps), 2);
  t.equal(await cliMain(['frobnicate'], {}, deps), 2);
  t.equal(await cliMain(['help', 'frobnicate'], {}, deps), 2);
  t.same(err, [
    'xen-blockhooks: no command given; run "xen-blockhooks --help" for usage',
    'xen-blockhooks: unknown command "frobnicate" (simulate, status, gc, grow, resize, watch, serve, xenstored, check, open, close, version); run "xen-blockhooks --help" for usage',
    'xen-blockhooks: unknown command "frobnicate" (simulate, status, gc, grow, resize, watch, serve, xenstored, check, open, close, version); run "xen-blockhooks --help" for usage',
  ]);
});
