/**
 * Debian's own xenstore clients (xenstore-utils, libxenstore) against our server, pointed at it
 * with XENSTORED_PATH: what they print and how they exit must be what they do with xenstored.
 */
import t from 'tap';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { execFile, spawn } from 'node:child_process';
import { connectXenstore } from '../../src/xenstore/client.js';
import { startXenstoreServer } from '../../src/xenstore/server.js';
import { opName } from '../../src/xenstore/wire.js';

const TOOLS = ['read', 'write', 'rm', 'exists', 'list', 'ls', 'watch'] as const;

function findTool(name: string): string | undefined {
  for (const d of (process.env['PATH'] ?? '/usr/bin:/bin').split(':').concat(['/usr/bin', '/usr/sbin'])) {
    const p = path.join(d, `xenstore-${name}`);
    try {
      fs.accessSync(p, fs.constants.X_OK);
      return p;
    } catch {
      /* next */
    }
  }
  return undefined;
}

const found = Object.fromEntries(TOOLS.map((n) => [n, findTool(n)])) as Record<
  (typeof TOOLS)[number],
  string | undefined
>;
const missing = TOOLS.filter((n) => !found[n]);

if (missing.length > 0) {
  t.fail(
    `xenstore-${missing.join(', xenstore-')} not found: these tests need Debian's xenstore clients; run: apt-get install xenstore-utils`,
  );
} else {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'xbh-xscli-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const requests: string[] = [];
  let onRequest: ((op: string, args: string[]) => void) | undefined;
  const server = await startXenstoreServer({
    socketPath: path.join(dir, 'socket'),
    onRequest: (op, args) => {
      requests.push(opName(op));
      onRequest?.(opName(op), args);
    },
  });
  t.teardown(() => server.close());
  const client = await connectXenstore({ path: server.socketPath });
  t.teardown(() => client.close());
  const env = { PATH: process.env['PATH'] ?? '/usr/bin:/bin', XENSTORED_PATH: server.socketPath, LANG: 'C' };

  const run = (tool: (typeof TOOLS)[number], ...args: string[]) =>
    new Promise<{ code: number | null; stdout: string; stderr: string }>((resolve) => {
      execFile(found[tool]!, args, { env, timeout: 10_000 }, (err, stdout, stderr) => {
        const code = err ? (typeof err.code === 'number' ? err.code : null) : 0;
        resolve({ code, stdout, stderr });
      });
    });

  t.test('xenstore-write, then our client reads', async (t) => {
    t.same(await run('write', '/cli/w/a', 'phy:/dev/vg0/disk one,xvda,w'), { code: 0, stdout: '', stderr: '' });
    t.equal(await client.read('/cli/w/a'), 'phy:/dev/vg0/disk one,xvda,w');
    await run('write', '/cli/w/u', '/images/ün ïcode.img 30');
    t.equal(await client.read('/cli/w/u'), '/images/ün ïcode.img 30', 'UTF-8 arguments pass as bytes');
    await run('write', '/cli/w/esc', 'a\\tb\\nc\\\\d\\x41');
    t.equal(await client.read('/cli/w/esc'), 'a\tb\nc\\dA', 'backslash escapes decoded');
    await run('write', '-R', '/cli/w/raw', 'a\\tb');
    t.equal(await client.read('/cli/w/raw'), 'a\\tb', '-R writes raw');
    await run('write', '/cli/w/empty', '');
    t.equal(await client.read('/cli/w/empty'), '');
  });

  t.test('our client writes, then xenstore-read reads', async (t) => {
    await client.write('/cli/r/plain', 'hello world: 1');
    t.same(await run('read', '/cli/r/plain'), { code: 0, stdout: 'hello world: 1\n', stderr: '' });
    await client.write('/cli/r/utf8', 'ün\tx\n');
    t.equal((await run('read', '/cli/r/utf8')).stdout, '\\xc3\\xbcn\\tx\\n\n', 'non-printables escaped');
    t.equal((await run('read', '-R', '/cli/r/utf8')).stdout, 'ün\tx\n', '-R prints raw, no newline');
    await client.write('/cli/r/b', 'second');
    t.same(await run('read', '/cli/r/plain', '/cli/r/b'), { code: 0, stdout: 'hello world: 1\nsecond\n', stderr: '' });
    t.equal((await run('read', '-p', '/cli/r/b')).stdout, '/cli/r/b: second\n');
  });

  t.test('xenstore-read of a missing key: exit 1, "couldn\'t read path"', async (t) => {
    t.same(await run('read', '/cli/none'), {
      code: 1,
      stdout: '',
      stderr: "xenstore-read: couldn't read path /cli/none\n",
    });
    await client.write('/cli/r2/x', '1');
    const r = await run('read', '/cli/r2/x', '/cli/r2/none');
    // the keys before the failing one are still printed (the tool flushes its buffer on exit)
    t.same(r, { code: 1, stdout: '1\n', stderr: "xenstore-read: couldn't read path /cli/r2/none\n" });
  });

  t.test('xenstore-write with several pairs: one transaction', async (t) => {
    requests.length = 0;
    t.same(await run('write', '/cli/m/a', '1', '/cli/m/b', '2', '/cli/m/c', '3'), { code: 0, stdout: '', stderr: '' });
    t.same(requests, ['TRANSACTION_START', 'WRITE', 'WRITE', 'WRITE', 'TRANSACTION_END']);
    t.same(await Promise.all(['a', 'b', 'c'].map((k) => client.read(`/cli/m/${k}`))), ['1', '2', '3']);
    t.equal((await run('write', '/cli/m/a', '1', '/cli/m/b')).code, 1, 'odd argument count is a usage error');
  });

  t.test('xenstore-write retries silently when the commit meets EAGAIN', async (t) => {
    await client.write('/cli/c/a', 'old');
    let interfered = false;
    onRequest = (op, args) => {
      if (op === 'WRITE' && args[0] === '/cli/c/a' && !interfered) {
        interfered = true;
        server.store.write('/cli/c/a', 'from elsewhere');
      }
    };
    requests.length = 0;
    const r = await run('write', '/cli/c/a', 'new', '/cli/c/b', 'new');
    onRequest = undefined;
    t.same(r, { code: 0, stdout: '', stderr: '' });
    t.equal(requests.filter((op) => op === 'TRANSACTION_START').length, 2, 'the tool ran the transaction again');
    t.equal(await client.read('/cli/c/a'), 'new');
    t.equal(await client.read('/cli/c/b'), 'new');
  });

  t.test('xenstore-rm', async (t) => {
    await client.write('/cli/rm/t/x/y', '1');
    t.same(await run('rm', '/cli/rm/t'), { code: 0, stdout: '', stderr: '' });
    t.equal(await client.tryRead('/cli/rm/t/x/y'), undefined, 'recursive');
    t.same(await run('rm', '/cli/rm/never'), { code: 0, stdout: '', stderr: '' }, 'missing node whose parent exists');
    t.same(
      await run('rm', '/cli/rm/gone/never'),
      { code: 1, stdout: '', stderr: 'xenstore-rm: could not remove path /cli/rm/gone/never\n' },
      'parent missing too',
    );
    await client.write('/cli/rm/tidy/a/b', '');
    t.same(await run('rm', '-t', '/cli/rm/tidy/a/b'), { code: 0, stdout: '', stderr: '' });
    t.equal(await client.tryRead('/cli/rm/tidy'), undefined, '-t removes empty valueless parents');
    t.equal(await client.tryRead('/cli/rm'), undefined, 'all the way up');
    t.ok((await client.directory('/cli')).length > 0, 'stopping at the first parent with children left');
  });

  t.test('xenstore-exists exit codes', async (t) => {
    await client.write('/cli/e/yes', '');
    t.same(await run('exists', '/cli/e/yes'), { code: 0, stdout: '', stderr: '' });
    t.same(await run('exists', '/cli/e/no'), { code: 1, stdout: '', stderr: '' });
    t.same(await run('exists', '/cli/nothing/no'), { code: 1, stdout: '', stderr: '' });
  });

  t.test('xenstore-list and xenstore-ls on a small tree', async (t) => {
    await client.write('/cli/ls/vm/name', 'guest one');
    await client.write('/cli/ls/vm/disk/params', '/images/ün ïcode.img');
    await client.write('/cli/ls/vm/disk/mode', 'w');
    await client.mkdir('/cli/ls/empty');
    t.same(await run('list', '/cli/ls/vm'), { code: 0, stdout: 'name\ndisk\n', stderr: '' });
    t.equal((await run('list', '-p', '/cli/ls/vm')).stdout, '/cli/ls/vm/name\n/cli/ls/vm/disk\n');
    t.same(await run('list', '/cli/ls/none'), {
      code: 1,
      stdout: '',
      stderr: 'xenstore-list: could not list path /cli/ls/none\n',
    });
    t.same(await run('ls', '/cli/ls'), {
      code: 0,
      stdout: [
        'vm = ""',
        ' name = "guest one"',
        ' disk = ""',
        '  params = "/images/\\xc3\\xbcn \\xc3\\xafcode.img"',
        '  mode = "w"',
        'empty = ""',
        '',
      ].join('\n'),
      stderr: '',
    });
    t.equal(
      (await run('ls', '-f', '/cli/ls/vm/disk')).stdout,
      '/cli/ls/vm/disk/params = "/images/\\xc3\\xbcn \\xc3\\xafcode.img"\n/cli/ls/vm/disk/mode = "w"\n',
    );
    const withPerms = await run('ls', '-p', '/cli/ls/vm/disk');
    t.match(withPerms.stdout, /^mode = "w" [ .]+\(n0\)\n$/m, '-p shows permissions from GET_PERMS');
    const none = await run('ls', '/cli/ls/none');
    t.equal(none.code, 1);
    t.match(none.stderr, /xs_directory \(\/cli\/ls\/none\): No such file or directory/);
  });

  t.test('relative paths through the tools resolve under /local/domain/0', async (t) => {
    t.equal((await run('write', 'backend/vbd/5/51712/params', '/images/a b.img')).code, 0);
    t.equal(await client.read('/local/domain/0/backend/vbd/5/51712/params'), '/images/a b.img');
    await client.write('backend/vbd/5/51712/physical-device', 'fd:3');
    t.equal((await run('read', 'backend/vbd/5/51712/physical-device')).stdout, 'fd:3\n');
    t.equal((await run('list', 'backend/vbd/5/51712')).stdout, 'params\nphysical-device\n');
    t.equal((await run('exists', 'backend/vbd/5/51712/params')).code, 0);
    t.equal((await run('rm', 'backend/vbd/5')).code, 0);
    t.equal(await client.tryRead('/local/domain/0/backend/vbd/5'), undefined);
  });

  t.test('xenstore-watch sees the initial event and a change', async (t) => {
    await client.mkdir('/cli/watch');
    const child = spawn(found.watch!, ['-n', '2', '/cli/watch'], { env, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    const firstLine = new Promise<void>((resolve) => {
      child.stdout.on('data', (d: Buffer) => {
        out += d.toString();
        if (out.includes('\n')) resolve();
      });
    });
    const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
    const timer = setTimeout(() => child.kill('SIGKILL'), 10_000);
    await firstLine;
    await client.write('/cli/watch/hotplug-status', 'connected');
    t.equal(await exited, 0);
    clearTimeout(timer);
    t.equal(out, '/cli/watch\n/cli/watch/hotplug-status\n');
  });
}
