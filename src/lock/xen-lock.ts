/**
 * Xen's global `block` lock as the drop-in `block` takes it (the runtime for its whole add or
 * remove, or the backend itself when called without it): the wait is what is left of libxl's
 * budget (xenLockWaitMs, src/lock/flock.ts) after the event's age (eventAgeMs), and a wait that
 * runs out is a hotplug-error saying why.
 */
import type { Runner } from '../devices/runner.js';
import { HotplugError } from '../disk/errors.js';
import { acquireFlock, LockTimeoutError, xenBlockLockPath, xenLockWaitMs, type HeldLock } from './flock.js';

/** The variable the installed wrapper exports: its start, as bash's $EPOCHREALTIME. */
export const STARTED_ENV = 'XEN_BLOCKHOOKS_STARTED';

/**
 * How long ago the event began: since the wrapper Xen ran started (STARTED_ENV), which is when
 * libxl's 40 s began, whether the event then waited for the service or ran here; without it,
 * since this process started. A value outside the last two minutes (inherited from a shell, a
 * clock step) is not this event's and is ignored.
 */
export function eventAgeMs(env: NodeJS.ProcessEnv, nowMs = Date.now(), uptimeMs = process.uptime() * 1000): number {
  const m = /^(\d{9,11})(?:[.,](\d{1,9}))?$/.exec(env[STARTED_ENV] ?? '');
  if (m) {
    const age = nowMs - (Number(m[1]) * 1000 + Number((m[2] ?? '').padEnd(3, '0').slice(0, 3)));
    if (age >= 0 && age <= 120_000) return age;
  }
  return uptimeMs;
}

export async function takeXenBlockLock(
  where: string,
  config: { xenLockDir: string; lockTimeoutMs: number },
  run: Runner,
  ageMs: number = process.uptime() * 1000,
): Promise<HeldLock> {
  try {
    return await acquireFlock(xenBlockLockPath(config.xenLockDir), {
      timeoutMs: xenLockWaitMs(config.lockTimeoutMs, ageMs),
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
