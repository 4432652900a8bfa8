/**
 * The production Runner (src/devices/exec.ts) against real processes: output, failures as
 * values, a command that cannot start, timeouts (SIGTERM, then SIGKILL for one that ignores it),
 * stdin, an fd handed on as fd 3, a daemon left holding the output, output read late because
 * this process was busy, the clean environment and the quoting of the command line in messages.
 */
import t from 'tap';
import { spawn } from 'node:child_process';
import { closeSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  commandLine,
  execRunner,
  KILL_GRACE_MS,
  MAX_OUTPUT_BYTES,
  OUTPUT_GRACE_MS,
  quoteArg,
} from '../../src/devices/exec.js';
import { CommandError } from '../../src/devices/runner.js';
import { processAlive } from '../../src/journal/journal.js';

const dir = mkdtempSync(join(tmpdir(), 'xbh-exec-'));
t.teardown(() => rmSync(dir, { recursive: true, force: true }));
const run = execRunner({ PATH: '/nowhere', HOME: '/root', SECRET: 'x', DM_DISABLE_UDEV: '1' });

t.test('output, exit status and duration of a command that succeeds', async (t) => {
  const r = await run.run('sh', ['-c', 'printf "out\\n"; printf "err\\n" >&2', 'x']);
  t.equal(r.stdout, 'out\n', 'stdout kept whole, final newline too');
  t.equal(r.stderr, 'err\n');
  t.equal(r.exitCode, 0);
  t.equal(r.signal, undefined);
  t.equal(r.failed, false);
  t.equal(r.timedOut, false);
  t.ok(r.durationMs > 0 && r.durationMs < 10_000, `durationMs ${r.durationMs}`);
});

t.test('a failing command: a value from probe, a CommandError with its words from run', async (t) => {
  const p = await run.probe('sh', ['-c', 'echo "losetup: /x: failed to set up loop device: No such file" >&2; exit 3']);
  t.equal(p.failed, true);
  t.equal(p.exitCode, 3);
  t.match(p.stderr, /No such file/);
  const e = await run.run('sh', ['-c', 'echo busy >&2; exit 5']).catch((x: unknown) => x);
  t.ok(e instanceof CommandError, 'run rejects with a CommandError');
  t.match((e as CommandError).message, /^sh -c 'echo busy >&2; exit 5' exited with status 5: busy$/);
  t.equal((e as CommandError).result.exitCode, 5);
});

t.test('a command that does not exist could not be started, and says so', async (t) => {
  const r = await run.probe('xbh-no-such-tool', ['--x']);
  t.equal(r.failed, true);
  t.equal(r.exitCode, undefined);
  t.match(r.stderr, /ENOENT/);
  const e = await run.run('xbh-no-such-tool', []).catch((x: unknown) => x);
  t.match((e as Error).message, /^xbh-no-such-tool could not be started: .*ENOENT/);
  const nul = await run.probe('echo', ['a\0b']);
  t.equal(nul.failed, true, 'an argument with a NUL is refused, not cut short');
  t.equal(nul.exitCode, undefined);
});

t.test('a command killed by a signal failed', async (t) => {
  const r = await run.probe('sh', ['-c', 'kill -TERM $$']);
  t.equal(r.failed, true);
  t.equal(r.signal, 'SIGTERM');
  t.equal(r.exitCode, undefined);
});

t.test('timeouts: SIGTERM, then SIGKILL for a command that ignores it', async (t) => {
  const a = await run.probe('sleep', ['30'], { timeoutMs: 200 });
  t.equal(a.timedOut, true);
  t.equal(a.failed, true);
  t.equal(a.signal, 'SIGTERM');
  t.ok(a.durationMs < 5_000, `ended after ${Math.round(a.durationMs)} ms`);
  const pidFile = join(dir, 'stubborn.pid');
  const b = await run.probe('sh', ['-c', `trap "" TERM; echo $$ > ${pidFile}; while :; do sleep 0.05; done`], {
    timeoutMs: 300,
  });
  t.equal(b.timedOut, true);
  t.equal(b.signal, 'SIGKILL', 'the shell that ignored SIGTERM was killed');
  t.ok(
    b.durationMs >= 300 + KILL_GRACE_MS - 50 && b.durationMs < 300 + KILL_GRACE_MS + 4_000,
    `ended after ${Math.round(b.durationMs)} ms`,
  );
  t.notOk(processAlive(Number(readFileSync(pidFile, 'utf8'))), 'and is gone');
  t.match(b.stderr, '', 'stderr is a string');
  const e = await run.run('sleep', ['30'], { timeoutMs: 100 }).catch((x: unknown) => x);
  t.match((e as Error).message, /^sleep 30 timed out after \d+ ms$/);
});

t.test('input reaches stdin; without input stdin is empty', async (t) => {
  t.equal((await run.run('cat', [], { input: 'line one\nline two\n' })).stdout, 'line one\nline two\n');
  t.equal((await run.run('cat', [])).stdout, '', "no input: /dev/null, not the caller's stdin");
  const big = 'x'.repeat(1 << 20);
  t.equal((await run.run('wc', ['-c'], { input: big })).stdout.trim(), String(1 << 20), 'a megabyte of input');
  const r = await run.probe('true', [], { input: big });
  t.equal(r.failed, false, 'a command that reads none of its input is no error');
});

t.test("an extra fd is the child's fd 3, and only that one", async (t) => {
  const file = join(dir, 'fd3');
  writeFileSync(file, '');
  const fd = openSync(file, 'a');
  try {
    await run.run('sh', ['-c', 'echo via-fd3 >&3']);
    t.fail('fd 3 must not be open without extraFds');
  } catch (e) {
    t.match((e as Error).message, /status/, 'without extraFds the child has no fd 3');
  }
  await run.run('sh', ['-c', 'echo via-fd3 >&3'], { extraFds: [fd] });
  closeSync(fd);
  t.equal(readFileSync(file, 'utf8'), 'via-fd3\n');
});

t.test('the environment is PATH, LANG and LC_ALL plus the few passed on', async (t) => {
  // tap's process tracking (@tapjs/processinfo) patches spawn to add its own variables; only
  // those are set aside.
  const tap = (l: string) =>
    l.startsWith('_TAPJS_PROCESSINFO_') || (l.startsWith('NODE_OPTIONS=') && l.includes('@tapjs/processinfo'));
  const env = (await run.run('env', ['-0'])).stdout
    .split('\0')
    .filter((l) => l !== '' && !tap(l))
    .sort();
  t.same(env, [
    'DM_DISABLE_UDEV=1',
    'LANG=C',
    'LC_ALL=C',
    'PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin',
  ]);
});

t.test(
  'a daemon left holding the output pipes: the command ends a moment after it exits, the daemon runs on',
  async (t) => {
    const pidFile = join(dir, 'daemon.pid');
    const r = await run.run('sh', ['-c', `sleep 30 & echo $! > ${pidFile}; echo started`]);
    t.equal(r.failed, false);
    t.equal(r.stdout, 'started\n', 'what it printed before it exited is kept');
    t.ok(
      r.durationMs >= OUTPUT_GRACE_MS - 50 && r.durationMs < OUTPUT_GRACE_MS + 5_000,
      `returned ${Math.round(r.durationMs)} ms after start, not after the daemon's 30 s`,
    );
    const pid = Number(readFileSync(pidFile, 'utf8'));
    t.ok(processAlive(pid), 'the daemon runs on');
    process.kill(pid, 'SIGKILL');
    // A daemon that keeps writing to the pipes does not keep the command going either.
    const c = await run.run('sh', [
      '-c',
      `(while :; do echo tick; sleep 0.05; done) & echo $! > ${pidFile}; echo started`,
    ]);
    t.ok(c.stdout.startsWith('started\ntick\n') || c.stdout.startsWith('tick\nstarted\n'), 'its first lines are kept');
    t.ok(c.durationMs < OUTPUT_GRACE_MS + 5_000, `a chattering daemon: returned after ${Math.round(c.durationMs)} ms`);
    process.kill(Number(readFileSync(pidFile, 'utf8')), 'SIGKILL');
    // The same after a timeout: the killed shell's child keeps the pipes; the time stays bounded.
    const k = await run.probe('sh', ['-c', `sleep 30 & echo $! > ${pidFile}; wait`], { timeoutMs: 200 });
    t.equal(k.timedOut, true);
    t.ok(k.durationMs < 200 + OUTPUT_GRACE_MS + 5_000, `timed out and ended after ${Math.round(k.durationMs)} ms`);
    process.kill(Number(readFileSync(pidFile, 'utf8')), 'SIGKILL');
  },
);

t.test('a waited-for command is awaited until its output is complete', async (t) => {
  const r = await run.run('sh', ['-c', '(sleep 0.3; echo late) & echo early']);
  t.equal(r.stdout, 'early\nlate\n', 'a background writer on the same pipe is waited for');
});

t.test(
  'output written before the exit is kept when this process is busy for longer than the grace right after the exit is seen',
  async (t) => {
    // What happens with in-process hooks, or a loaded dom0: a command exits while a callback of
    // the same loop turn is busy, so its output is not in that turn's poll; another child's exit,
    // handled in the same SIGCHLD pass after it, runs a long synchronous stretch; the loop then
    // reaches its timers before it polls the pipes again. A grace counted once on the clock cut
    // the output to nothing here, every time.
    const busy = (ms: number) => {
      const end = Date.now() + ms;
      while (Date.now() < end) {
        // the synchronous work of someone else's callback
      }
    };
    for (let round = 0; round < 2; round++) {
      const cmd = run.probe('sh', ['-c', 'sleep 0.5; echo hello']);
      const other = spawn('sh', ['-c', 'sleep 0.1'], { stdio: 'ignore' });
      other.on('exit', () => busy(OUTPUT_GRACE_MS + 500));
      const talker = spawn('sh', ['-c', 'sleep 0.1; echo go; exec sleep 5'], { stdio: ['ignore', 'pipe', 'ignore'] });
      talker.stdout.once('data', () => busy(800));
      busy(300);
      const r = await cmd;
      talker.kill('SIGKILL');
      await new Promise((res) => talker.on('close', res));
      t.equal(
        r.stdout,
        'hello\n',
        `round ${round + 1}: the output is whole (returned after ${Math.round(r.durationMs)} ms)`,
      );
      t.equal(r.failed, false);
    }
  },
);

t.test('large output is kept whole; output beyond the bound stops the command and fails it', async (t) => {
  const r = await run.run('head', ['-c', String(4 << 20), '/dev/zero']);
  t.equal(r.stdout.length, 4 << 20);
  const big = await run.probe('cat', ['/dev/zero']);
  t.equal(big.failed, true, 'endless output fails');
  t.equal(big.timedOut, false);
  t.match(big.stderr, `printed more than ${MAX_OUTPUT_BYTES} bytes`);
  t.ok(big.stdout.length <= MAX_OUTPUT_BYTES, 'and is not kept beyond the bound');
});

t.test('the command line in messages is quoted as a shell would need it', async (t) => {
  t.equal(quoteArg('/dev/loop0'), '/dev/loop0');
  t.equal(quoteArg('--find'), '--find');
  t.equal(quoteArg('a b'), "'a b'");
  t.equal(quoteArg("it's"), "'it'\\''s'");
  t.equal(quoteArg('a\nb'), "'a\\nb'", 'a newline is shown escaped, not printed');
  t.equal(quoteArg('tab\there'), "'tab\\there'");
  t.equal(quoteArg('\u0007'), "'\\u0007'");
  t.equal(quoteArg('$(rm -rf /)'), "'$(rm -rf /)'");
  t.equal(quoteArg('/img/ünï.img'), "'/img/ünï.img'");
  t.equal(quoteArg(''), "''");
  t.equal(
    commandLine('losetup', ['--find', '--show', '--', '/srv/my disk.img']),
    "losetup --find --show -- '/srv/my disk.img'",
  );
  const r = await run.probe('sh', ['-c', 'exit 1', 'my arg']);
  t.equal(r.command, "sh -c 'exit 1' 'my arg'");
});
