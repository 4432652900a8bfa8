/**
 * Names of our own finer locks. They live in `<stateDir>/locks/` and use the same protocol as
 * Xen's `block` lock (flock.ts), so a SIGKILLed holder never blocks anyone.
 *
 *   base-<dev>-<ino>   one read-only base image (dev and inode in decimal: hard links and
 *                      different spellings of one path share the lock)
 *   pool-<name>        one thin pool (creating, growing, allocating thin ids)
 *   nbd                choosing a free /dev/nbdN and connecting qemu-nbd to it
 *
 * Order when several are needed: base image, then thin pool, then nbd, then Xen's `block`.
 */
import { join } from 'node:path';

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

/** The lock around choosing and connecting an nbd device. */
export function nbdLockPath(stateDir: string): string {
  return stateLockPath(stateDir, 'nbd');
}
