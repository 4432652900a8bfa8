/**
 * Serialisation: flock(2) locks with Xen's locking.sh protocol.
 *
 * Every lock of this project, Xen's global `block` lock and our own finer locks alike, is the
 * protocol of Xen's `tools/hotplug/Linux/locking.sh` (with-lock-ex(1) from chiark-utils, using
 * flock). Sharing the protocol is what makes us interoperate with the stock scripts: a stock
 * `block` script in `claim_lock "block"` and a hook of ours in `acquireFlock(xenBlockLockPath())`
 * exclude each other, in both directions.
 *
 * * The lock is owned not by a process but by an open file description (informally an fd).
 *   Every process with an fd onto that description holds the lock with us. We therefore open
 *   with O_CLOEXEC (Node always does), and the Runner hands a child only the fds listed in
 *   `extraFds`: the lock fd reaches exactly one child, the short-lived `flock` below, and never
 *   a long-lived one (qemu-nbd, a daemon), which would otherwise keep the lock after we exit.
 *
 * * You are a lockholder if
 *     - you have an fd onto an open file description which currently holds an exclusive flock
 *       on its inode,
 *     - and that inode is currently linked at the lockfile path.
 *
 * * The rules are:
 *     - No-one but a lockholder may unlink the lockfile path (or otherwise make it stop
 *       referring to the file it refers to).
 *     - Anyone may open the lockfile with O_CREAT.
 *
 * * The protocol for locking (acquireFlock):
 *     - mkdir -p the directory; open the path O_WRONLY|O_CREAT|O_APPEND (never O_TRUNC: anyone
 *       may open it, nobody but the holder changes it),
 *     - flock(fd, LOCK_EX), bounded by the remaining time,
 *     - fstat the fd, stat the path,
 *     - if both name the same file (st_dev and st_ino), you have the lock; otherwise close the
 *       fd and start again (the holder we waited for released by unlinking: the file we locked
 *       is no longer the lock).
 *   The protocol for unlocking (HeldLock.release): unlink the path, then close the fd.
 *
 * * Why it is correct (locking.sh's informal proof, unchanged):
 *     - Exclusivity: no two open file descriptions hold an exclusive flock on one inode at the
 *       same time, and no two files have the same name at the same time.
 *     - After flock succeeds nobody but us can take that flock away; the inode from fstat is
 *       fixed; when we stat the path it either names another inode (we failed, retry) or ours,
 *       in which case at that instant we were the holder by definition.
 *     - Nobody can steal it afterwards: only a holder may make the path stop naming the file,
 *       and we are the holder, so both conditions stay true until we unlink or close.
 *
 * * What happens on SIGKILL: libxl SIGKILLs a hook at its 40 s timeout. The kernel closes the
 *   dead process's fds, the open file description goes away (no child has it, see above) and
 *   the flock with it; the next waiter's flock(2) returns at once. The path stays linked, which
 *   the protocol allows: the next holder locks that same file and unlinks it on release.
 *   Nothing has to expire. (The `flock` helper may itself be orphaned by a SIGKILL of its
 *   parent while it waits: it holds the description only until its own `-w` runs out, or for
 *   the instant between getting the lock and exiting, after which the description is closed.)
 *
 * * Rules for callers:
 *     - Locks are not re-entrant. Two acquires of one path in one process exclude each other:
 *       concurrent tasks (the events of the resident service) are serialised in this process's
 *       own queue for the path, and a release hands the lock to the next of them (see
 *       LocalQueue), but a task that re-acquires a lock it holds waits for itself until its
 *       timeout.
 *     - Order: our own locks (base image, then thin pool, then nbd allocation) are taken before
 *       Xen's `block` lock, which is taken last, held only around what the stock scripts also
 *       do under it (loop allocation, the sharing check, writing physical-device) and never
 *       held while waiting for another lock. The drop-in `block` takes no lock of its own: the
 *       runtime holds Xen's lock around its whole add or remove, as the stock script does
 *       (Backend.lockScope), so it costs one `flock` child, not two.
 *     - Every wait is bounded (`timeoutMs`, default 20 s, half of libxl's 40 s hotplug
 *       timeout); on expiry a LockTimeoutError names the lock file and, when it can be found in
 *       /proc, the process holding it. Xen's `block` lock is the exception to the 20 s: the
 *       stock scripts wait for it without limit, so a hook that gives up earlier fails disks
 *       the stock scripts would have attached (many domains started at once on a slow dom0).
 *       The drop-in `block`, which holds no other lock while it waits, as the stock script,
 *       waits for it until XEN_LOCK_BUDGET_MS after its own start (xenLockWaitMs), leaving the
 *       rest of libxl's 40 s to build and report, or the configured timeout when that is longer
 *       (xend waited 100 s). The other hooks take Xen's lock while holding their own (base
 *       image, pool), so they keep the configured bound.
 *
 * * Why not proper-lockfile for these locks: its lock is `mkdir <file>.lock` plus mtime
 *   heartbeats. The stock scripts' flock does not see a directory and proper-lockfile does not
 *   see a flock, so using it for `block` would lose mutual exclusion with every stock script on
 *   the host. After a SIGKILL (libxl's timeout) its directory stays behind and blocks every
 *   hook for `stale` ms (10 s by default, 2 s at least). Its heartbeat is a timer: a blocked
 *   event loop turns into ECOMPROMISED, by default an uncaught exception. flock has none of
 *   these problems; proper-lockfile's one advantage, working on NFS across hosts, does not
 *   matter for locks in /run. See instance.ts for the one long-lived lock (the watch daemon).
 *
 * * Cost: Node core has no flock(2) or fcntl(F_SETLK) binding; no open(2) flag takes a lock on
 *   Linux (O_EXLOCK is BSD-only), and /proc/locks can only tell whether an inode is locked,
 *   which is a test, not an acquisition (test-then-lock races). So every acquire spawns one
 *   `flock -x -w <secs> 3` (or `flock -n 3`) with our fd as its fd 3: flock(2) applies to the
 *   open file description we share with it, so the lock stays with us after it exits. Tasks of
 *   one process that want the same lock queue here instead, and a release hands it to the next
 *   of them without a child: in the resident service, a burst of events on one base costs one
 *   `flock` child per MAX_HANDOVERS events, not one per event.
 */
import {
  closeSync,
  fstatSync,
  mkdirSync,
  openSync,
  constants as fsc,
  readdirSync,
  readFileSync,
  readlinkSync,
  statSync,
  unlinkSync,
  type Stats,
} from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { execRunner } from '../devices/exec.js';
import { describeFailure, type Runner } from '../devices/runner.js';

export interface HeldLock {
  readonly path: string;
  release(): Promise<void>;
}

export interface LockOptions {
  /** Give up after this many milliseconds (default DEFAULT_LOCK_TIMEOUT_MS; 0 = do not wait). */
  timeoutMs?: number;
  /** Runs `flock` (default: the production runner, devices/exec.ts). */
  runner?: Runner;
}

/** Half of libxl's 40 s hotplug timeout: a hook that cannot get a lock still has time to report. */
export const DEFAULT_LOCK_TIMEOUT_MS = 20_000;

/** The stock scripts' lock directory (LOCK_BASEDIR of locking.sh). */
export const XEN_LOCK_DIR = '/var/run/xen-hotplug';

/** How long after its start a hook may still be waiting for Xen's `block` lock (libxl kills it at 40 s). */
export const XEN_LOCK_BUDGET_MS = 35_000;

/**
 * The wait for Xen's `block` lock of a hook that started `uptimeMs` ago: what is left of
 * XEN_LOCK_BUDGET_MS, never less than the configured lock timeout.
 */
export function xenLockWaitMs(configuredMs: number, uptimeMs: number): number {
  return Math.max(configuredMs, Math.round(XEN_LOCK_BUDGET_MS - uptimeMs));
}

/** The stock scripts' global lock: <xenLockDir>/block (default /var/run/xen-hotplug/block). */
export function xenBlockLockPath(xenLockDir: string = XEN_LOCK_DIR): string {
  return join(xenLockDir, 'block');
}

/** The lock could not be had within the time allowed. */
export class LockTimeoutError extends Error {
  readonly path: string;
  readonly timeoutMs: number;
  constructor(path: string, timeoutMs: number, detail: string) {
    const waited = timeoutMs <= 0 ? 'is busy' : `not acquired within ${formatMs(timeoutMs)}`;
    super(`lock ${path} ${waited}${detail}`);
    this.name = 'LockTimeoutError';
    this.path = path;
    this.timeoutMs = timeoutMs;
  }
}

/** Paths this process holds right now (diagnostics only: a self-deadlock is reported as such). */
const heldHere = new Set<string>();

let defaultRunner: Runner | undefined;
function runnerOf(opts: LockOptions): Runner {
  if (opts.runner) return opts.runner;
  defaultRunner ??= execRunner();
  return defaultRunner;
}

/** Xen's locking.sh protocol on `path` (creates the directory). */
export async function acquireFlock(path: string, opts: LockOptions = {}): Promise<HeldLock> {
  const got = await lockLoop(path, opts, 'wait');
  if (!got) throw new Error(`internal: lock ${path} returned nothing`);
  return got;
}

/**
 * One attempt that does not wait: the lock, or `null` when someone else holds it. For guards
 * ("is another instance running?"), not for hotplug work, which should wait its turn.
 */
export async function tryAcquireFlock(
  path: string,
  opts: Omit<LockOptions, 'timeoutMs'> = {},
): Promise<HeldLock | null> {
  return lockLoop(path, { ...opts, timeoutMs: 0 }, 'try');
}

export async function withFlock<T>(path: string, fn: () => Promise<T>, opts?: LockOptions): Promise<T> {
  const lock = await acquireFlock(path, opts);
  try {
    return await fn();
  } finally {
    await lock.release();
  }
}

/**
 * Tasks of this process that want one lock wait for one another here, in order, rather than each
 * in a `flock` child of its own: a path has an entry while a task of this process holds it or is
 * asking the kernel for it. A release with a task waiting hands the held lock (the same open file
 * description, still linked at the path) straight to it: no `flock` child, nothing unlinked. To
 * other processes the lock was simply held a while longer, so after MAX_HANDOVERS hand-overs in a
 * row it is released to the kernel, and a stock script waiting in flock(2) gets its turn.
 */
interface LocalQueue {
  waiters: ((fd: number | undefined) => void)[];
  handovers: number;
}
const queues = new Map<string, LocalQueue>();

/** Hand-overs in a row within this process before a release goes to the kernel. */
export const MAX_HANDOVERS = 8;

/** Wait in this process's queue: the lock handed over (its fd), or undefined when it is this task's turn to ask the kernel. */
function waitLocal(path: string, q: LocalQueue, deadline: number, timeoutMs: number): Promise<number | undefined> {
  return new Promise((resolveWait, reject) => {
    const wake = (fd: number | undefined): void => {
      clearTimeout(timer);
      resolveWait(fd);
    };
    const timer = setTimeout(
      () => {
        const i = q.waiters.indexOf(wake);
        if (i >= 0) q.waiters.splice(i, 1);
        let detail = '';
        try {
          detail = holderDetail(path);
        } catch {
          // Only for the message: a path that cannot be looked at names no holder.
        }
        reject(new LockTimeoutError(path, timeoutMs, detail));
      },
      // setTimeout's longest delay; a longer lock_timeout_ms would otherwise fire at once.
      Math.min(Math.max(0, deadline - Date.now()), 2 ** 31 - 1),
    );
    q.waiters.push(wake);
  });
}

/** This task is done asking the kernel (or holding): the next waiter asks next, or the entry goes. */
function passOn(path: string): void {
  const q = queues.get(path);
  if (!q) return;
  q.handovers = 0;
  const next = q.waiters.shift();
  if (next) next(undefined);
  else queues.delete(path);
}

async function lockLoop(rawPath: string, opts: LockOptions, mode: 'wait' | 'try'): Promise<HeldLock | null> {
  const path = resolve(rawPath);
  const timeoutMs = opts.timeoutMs ?? DEFAULT_LOCK_TIMEOUT_MS;
  if (!Number.isFinite(timeoutMs) || timeoutMs < 0)
    throw new RangeError(`lock ${path}: timeoutMs must be >= 0, got ${timeoutMs}`);
  const deadline = Date.now() + timeoutMs;
  const q = queues.get(path);
  if (q) {
    if (mode === 'try') return null;
    const fd = await waitLocal(path, q, deadline, timeoutMs);
    if (fd !== undefined) return heldLock(path, fd);
  } else queues.set(path, { waiters: [], handovers: 0 });
  let got: HeldLock | null = null;
  try {
    got = await kernelLoop(path, opts, mode, deadline, timeoutMs);
    return got;
  } finally {
    if (!got) passOn(path);
  }
}

/** Xen's locking.sh protocol through flock(1), for the one task of this process asking now. */
async function kernelLoop(
  path: string,
  opts: LockOptions,
  mode: 'wait' | 'try',
  deadline: number,
  timeoutMs: number,
): Promise<HeldLock | null> {
  const run = runnerOf(opts);
  mkdirSync(dirname(path), { recursive: true, mode: 0o755 });

  for (let attempt = 1; ; attempt++) {
    const fd = openSync(path, fsc.O_WRONLY | fsc.O_CREAT | fsc.O_APPEND, 0o644);
    let keep = false;
    try {
      const left = Math.max(0, deadline - Date.now());
      // -n when there is no time left: one last look without blocking.
      const args = left <= 0 ? ['-x', '-n', '3'] : ['-x', '-w', (left / 1000).toFixed(3), '3'];
      const r = await run.probe('flock', args, { extraFds: [fd], timeoutMs: left + 5_000 });
      if (r.failed) {
        // flock(1) exits 1 on a conflict (-n) or when -w runs out; usage and system errors use
        // sysexits codes (64 and up).
        if (r.exitCode === 1 || r.timedOut) {
          if (mode === 'try') return null;
          throw new LockTimeoutError(path, timeoutMs, holderDetail(path));
        }
        throw new Error(`cannot lock ${path}: ${describeFailure(r)}`);
      }
      if (sameFile(fstatSync(fd), statOrNull(path))) {
        keep = true;
        heldHere.add(path);
        return heldLock(path, fd);
      }
      // We locked a file that its holder unlinked while we waited: not the lock. Try again.
    } finally {
      if (!keep) closeSync(fd);
    }
    if (mode === 'try' && attempt >= 3) return null;
  }
}

function heldLock(path: string, fd: number): HeldLock {
  let released = false;
  return {
    path,
    async release() {
      if (released) return;
      released = true;
      const q = queues.get(path);
      // Still the lock (nobody broke the rule and removed the file): the next task of this
      // process takes it over as it is. A path that cannot be looked at is released for real.
      let stillOurs = false;
      try {
        stillOurs = sameFile(fstatSync(fd), statOrNull(path));
      } catch {
        stillOurs = false;
      }
      if (q && q.waiters.length && q.handovers < MAX_HANDOVERS && stillOurs) {
        q.handovers += 1;
        (q.waiters.shift() as (fd: number) => void)(fd);
        return;
      }
      heldHere.delete(path);
      try {
        // Unlink only the file we hold: if the rule "only the holder unlinks" was broken by
        // someone (an admin's rm), the path may name another holder's file by now.
        if (stillOurs) unlinkSync(path);
      } finally {
        try {
          closeSync(fd);
        } finally {
          passOn(path);
        }
      }
    },
  };
}

function statOrNull(path: string): Stats | null {
  try {
    return statSync(path);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw e;
  }
}

function sameFile(a: Stats, b: Stats | null): boolean {
  return b !== null && a.dev === b.dev && a.ino === b.ino;
}

function formatMs(ms: number): string {
  return ms % 1000 === 0 ? `${ms / 1000} s` : `${ms} ms`;
}

function holderDetail(path: string): string {
  if (heldHere.has(path))
    return ' (this process holds it: another of its events, or this one, since locks are not re-entrant)';
  const holders = lockHolders(path);
  if (holders.length === 0) return '';
  return ` (held by ${holders.map((h) => `pid ${h.pid} ${h.command}`).join(', ')})`;
}

export interface LockHolder {
  pid: number;
  command: string;
}

/**
 * Processes that hold the flock on the file now linked at `path`, found through /proc: an fd
 * onto the file whose fdinfo shows a lock line (waiters have the fd but no lock line). Best
 * effort, for error messages: empty when /proc is not readable or the holder already left.
 */
export function lockHolders(path: string): LockHolder[] {
  const target = statOrNull(path);
  if (!target) return [];
  const out: LockHolder[] = [];
  let pids: string[];
  try {
    pids = readdirSync('/proc').filter((p) => /^\d+$/.test(p));
  } catch {
    return [];
  }
  for (const pid of pids) {
    if (Number(pid) === process.pid) continue;
    let fds: string[];
    try {
      fds = readdirSync(`/proc/${pid}/fd`);
    } catch {
      continue;
    }
    for (const fd of fds) {
      try {
        if (readlinkSync(`/proc/${pid}/fd/${fd}`) !== path) continue;
        const st = statSync(`/proc/${pid}/fd/${fd}`);
        if (st.dev !== target.dev || st.ino !== target.ino) continue;
        if (!/^lock:\s.*FLOCK/m.test(readFileSync(`/proc/${pid}/fdinfo/${fd}`, 'utf8'))) continue;
        const command = readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0').filter(Boolean).join(' ');
        // An empty command line is a process that is exiting (our own flock helper, usually):
        // it holds nothing a person could act on.
        if (command === '') break;
        out.push({ pid: Number(pid), command });
        break;
      } catch {
        // The process or fd went away while we looked.
      }
    }
  }
  return out;
}
