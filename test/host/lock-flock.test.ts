import t from 'tap';
import {
  closeSync,
  existsSync,
  openSync,
  readdirSync,
  readFileSync,
  mkdirSync,
  readlinkSync,
  renameSync,
  rmSync,
  statSync,
  unlinkSync,
  writeFileSync,
} from 'node:fs';
import { join } from 'node:path';
import { execRunner } from '../../src/devices/exec.js';
import type { RunOptions, RunResult, Runner } from '../../src/devices/runner.js';
import {
  acquireFlock,
  DEFAULT_LOCK_TIMEOUT_MS,
  LockTimeoutError,
  MAX_HANDOVERS,
  tryAcquireFlock,
  withFlock,
  xenBlockLockPath,
  XEN_LOCK_BUDGET_MS,
  xenLockWaitMs,
} from '../../src/lock/flock.js';
import { eventAgeMs, STARTED_ENV } from '../../src/lock/xen-lock.js';
import { baseImageLockPath, nbdLockPath, stateLockPath, thinPoolLockPath } from '../../src/lock/paths.js';
import { AlreadyRunningError, claimSingleInstance } from '../../src/lock/instance.js';
import {
  flockWaiters,
  pathIsLocked,
  rawClose,
  rawLock,
  spawnUntil,
  tracked,
  until,
  writeLockingSh,
} from './lock-helpers.js';

t.test('paths', async (t) => {
  t.equal(xenBlockLockPath(), '/var/run/xen-hotplug/block');
  t.equal(xenBlockLockPath('/tmp/x'), '/tmp/x/block');
  t.equal(stateLockPath('/run/xbh', 'nbd'), '/run/xbh/locks/nbd');
  t.equal(nbdLockPath('/run/xbh'), '/run/xbh/locks/nbd');
  t.equal(thinPoolLockPath('/run/xbh', 'xbh-pool'), '/run/xbh/locks/pool-xbh-pool');
  t.equal(baseImageLockPath('/run/xbh', { dev: 65024, ino: 2146546n }), '/run/xbh/locks/base-65024-2146546');
  for (const bad of ['', '../x', 'a/b', '.hidden', '-x', 'a b', 'x'.repeat(129)]) {
    t.throws(() => stateLockPath('/run/xbh', bad), /invalid lock name/, JSON.stringify(bad));
  }
  t.equal(DEFAULT_LOCK_TIMEOUT_MS, 20_000);
});

t.test("the wait for Xen's block lock: what is left of libxl's budget, never less than configured", async (t) => {
  t.equal(XEN_LOCK_BUDGET_MS, 35_000, 'libxl kills at 40 s; 5 s stay for the work');
  t.equal(xenLockWaitMs(20_000, 100), 34_900, 'a hook that started 0.1 s ago waits up to 34.9 s');
  t.equal(xenLockWaitMs(20_000, 20_000), 20_000, 'never less than the configured bound');
  t.equal(xenLockWaitMs(1_000, 2_500), 32_500);
  t.equal(xenLockWaitMs(100_000, 500), 100_000, 'a longer configured bound (xend waited 100 s) wins');
  t.equal(xenLockWaitMs(1_000, 60_000), 1_000, 'past the budget: the configured bound');
});

t.test('acquire creates the directory, holds a real flock, release unlinks then closes', async (t) => {
  const dir = t.testdir();
  const path = join(dir, 'deeper', 'locks', 'block');
  const lock = await acquireFlock(path);
  t.equal(lock.path, path);
  t.ok(existsSync(path), 'lock file linked while held');
  t.ok(pathIsLocked(path), 'flock(1) -n sees it held');
  await lock.release();
  t.notOk(existsSync(path), 'release unlinked the path');
  await lock.release(); // idempotent
  const again = await acquireFlock(path);
  t.ok(pathIsLocked(path));
  await again.release();
  t.notOk(pathIsLocked(path));
});

t.test('withFlock returns the value and releases on success and on throw', async (t) => {
  const path = join(t.testdir(), 'l');
  t.equal(
    await withFlock(path, async () => {
      t.ok(pathIsLocked(path));
      return 42;
    }),
    42,
  );
  t.notOk(existsSync(path));
  await t.rejects(
    withFlock(path, async () => {
      throw new Error('boom');
    }),
    /boom/,
  );
  t.notOk(existsSync(path), 'released after throw');
  t.notOk(pathIsLocked(path));
});

t.test('tryAcquireFlock and the single-instance guard', async (t) => {
  const path = join(t.testdir(), 'watch.lock');
  const a = await tryAcquireFlock(path);
  t.ok(a, 'free lock is taken');
  t.equal(await tryAcquireFlock(path), null, 'held lock: null, no wait');
  await t.rejects(claimSingleInstance(path, 'xen-blockhooks watch'), AlreadyRunningError);
  await t.rejects(claimSingleInstance(path, 'xen-blockhooks watch'), {
    message: `xen-blockhooks watch is already running (lock ${path} is held)`,
  });
  await a!.release();
  const g = await claimSingleInstance(path, 'xen-blockhooks watch');
  t.ok(pathIsLocked(path));
  await g.release();
});

t.test('timeouts give a clear error naming the lock file', async (t) => {
  const dir = t.testdir();
  const path = join(dir, 'block');

  await t.test('held in this process: not re-entrant, said so', async (t) => {
    const held = await acquireFlock(path);
    const t0 = Date.now();
    const err = await acquireFlock(path, { timeoutMs: 300 }).then(
      () => null,
      (e: unknown) => e,
    );
    t.ok(err instanceof LockTimeoutError, 'LockTimeoutError');
    const e = err as LockTimeoutError;
    t.equal(e.path, path);
    t.equal(e.timeoutMs, 300);
    t.equal(
      e.message,
      `lock ${path} not acquired within 300 ms (this process holds it: another of its events, or this one, since locks are not re-entrant)`,
    );
    t.ok(Date.now() - t0 >= 250, 'waited about the timeout');
    const busy = await acquireFlock(path, { timeoutMs: 0 }).then(
      () => null,
      (e: unknown) => e as Error,
    );
    t.match(busy?.message, new RegExp(`^lock ${path} is busy`));
    await held.release();
  });

  await t.test('held by a stock-style shell holder: its pid is named', async (t) => {
    const sh = writeLockingSh(dir);
    const go = join(dir, 'go-timeout');
    const { child } = await spawnUntil('bash', [sh, dir, 'block', go], 'locked');
    const err = await acquireFlock(path, { timeoutMs: 1000 }).then(
      () => null,
      (e: unknown) => e as Error,
    );
    t.ok(err instanceof LockTimeoutError);
    // The shell's own children (its `sleep`) share its lock fd and may be named after it.
    t.match(
      err?.message,
      `lock ${path} not acquired within 1 s (held by pid ${child.pid} bash ${sh} ${dir} block ${go}`,
    );
    writeFileSync(go, '');
    await new Promise((r) => child.on('exit', r));
  });

  await t.test('bad timeout values are refused', async (t) => {
    await t.rejects(acquireFlock(path, { timeoutMs: -1 }), RangeError);
    await t.rejects(acquireFlock(path, { timeoutMs: Number.NaN }), RangeError);
  });
});

t.test('tasks of one process queue for a lock, and a release hands it on without a flock child', async (t) => {
  const dir = t.testdir();
  const path = join(dir, 'block');
  const real = execRunner();
  let flocks = 0;
  const runner: Runner = {
    run: (f, a, o) => real.run(f, a, o),
    probe: (f, a, o) => {
      if (f === 'flock') flocks += 1;
      return real.probe(f, a, o);
    },
  };
  const first = await acquireFlock(path, { runner });
  t.equal(flocks, 1, 'the first acquire runs flock(1)');
  t.equal(await tryAcquireFlock(path, { runner }), null, 'a try while a task of this process holds it: busy');
  t.equal(flocks, 1, '... found out without a flock child');

  // MAX_HANDOVERS + 2 tasks wait: MAX_HANDOVERS of them are handed the same lock (same file, no
  // child), then one release goes to the kernel (the file unlinked; the next task locks a new one
  // with flock(1)), and the count starts again.
  const n = MAX_HANDOVERS + 2;
  const seen: { i: number; flocks: number; locked: boolean }[] = [];
  const tasks = Array.from({ length: n }, (_, i) =>
    acquireFlock(path, { runner, timeoutMs: 20_000 }).then(async (l) => {
      seen.push({ i, flocks, locked: pathIsLocked(path) });
      await new Promise((r) => setTimeout(r, 5));
      await l.release();
    }),
  );
  await new Promise((r) => setTimeout(r, 50));
  t.equal(flocks, 1, 'waiting tasks run no flock child');
  await first.release();
  await Promise.all(tasks);
  t.same(
    seen.map((s) => s.i),
    Array.from({ length: n }, (_, i) => i),
    'first come, first served',
  );
  t.ok(
    seen.every((s) => s.locked),
    'every task held a real flock on the linked file',
  );
  // (A file's inode number is reused at once after an unlink, so the flock(1) children are what
  // tells a hand-over from a new acquire.)
  t.same(
    seen.map((s) => s.flocks),
    Array.from({ length: n }, (_, i) => (i < MAX_HANDOVERS ? 1 : 2)),
    `the first ${MAX_HANDOVERS} were handed the lock; the next one locked it anew with flock(1)`,
  );
  t.equal(flocks, 2, 'one flock(1) for the first task and one after MAX_HANDOVERS hand-overs');
  t.notOk(existsSync(path), 'the last release unlinked the path');
  t.notOk(pathIsLocked(path));

  // A task whose wait runs out leaves the queue; the ones behind it still get the lock.
  const held = await acquireFlock(path, { runner });
  const late = acquireFlock(path, { runner, timeoutMs: 100 }).then(
    () => null,
    (e: unknown) => e as Error,
  );
  const patient = acquireFlock(path, { runner, timeoutMs: 20_000 });
  const err = await late;
  t.ok(err instanceof LockTimeoutError, 'the impatient one timed out');
  t.match(err?.message, /this process holds it: another of its events/);
  await held.release();
  const got = await patient;
  t.ok(pathIsLocked(path), 'the one behind it holds the lock');
  await got.release();
  t.notOk(existsSync(path));
});

t.test('a release whose path cannot be looked at still frees the lock in this process', async (t) => {
  const dir = t.testdir();
  const sub = join(dir, 'sub');
  mkdirSync(sub);
  const path = join(sub, 'lock');
  const held = await acquireFlock(path);
  const waiter = acquireFlock(path, { timeoutMs: 5_000 }).then(
    (l) => l,
    (e: unknown) => e as Error,
  );
  await new Promise((r) => setTimeout(r, 50));
  // The directory is replaced by a plain file: stat of the path fails with ENOTDIR.
  renameSync(sub, join(dir, 'moved'));
  writeFileSync(sub, '');
  await held.release();
  const got = await waiter;
  t.ok(
    got instanceof LockTimeoutError || got instanceof Error,
    `the waiter asked the kernel itself and failed: ${String(got)}`,
  );
  t.notMatch(String(got), /not acquired within/, 'it did not wait out its time in the queue');
  rmSync(sub);
  mkdirSync(sub);
  const again = await acquireFlock(path, { timeoutMs: 2_000 });
  t.ok(pathIsLocked(path), 'the path can be locked again: no queue entry was left behind');
  await again.release();
  t.notOk(existsSync(path));
});

t.test("an event's age: from the wrapper's start when it says so, else this process's", async (t) => {
  const now = 1_764_900_000_000;
  t.equal(eventAgeMs({ [STARTED_ENV]: '1764899990.250000' }, now, 5), 9_750, "bash's $EPOCHREALTIME");
  t.equal(eventAgeMs({ [STARTED_ENV]: '1764899990,5' }, now, 5), 9_500, 'a decimal comma');
  t.equal(eventAgeMs({ [STARTED_ENV]: '1764899000' }, now, 5), 5, 'older than two minutes: not this event');
  t.equal(eventAgeMs({ [STARTED_ENV]: '1764900010' }, now, 5), 5, 'in the future: not this event');
  t.equal(eventAgeMs({ [STARTED_ENV]: 'soon' }, now, 5), 5, 'not a time');
  t.equal(eventAgeMs({}, now, 5), 5, 'unset: the process uptime');
  t.equal(
    xenLockWaitMs(20_000, eventAgeMs({ [STARTED_ENV]: '1764899990' }, now, 5)),
    25_000,
    'the wait is what is left',
  );
});

t.test('flock argv, bounded runner time, and failures other than a timeout', async (t) => {
  const calls: { file: string; args: readonly string[]; opts?: RunOptions }[] = [];
  const fake = (exitCode: number, stderr = ''): Runner => {
    const res = (file: string, args: readonly string[]): RunResult => ({
      command: [file, ...args].join(' '),
      exitCode,
      signal: undefined,
      stdout: '',
      stderr,
      durationMs: 1,
      failed: exitCode !== 0,
      timedOut: false,
    });
    return {
      async run(file, args, opts) {
        calls.push({ file, args, opts });
        return res(file, args);
      },
      async probe(file, args, opts) {
        calls.push({ file, args, opts });
        return res(file, args);
      },
    };
  };
  const path = join(t.testdir(), 'l');
  const lock = await acquireFlock(path, { runner: fake(0), timeoutMs: 20_000 });
  await lock.release();
  t.equal(calls.length, 1);
  const c = calls[0]!;
  t.equal(c.file, 'flock');
  t.equal(c.args[0], '-x');
  t.equal(c.args[1], '-w');
  t.ok(Number(c.args[2]) > 19 && Number(c.args[2]) <= 20, `-w seconds ${c.args[2]}`);
  t.equal(c.args[3], '3');
  t.equal(c.opts?.extraFds?.length, 1, 'exactly our fd is passed');
  t.ok((c.opts?.timeoutMs ?? 0) > 20_000 && (c.opts?.timeoutMs ?? 0) <= 25_000, 'runner timeout just above the wait');

  calls.length = 0;
  await tryAcquireFlock(path, { runner: fake(0) }).then((l) => l?.release());
  t.same(calls[0]?.args, ['-x', '-n', '3'], 'no wait: -n');

  const err = await acquireFlock(path, { runner: fake(66, 'flock: 3: Bad file descriptor') }).then(
    () => null,
    (e: unknown) => e as Error,
  );
  t.match(
    err?.message,
    /^cannot lock \S+\/l: flock -x -w (19\.\d{3}|20\.000) 3 exited with status 66: flock: 3: Bad file descriptor$/,
  );
  t.notOk(err instanceof LockTimeoutError, 'not reported as a timeout');
  t.notOk(existsSync(path) && pathIsLocked(path));
});

t.test('inode swap: a waiter queued on a file its holder unlinked re-opens and locks the new file', async (t) => {
  const path = join(t.testdir(), 'block');
  const a = rawLock(path); // holder A on inode 1
  const ino1 = statSync(path).ino;
  const w = tracked(acquireFlock(path, { timeoutMs: 30_000 }));
  await until(() => flockWaiters(path) === 1, 'the waiter to queue on inode 1');

  // A releases as locking.sh does (rm, then close) but C creates and locks a new file in between.
  unlinkSync(path);
  const c = rawLock(path);
  const ino2 = statSync(path).ino;
  t.not(ino2, ino1, 'C locked a new inode');
  rawClose(a); // the waiter now gets the flock on the unlinked inode 1 ...
  await until(() => flockWaiters(path) === 1, 'the waiter to re-open and queue on inode 2');
  t.notOk(w.settled(), '... and must not proceed on it');

  // C releases the same way: the waiter gets inode 2 unlinked, retries, and gets a fresh file.
  unlinkSync(path);
  rawClose(c);
  const lock = await w.p;
  t.ok(existsSync(path), 'the lock it holds is linked at the path');
  t.ok(pathIsLocked(path), 'and flocked');
  await lock.release();
  t.notOk(existsSync(path));
});

t.test('the lock fd reaches no child started through the Runner unless listed in extraFds', async (t) => {
  const dir = t.testdir();
  const path = join(dir, 'block');
  const lock = await acquireFlock(path);
  const run = execRunner();

  const ls = await run.run('ls', ['-l', '/proc/self/fd/']);
  t.notMatch(ls.stdout, path, 'a plain child does not have it');

  // A daemon that outlives the command that started it (qemu-nbd --fork style).
  const other = join(dir, 'control-file');
  writeFileSync(other, '');
  const ctl = openSync(other, 'r');
  const pidOf = async (marker: string): Promise<number> => {
    let pid = 0;
    await until(() => {
      for (const p of readdirSync('/proc').filter((x) => /^\d+$/.test(x))) {
        try {
          const cmd = readlinkSync(`/proc/${p}/exe`);
          const args = readFileSync(`/proc/${p}/cmdline`, 'utf8').split('\0');
          if (cmd.endsWith('/sleep') && args.includes(marker)) {
            pid = Number(p);
            return true;
          }
        } catch {
          /* gone */
        }
      }
      return false;
    }, `daemon ${marker}`);
    return pid;
  };
  const links = (pid: number) =>
    readdirSync(`/proc/${pid}/fd`).map((f) => {
      try {
        return readlinkSync(`/proc/${pid}/fd/${f}`);
      } catch {
        return '';
      }
    });

  await run.run('sh', ['-c', 'sleep 60.123 </dev/null >/dev/null 2>&1 &']);
  await run.run('sh', ['-c', 'sleep 60.456 </dev/null >/dev/null 2>&1 &'], { extraFds: [ctl] });
  const plain = await pidOf('60.123');
  const withExtra = await pidOf('60.456');
  try {
    t.notOk(links(plain).includes(path), 'daemon without extraFds does not hold the lock file');
    t.ok(links(withExtra).includes(other), 'control: a listed fd does reach the daemon');
    t.notOk(links(withExtra).includes(path), 'and only the listed one');
  } finally {
    process.kill(plain, 'SIGKILL');
    process.kill(withExtra, 'SIGKILL');
    closeSync(ctl);
  }
  // With the daemons still around a moment ago, the lock is ours alone: release frees it.
  await lock.release();
  const again = await acquireFlock(path, { timeoutMs: 2000 });
  await again.release();
});
