/**
 * Single-instance guard for long-running commands (`xen-blockhooks watch`).
 *
 * The guard is a flock with the protocol of flock.ts, taken without waiting and held for the
 * life of the process. proper-lockfile was the other candidate, since a takeover after N
 * seconds is acceptable for a daemon; it is still the worse tool here:
 *   - a SIGKILLed or crashed daemon's flock is gone at once, so a restart (systemd
 *     Restart=, an admin) succeeds immediately instead of failing until `stale` expires;
 *   - proper-lockfile keeps its lock alive with a heartbeat timer; a daemon whose event loop is
 *     blocked longer than `stale` (a slow synchronous call, a suspended VM) gets ECOMPROMISED,
 *     by default an uncaught exception that kills the daemon;
 *   - it installs signal-exit handlers at import time, in every hook that bundles it.
 * Its one strength, mkdir being atomic on NFS, is irrelevant for a lock in /run. So the project
 * uses flock for every lock and proper-lockfile for none.
 */
import { tryAcquireFlock, type HeldLock, type LockOptions } from './flock.js';

export class AlreadyRunningError extends Error {
  readonly path: string;
  constructor(path: string, what: string) {
    super(`${what} is already running (lock ${path} is held)`);
    this.name = 'AlreadyRunningError';
    this.path = path;
  }
}

/** Take the guard at `path` or throw AlreadyRunningError. Release it on orderly shutdown. */
export async function claimSingleInstance(
  path: string,
  what: string,
  opts: Omit<LockOptions, 'timeoutMs'> = {},
): Promise<HeldLock> {
  const lock = await tryAcquireFlock(path, opts);
  if (!lock) throw new AlreadyRunningError(path, what);
  return lock;
}
