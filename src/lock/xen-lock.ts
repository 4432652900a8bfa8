/**
 * Xen's global `block` lock as the drop-in `block` takes it (the runtime for its whole add or
 * remove, or the backend itself when called without it): the wait is what is left of libxl's
 * budget (xenLockWaitMs, src/lock/flock.ts), and a wait that runs out is a hotplug-error saying why.
 */
import type { Runner } from '../devices/runner.js';
import { HotplugError } from '../disk/errors.js';
import { acquireFlock, LockTimeoutError, xenBlockLockPath, xenLockWaitMs, type HeldLock } from './flock.js';

export async function takeXenBlockLock(
  where: string,
  config: { xenLockDir: string; lockTimeoutMs: number },
  run: Runner,
): Promise<HeldLock> {
  try {
    return await acquireFlock(xenBlockLockPath(config.xenLockDir), {
      timeoutMs: xenLockWaitMs(config.lockTimeoutMs, process.uptime() * 1000),
      runner: run,
    });
  } catch (e) {
    if (!(e instanceof LockTimeoutError)) throw e;
    throw new HotplugError(
      `${where}: Xen's block lock is busy: ${e.message}; other hotplug scripts held it that long (many disks at once on a slow dom0, or one that is stuck); retry, or raise lock_timeout_ms in /etc/xen/blockhooks.conf.`,
      'error',
      { cause: e },
    );
  }
}
