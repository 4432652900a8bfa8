/**
 * Names of our own finer locks. They live in `<stateDir>/locks/` and use the same protocol as
 * Xen's `block` lock (flock.ts), so a SIGKILLed holder never blocks anyone.
 *
 *   base-<dev>-<ino>   one read-only base image (dev and inode in decimal: hard links and
 *                      different spellings of one path share the lock)
 *   pool-<name>        one thin pool (creating, growing, allocating thin ids)
 *   nbd                choosing a free /dev/nbdN and connecting qemu-nbd to it
 *   path-<journal key> one backend path: its add, remove, gc and grow (the journal's file name)
 *   rbd-<pool>-<image> one RBD clone
 *   watch              the single `xen-blockhooks watch` of this host
 *
 * Order when several are needed: base image, then thin pool, then nbd, then Xen's `block`.
 */
import { join } from 'node:path';
import type { Config } from '../config/config.js';
import type { Runner } from '../devices/runner.js';
import { backendPathKey } from '../disk/request.js';

const NAME = /^[A-Za-z0-9][A-Za-z0-9._:+@=-]{0,127}$/;

/** `<stateDir>/locks/<name>`; the name must be a plain file name (no `/`, no leading dot). */
export function stateLockPath(stateDir: string, name: string): string {
  if (!NAME.test(name)) throw new Error(`invalid lock name ${JSON.stringify(name)}`);
  return join(stateDir, 'locks', name);
}

/** The lock of one base image, keyed by its file identity (st_dev, st_ino). */
export function baseImageLockPath(stateDir: string, id: { dev: number | bigint; ino: number | bigint }): string {
  return stateLockPath(stateDir, `base-${BigInt(id.dev)}-${BigInt(id.ino)}`);
}

/** The lock of one thin pool (its dm name). */
export function thinPoolLockPath(stateDir: string, poolName: string): string {
  return stateLockPath(stateDir, `pool-${poolName}`);
}

/** The lock of one backend path (held around its add, remove, gc and grow). */
export function pathLockPath(stateDir: string, backendPath: string): string {
  return join(stateDir, 'locks', `path-${backendPathKey(backendPath)}`);
}

/** The single watcher's lock. */
export function watchLockPath(stateDir: string): string {
  return stateLockPath(stateDir, 'watch');
}

/** The configured wait for a lock, and the runner that runs flock: what acquireFlock takes. */
export function lockOptions(config: Pick<Config, 'lockTimeoutMs'>, run: Runner): { timeoutMs: number; runner: Runner } {
  return { timeoutMs: config.lockTimeoutMs, runner: run };
}

/** The lock around choosing and connecting an nbd device. */
export function nbdLockPath(stateDir: string): string {
  return stateLockPath(stateDir, 'nbd');
}
