/**
 * `xen-blockhooks grow DOMAIN VDEV +SIZE`: enlarge a device's copy-on-write store while the
 * guest runs. block-cow's file store: extend the sparse file, then `losetup -c` so the loop
 * device (and the dm snapshot above it) sees the new size at once, without a reload.
 */
import { mkdirSync, statSync, truncateSync } from 'node:fs';
import { dirname } from 'node:path';
import type { Config } from '../config/config.js';
import type { Runner } from '../devices/runner.js';
import { Journal, journalFileName, type JournalEntry } from '../journal/journal.js';
import { acquireFlock } from '../lock/flock.js';
import type { Logger } from '../log/logger.js';
import { humanBytes, parseGrowSize } from './format.js';
import { domidOfPath, lockFileFor, recordStrings } from './inventory.js';
import { parseUsage, readKernel } from './kernel.js';

export const GROW_HELP = `Usage: xen-blockhooks grow DOMAIN VDEV [+]SIZE

Enlarge the copy-on-write store of one disk, online. DOMAIN is the domain id or name, VDEV the
guest's disk name (xvda). SIZE with + is added to the store (+512M, +2G; bare numbers are MiB),
without + it is the new total. Stores never shrink.

  block-cow   the sparse store file is extended and its loop device re-read (losetup -c); the
              snapshot sees the new size immediately, no reload. A store that already overflowed
              (Invalid) cannot be saved by growing: the device must be rebuilt.
  others      not supported yet (the command says so and changes nothing).

Options:
  -h, --help  this text

Exit status: 0 grown, 1 could not grow (why is printed), 2 bad usage.`;

export class GrowError extends Error {
  override name = 'GrowError';
}

export function findRecord(entries: JournalEntry[], domain: string, vdev: string): JournalEntry {
  const byDomain = (e: JournalEntry) => {
    const id = e.disk.frontendId ?? domidOfPath(e.backendPath);
    return /^\d+$/.test(domain) ? id === Number(domain) : e.disk.domainName === domain;
  };
  const matches = entries.filter((e) => byDomain(e) && e.disk.vdev === vdev);
  if (matches.length === 0) {
    const known = entries.map((e) => `${e.disk.domainName ?? e.disk.frontendId ?? '?'}/${e.disk.vdev ?? '?'}`).join(', ');
    throw new GrowError(`no device recorded for domain ${domain}, vdev ${vdev}${known ? ` (recorded: ${known})` : ' (nothing is recorded)'}`);
  }
  if (matches.length > 1) throw new GrowError(`domain ${domain}, vdev ${vdev} matches ${matches.length} records; use the domain id`);
  return matches[0] as JournalEntry;
}

export interface GrowDeps {
  config: Config;
  run: Runner;
  log: Logger;
  out: (s: string) => void;
  journal?: Journal;
}

/** Grow the store of one block-cow device. Returns the new size in bytes. */
export async function growCow(entry: JournalEntry, sizeArg: string, deps: GrowDeps): Promise<number> {
  const size = parseGrowSize(sizeArg);
  if (!size) throw new GrowError(`"${sizeArg}" is not a size such as +512M or 4G`);
  const storeDir = deps.config.storeDir.replace(/\/+$/, '');
  const files = [...recordStrings(entry)].filter((s) => s.startsWith(`${storeDir}/`));
  const kernel = await readKernel(deps.run);
  const loop = kernel.loops.find((l) => l.backFile !== undefined && files.includes(l.backFile));
  if (!loop || !loop.backFile) {
    if (entry.disk.mode === 'r') throw new GrowError(`${entry.disk.domainName ?? entry.disk.frontendId}/${entry.disk.vdev} is read-only and has no store to grow`);
    throw new GrowError(`no loop device in the kernel serves a store of ${entry.backendPath} (store files recorded: ${files.join(', ') || 'none'})`);
  }
  const store = loop.backFile;
  const dm = entry.device ? kernel.dm.find((d) => d.major === entry.device?.major && d.minor === entry.device?.minor) : undefined;
  const usage = dm ? parseUsage(dm.status, dm.table) : undefined;
  if (usage?.problem) throw new GrowError(`${dm?.name} is ${usage.problem}: growing cannot bring back a snapshot the kernel dropped; remove and add the disk again`);
  const current = statSync(store).size;
  const target = size.relative ? current + size.bytes : size.bytes;
  if (target <= current) throw new GrowError(`${store} is already ${humanBytes(current)}; the new size ${humanBytes(target)} is not larger (stores never shrink)`);
  if (target % 512 !== 0) throw new GrowError(`the new size must be a multiple of 512 bytes`);
  truncateSync(store, target);
  try {
    await deps.run.run('losetup', ['-c', loop.name]);
  } catch (e) {
    throw new GrowError(`extended ${store} to ${humanBytes(target)} but ${loop.name} did not take the new size: ${(e as Error).message}`);
  }
  deps.log.info(`grow ${entry.backendPath}: store ${store} ${humanBytes(current)} → ${humanBytes(target)} (${loop.name} re-read)`);
  if (dm) {
    const after = (await readKernel(deps.run)).dm.find((d) => d.name === dm.name);
    const u = after ? parseUsage(after.status, after.table) : undefined;
    if (u?.total !== undefined) deps.out(`${dm.name}: store now ${humanBytes(u.total * 512)}, ${u.used !== undefined ? `${((100 * u.used) / u.total).toFixed(1)}% used` : ''}`);
  }
  return target;
}

export async function grow(domain: string, vdev: string, sizeArg: string, deps: GrowDeps): Promise<void> {
  const journal = deps.journal ?? new Journal(deps.config.stateDir);
  const entry = findRecord(journal.list().entries, domain, vdev);
  if (entry.script !== 'block-cow') {
    throw new GrowError(`growing is not supported for ${entry.script} yet (only block-cow file stores); nothing was changed`);
  }
  if (entry.phase !== 'ready') throw new GrowError(`${entry.backendPath} is ${entry.phase}, not ready; grow it once the add has finished`);
  const lockFile = lockFileFor(deps.config, entry.backendPath, journalFileName);
  mkdirSync(dirname(lockFile), { recursive: true, mode: 0o700 });
  const lock = await acquireFlock(lockFile, { timeoutMs: 5000, runner: deps.run });
  try {
    const fresh = journal.load(entry.backendPath);
    if (!fresh) throw new GrowError(`${entry.backendPath} was removed meanwhile`);
    const bytes = await growCow(fresh, sizeArg, deps);
    deps.out(`grew ${domain}/${vdev} store to ${humanBytes(bytes)} online`);
  } finally {
    await lock.release();
  }
}
