/**
 * Single-instance guard for long-running commands (`xen-blockhooks watch`).
 *
 * The guard is a flock with the protocol of flock.ts, taken without waiting and held for the
 * life of the process. Not proper-lockfile: a crashed daemon's flock is gone at once, so a restart
 * succeeds immediately; there is no heartbeat whose stall (a blocked event loop, a suspended VM)
 * kills the daemon; and mkdir's atomicity on NFS does not matter for a lock in /run.
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
