/**
 * Locks between processes: our own processes among themselves, with Xen's stock locking.sh in
 * both directions, and a holder killed with SIGKILL.
 */
import t from 'tap';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { acquireFlock } from '../../src/lock/flock.js';
import {
  buildHolder,
  flockWaiters,
  pathIsLocked,
  spawnUntil,
  tracked,
  until,
  waitLine,
  writeLockingSh,
} from './lock-helpers.js';

const dir = t.testdir();
let holder = '';
t.before(async () => {
  holder = await buildHolder(dir);
});

t.test('mutual exclusion among our processes', async (t) => {
  const path = join(dir, 'count', 'block');
  const counter = join(dir, 'counter');
  const log = join(dir, 'log');
  writeFileSync(counter, '0');
  writeFileSync(log, '');
  const N = 4;
  const K = 10;
  const kids = Array.from({ length: N }, () =>
    spawn(process.execPath, [holder, 'count', path, counter, log, String(K)], { stdio: 'inherit' }),
  );
  const codes = await Promise.all(kids.map((k) => new Promise<number | null>((r) => k.on('exit', (c) => r(c)))));
  t.same(codes, Array(N).fill(0), 'all workers finished');
  t.equal(readFileSync(counter, 'utf8'), String(N * K), 'no lost update in read-sleep-write');
  const lines = readFileSync(log, 'utf8').trim().split('\n');
  t.equal(lines.length, 2 * N * K);
  let inside: string | null = null;
  let overlaps = 0;
  for (const l of lines) {
    const [what, pid] = l.split(' ');
    if (what === 'enter') {
      if (inside !== null) overlaps++;
      inside = pid!;
    } else {
      if (inside !== pid) overlaps++;
      inside = null;
    }
  }
  t.equal(overlaps, 0, 'critical sections never interleave');
  t.notOk(existsSync(path), 'last holder unlinked the lock file');
});

t.test('a SIGKILLed holder stops blocking others at once', async (t) => {
  const path = join(dir, 'kill', 'block');
  const { child } = await spawnUntil(process.execPath, [holder, 'hold', path], 'locked');
  t.ok(pathIsLocked(path));
  const w = tracked(acquireFlock(path, { timeoutMs: 30_000 }));
  await until(() => flockWaiters(path) === 1, 'our waiter to queue behind the holder');
  t.notOk(w.settled(), 'waiting while the holder lives');
  const t0 = performance.now();
  child.kill('SIGKILL');
  const lock = await w.p;
  const ms = performance.now() - t0;
  t.ok(ms < 1000, `acquired ${ms.toFixed(0)} ms after SIGKILL of the holder (bound 1000 ms)`);
  t.ok(existsSync(path) && pathIsLocked(path), 'we hold the file the dead holder left linked');
  await lock.release();
  t.notOk(existsSync(path));
});

t.test('interop with locking.sh: a stock shell holder blocks us', async (t) => {
  const base = join(dir, 'xen-hotplug-1');
  const path = join(base, 'block');
  const sh = writeLockingSh(dir);
  const go = join(dir, 'go-1');
  const { child, out } = await spawnUntil('bash', [sh, base, 'block', go], 'locked');
  const w = tracked(acquireFlock(path, { timeoutMs: 30_000 }));
  await until(() => flockWaiters(path) === 1, 'our waiter to queue behind the shell');
  t.notOk(w.settled(), 'we wait while claim_lock holds it');
  writeFileSync(go, '');
  await waitLine(child, 'released', out);
  const lock = await w.p;
  t.ok(existsSync(path) && pathIsLocked(path), 'after release_lock (rm) we hold a fresh, linked file');
  await lock.release();
  await new Promise((r) => (child.exitCode !== null ? r(null) : child.on('exit', r)));
  t.equal(child.exitCode, 0);
});

t.test('interop with locking.sh: we block a stock shell claim_lock', async (t) => {
  const base = join(dir, 'xen-hotplug-2');
  const path = join(base, 'block');
  const sh = writeLockingSh(dir);
  const go = join(dir, 'go-2');
  const lock = await acquireFlock(path);
  const child = spawn('bash', [sh, base, 'block', go], { stdio: ['ignore', 'pipe', 'inherit'] });
  let out = '';
  child.stdout.on('data', (d: Buffer) => {
    out += d.toString();
  });
  await until(() => flockWaiters(path) === 1, 'claim_lock to queue behind us');
  t.equal(out, '', 'claim_lock has not returned');
  await lock.release();
  await waitLine(child, 'locked', () => out);
  t.ok(existsSync(path) && pathIsLocked(path), 'the shell holds a fresh file after our unlink');
  writeFileSync(go, '');
  await waitLine(child, 'released', () => out);
  await new Promise((r) => (child.exitCode !== null ? r(null) : child.on('exit', r)));
  t.notOk(existsSync(path), 'release_lock removed it');
  const again = await acquireFlock(path, { timeoutMs: 2000 });
  await again.release();
});

t.test('interop with locking.sh: the shell re-checks the inode after we release by unlinking', async (t) => {
  // Our holder and a queued shell: our release unlinks, the shell's flock lands on the
  // unlinked file, its stat comparison fails and it must retry on a new file, as we do. The
  // holder is another process of ours: tasks of one process queue in that process, not in flock(2).
  const base = join(dir, 'xen-hotplug-3');
  const path = join(base, 'block');
  const sh = writeLockingSh(dir);
  const go = join(dir, 'go-3');
  const { child: first } = await spawnUntil(process.execPath, [holder, 'hold', path], 'locked');
  const child = spawn('bash', [sh, base, 'block', go], { stdio: ['ignore', 'pipe', 'inherit'] });
  let out = '';
  child.stdout.on('data', (d: Buffer) => {
    out += d.toString();
  });
  await until(() => flockWaiters(path) === 1, 'claim_lock to queue');
  // A second waiter of ours queues too; exactly one of the two may win at a time.
  const w = tracked(acquireFlock(path, { timeoutMs: 30_000 }));
  await until(() => flockWaiters(path) === 2, 'both waiters queued');
  first.stdin!.end();
  await until(() => out.includes('locked') || w.settled(), 'one of them to win');
  const weWonFirst = w.settled();
  if (weWonFirst) {
    const l = await w.p;
    t.equal(out, '', 'we won: the shell is still waiting while we hold it');
    t.ok(pathIsLocked(path));
    await l.release();
    await waitLine(child, 'locked', () => out);
  } else {
    // The shell holds it now: we must still be waiting a while later, not hold it beside it.
    await new Promise((r) => setTimeout(r, 300));
    t.notOk(w.settled(), 'the shell won: 300 ms later we are still waiting');
  }
  writeFileSync(go, '');
  await waitLine(child, 'released', () => out);
  if (!weWonFirst) {
    const l = await w.p;
    t.ok(existsSync(path) && pathIsLocked(path), 'then we hold a fresh, linked file');
    await l.release();
  }
  await new Promise((r) => (child.exitCode !== null ? r(null) : child.on('exit', r)));
  t.equal(child.exitCode, 0);
  t.notOk(existsSync(path));
});
