/**
 * A user who is not root gets "must run as root (…: permission denied)", not Node's EACCES line:
 * the command is bundled from the sources (esbuild) and run as `nobody` with setpriv, against a
 * state directory of mode 0700 or 000 owned by root, as /run/xen-blockhooks is. The translation
 * itself (EPERM, a tool's refusal, root refused) is checked in this process.
 */
import t from 'tap';
import { spawnSync } from 'node:child_process';
import { chmodSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { build } from 'esbuild';
import { CommandError } from '../../src/devices/runner.js';
import { deniedInText, permissionSentence } from '../../src/cli/permission.js';
import { cliMain } from '../../src/cli/main.js';
import { defaultConfig } from '../../src/config/config.js';
import { Journal } from '../../src/journal/journal.js';

const ROOT = join(import.meta.dirname, '../..');
const SETPRIV = ['/usr/bin/setpriv', '/bin/setpriv'].find((p) => spawnSync(p, ['--version']).status === 0);
const asRoot = process.geteuid?.() === 0;

t.test(
  'as nobody: the commands that read the state directory say they need root',
  { skip: !asRoot || !SETPRIV ? 'needs root and setpriv to become nobody' : false },
  async (t) => {
    const top = mkdtempSync(join(tmpdir(), 'xbh-perm-'));
    t.teardown(() => rmSync(top, { recursive: true, force: true }));
    chmodSync(top, 0o755);
    const cli = join(top, 'xen-blockhooks.cjs');
    await build({
      entryPoints: [join(ROOT, 'src/bin/xen-blockhooks.ts')],
      outfile: cli,
      bundle: true,
      platform: 'node',
      format: 'cjs',
      logLevel: 'error',
      define: { 'import.meta.url': '__xbhModuleUrl', __XEN_BLOCKHOOKS_VERSION__: '"test"' },
      banner: { js: 'var __xbhModuleUrl = require("node:url").pathToFileURL(__filename).href;' },
    });
    const state = join(top, 'state');
    mkdirSync(join(state, 'journal'), { recursive: true });
    const logDir = join(top, 'log');
    mkdirSync(logDir, { mode: 0o700 });
    const asNobody = (args: string[]) => {
      const r = spawnSync(
        SETPRIV as string,
        [
          '--reuid=nobody',
          '--regid=nogroup',
          '--clear-groups',
          '--',
          '/usr/bin/env',
          '-u',
          'NODE_OPTIONS',
          process.execPath,
          cli,
          ...args,
        ],
        {
          encoding: 'utf8',
          env: {
            PATH: process.env.PATH,
            XEN_BLOCKHOOKS_CONF: join(top, 'none.conf'),
            XEN_BLOCKHOOKS_STATE_DIR: state,
            XEN_BLOCKHOOKS_STORE_DIR: join(top, 'store'),
            XEN_BLOCKHOOKS_LOG_FILE: join(logDir, 'xen-hotplug.log'),
            XENSTORED_PATH: join(top, 'no-socket'),
          },
        },
      );
      return { code: r.status, out: r.stdout, err: r.stderr };
    };
    t.equal(asNobody(['version']).code, 0, 'nobody can run the bundle');

    for (const mode of [0o700, 0o000]) {
      chmodSync(state, mode);
      const m = mode.toString(8).padStart(3, '0');
      const denied = (what: string) => `must run as root (${what}: permission denied)`;
      const journal = denied(`scandir ${state}/journal`);
      for (const args of [['status'], ['status', '--json'], ['gc'], ['gc', '--apply'], ['grow', '1', 'xvda', '+1G']]) {
        const r = asNobody(args);
        t.same(
          r,
          { code: 1, out: '', err: `xen-blockhooks ${args[0]}: ${journal}\n` },
          `${args.join(' ')}, state directory ${m}`,
        );
      }
      t.same(
        asNobody(['watch', '--once']),
        { code: 1, out: '', err: `xen-blockhooks watch: ${denied(`mkdir ${state}/locks`)}\n` },
        `watch --once, state directory ${m}`,
      );
    }

    // The directories can be read, the records cannot (0600, as the hooks write them).
    chmodSync(state, 0o755);
    chmodSync(join(state, 'journal'), 0o755);
    const j = new Journal(state);
    const e = Journal.begin('block-cow', 'backend/vbd/9/51712', {
      params: '/srv/xen/a.img',
      mode: 'w',
      frontendId: 9,
      vdev: 'xvda',
      domainName: 'gone',
    });
    j.save({
      ...e,
      phase: 'ready',
      pid: 999_999_999,
      steps: [{ kind: 'store-file', data: { path: join(top, 'store', 'gone.cow'), persistent: false }, done: true }],
    });
    const record = j.file('backend/vbd/9/51712');
    chmodSync(record, 0o600);
    for (const args of [['status'], ['gc'], ['gc', '--apply', '--without-xenstore']]) {
      t.same(
        asNobody(args),
        { code: 1, out: '', err: `xen-blockhooks ${args[0]}: must run as root (open ${record}: permission denied)\n` },
        `${args.join(' ')}: a record nobody may read`,
      );
    }

    // gc --apply where the record can be read but nothing changed: the removal fails, the summary says root.
    chmodSync(record, 0o644);
    const r = asNobody(['gc', '--apply', '--without-xenstore']);
    t.equal(r.code, 1, r.err);
    const locks = `mkdir ${state}/locks: permission denied`;
    t.same(
      r.out,
      `FAILED: undo block-cow record for backend/vbd/9/51712: xenstore is down (--without-xenstore): ${locks}\n`,
    );
    t.equal(r.err.split('\n').at(-2), `xen-blockhooks gc: --apply must run as root (${locks}; 1 of 1 removal failed)`);
    t.notMatch(r.err, /Unhandled|node:events/, 'a log file nobody may write is no crash');
  },
);

t.test('the sentence: EACCES and EPERM of the file system, a tool that refused, root itself refused', async (t) => {
  const fsErr = (code: string, syscall: string, path: string) =>
    Object.assign(new Error(`${code}: x, ${syscall} '${path}'`), { code, syscall, path });
  t.equal(
    permissionSentence(fsErr('EACCES', 'scandir', '/run/xen-blockhooks/journal'), false),
    'must run as root (scandir /run/xen-blockhooks/journal: permission denied)',
  );
  t.equal(
    permissionSentence(fsErr('EPERM', 'open', '/dev/mapper/control'), false),
    'must run as root (open /dev/mapper/control: operation not permitted)',
  );
  t.equal(
    permissionSentence(fsErr('EACCES', 'open', '/var/lib/xen-blockhooks/a.cow'), true),
    'open /var/lib/xen-blockhooks/a.cow: permission denied, although this runs as root',
  );
  t.equal(permissionSentence(fsErr('ENOENT', 'open', '/x'), false), undefined, 'other errors are left alone');
  const tool = new CommandError({
    command: 'dmsetup remove xbh-cow-a',
    exitCode: 1,
    signal: undefined,
    stdout: '',
    stderr:
      '/dev/mapper/control: open failed: Permission denied\nFailure to communicate with kernel device-mapper driver.\n',
    durationMs: 1,
    failed: true,
    timedOut: false,
  });
  t.equal(permissionSentence(tool, false), 'must run as root (dmsetup remove xbh-cow-a: permission denied)');
  const other = new CommandError({
    command: 'dmsetup remove xbh-cow-a',
    exitCode: 1,
    signal: undefined,
    stdout: '',
    stderr: 'Device or resource busy\n',
    durationMs: 1,
    failed: true,
    timedOut: false,
  });
  t.equal(permissionSentence(other, false), undefined);
});

t.test('a failure already turned into text', async (t) => {
  t.same(deniedInText("undo x: EACCES: permission denied, mkdir '/run/xbh/locks'"), {
    denied: 'mkdir /run/xbh/locks: permission denied',
    text: 'undo x: mkdir /run/xbh/locks: permission denied',
  });
  t.same(deniedInText("EPERM: operation not permitted, rename '/a' -> '/b'"), {
    denied: 'rename /a → /b: operation not permitted',
    text: 'rename /a → /b: operation not permitted',
  });
  const tool = 'dmsetup remove xbh-a failed: /dev/mapper/control: open failed: Permission denied';
  t.same(deniedInText(tool), { denied: tool, text: tool }, "a tool's own words are kept");
  t.equal(deniedInText('dmsetup remove x: Device or resource busy'), undefined);
});

t.test("in this process: the sentence reaches stderr once, through the command's failure line", async (t) => {
  const dir = t.testdir({});
  const err: string[] = [];
  const denied = Object.assign(new Error("EACCES: permission denied, open '/run/xen-blockhooks/journal/x.json'"), {
    code: 'EACCES',
    syscall: 'open',
    path: '/run/xen-blockhooks/journal/x.json',
  });
  const run = {
    run: async () => {
      throw denied;
    },
    probe: async () => {
      throw denied;
    },
  };
  const config = { ...defaultConfig(), stateDir: join(dir, 'state'), logFile: '' };
  writeFileSync(join(dir, 'base.img'), '');
  const code = await cliMain(
    ['status'],
    {},
    {
      config,
      run,
      connect: async () => {
        throw new Error('no xenstore');
      },
      out: () => {},
      err: (s) => err.push(s),
      isRoot: false,
    },
  );
  t.equal(code, 1);
  t.same(err, ['xen-blockhooks status: must run as root (open /run/xen-blockhooks/journal/x.json: permission denied)']);
});
