/**
 * Success and failure as the toolstack reads them.
 *
 * Success, in one transaction: physical-device-path, node, then physical-device (lowercase hex
 * `maj:min`, written once, after the device is fully built: blkback watches it and refuses a later
 * change) and hotplug-status=connected; a hotplug-error left by an earlier failed attempt is removed.
 *
 * Failure, in one transaction (block-common.sh's fatal()/ebusy()): hotplug-error = one sentence,
 * hotplug-status = error|busy. libxl reads hotplug-error when the script exits non-zero and prints
 * it as `script: <sentence>`.
 */
import type { XsOps, XenstoreClient } from '../xenstore/types.js';
import type { BuiltDevice } from '../backends/types.js';
import type { FailureStatus } from '../disk/errors.js';

export function physicalDevice(major: number, minor: number): string {
  return `${major.toString(16)}:${minor.toString(16)}`;
}

export async function reportSuccess(xs: XenstoreClient, path: string, dev: BuiltDevice): Promise<void> {
  // Sent at once, answered in order: the daemon applies them in that order, and all become
  // visible together at the commit.
  await xs.transaction(async (tx: XsOps) => {
    await Promise.all([
      tx.write(`${path}/physical-device-path`, dev.path),
      tx.write(`${path}/node`, dev.node ?? dev.path),
      tx.write(`${path}/physical-device`, physicalDevice(dev.major, dev.minor)),
      tx.write(`${path}/hotplug-status`, 'connected'),
      tx.rm(`${path}/hotplug-error`),
    ]);
  });
}

/**
 * xenstore refuses a request over 4096 bytes (path and value): a sentence quoting huge params is
 * cut in the middle, so that its start (what) and its end (why, what to do) both survive.
 */
export const MAX_ERROR_BYTES = 2048;

export function fitError(message: string): string {
  if (Buffer.byteLength(message) <= MAX_ERROR_BYTES) return message;
  const chars = [...message];
  let keep = Math.floor(MAX_ERROR_BYTES / 2) - 32;
  const fits = (n: number) => `${chars.slice(0, n).join('')} […] ${chars.slice(-n).join('')}`;
  while (Buffer.byteLength(fits(keep)) > MAX_ERROR_BYTES) keep -= 16;
  return fits(keep);
}

export async function reportFailure(
  xs: XenstoreClient,
  path: string,
  message: string,
  status: FailureStatus,
): Promise<void> {
  await xs.transaction(async (tx: XsOps) => {
    await Promise.all([
      tx.write(`${path}/hotplug-error`, fitError(message)),
      tx.write(`${path}/hotplug-status`, status),
    ]);
  });
}
