/**
 * `xen-blockhooks grow DOMAIN VDEV [+]SIZE`: enlarge what backs one disk while the guest runs,
 * through the growth logic in src/grow (the same code the watcher uses), under the disk's
 * backend-path lock so no hook works on it meanwhile.
 */
import { mkdirSync } from 'node:fs';
import { dirname } from 'node:path';
import type { Config } from '../config/config.js';
import type { Runner } from '../devices/runner.js';
import { growStore, GrowError, type GrowAction, type GrowSize } from '../grow/index.js';
import { Journal, type JournalEntry } from '../journal/journal.js';
import { acquireFlock } from '../lock/flock.js';
import type { Logger } from '../log/logger.js';
import { notASize, sizeBytes } from '../units/size.js';
import { humanBytes } from './format.js';
import { domidOfPath } from './inventory.js';
import { pathLockPath } from '../lock/paths.js';

export { GrowError };

export const GROW_HELP = `Usage: xen-blockhooks grow DOMAIN VDEV [+]SIZE [--metadata]

Enlarge what backs one disk, online. DOMAIN is the domain id or name, VDEV the guest's disk
name (xvda). SIZE with + is added (+512M, +2G; bare numbers are MiB), without + it is the new
total. Nothing ever shrinks.

  block-cow     the sparse store file is extended and its loop device re-read (losetup -c); the
                snapshot sees the new size immediately, no reload. A store that already
                overflowed (Invalid) cannot be saved by growing: the device must be rebuilt.
  block-thin    the shared pool's data file (or, with --metadata, its metadata) is extended and
                the pool reloaded; every thin disk of the pool gains the room.
  block-lvsnap  the snapshot LV is extended (lvextend), or the thin pool under a thin snapshot.

Options:
  --metadata  block-thin / thin LVs: grow the pool's metadata instead of its data
  -h, --help  this text

Exit status: 0 grown, 1 could not grow (why is printed), 2 bad usage (a bad SIZE or VDEV too).`;

/**
 * `+512M` (added) or `4G` (the new total), in the one size grammar (src/units/size.ts), a bare
 * number MiB → bytes (rounded up to a whole byte). Throws GrowError naming the word and the grammar.
 */
export function parseGrowSize(s: string): GrowSize {
  const relative = s.startsWith('+');
  const bytes = sizeBytes(relative ? s.slice(1) : s);
  if (bytes === undefined) throw new GrowError(`${notASize(s)}; a + in front adds it to the current size (+512M)`);
  if (bytes <= 0) throw new GrowError(`"${s}" must be more than zero`);
  return { relative, bytes };
}

export function findRecord(entries: JournalEntry[], domain: string, vdev: string): JournalEntry {
  const byDomain = (e: JournalEntry) => {
    const id = e.disk.frontendId ?? domidOfPath(e.backendPath);
    return /^\d+$/.test(domain) ? id === Number(domain) : e.disk.domainName === domain;
  };
  const matches = entries.filter((e) => byDomain(e) && e.disk.vdev === vdev);
  if (matches.length === 0) {
    const known = entries
      .map((e) => `${e.disk.domainName ?? e.disk.frontendId ?? '?'}/${e.disk.vdev ?? '?'}`)
      .join(', ');
    throw new GrowError(
      `no device recorded for domain ${domain}, vdev ${vdev}${known ? ` (recorded: ${known})` : ' (nothing is recorded)'}`,
    );
  }
  if (matches.length > 1)
    throw new GrowError(`domain ${domain}, vdev ${vdev} matches ${matches.length} records; use the domain id`);
  return matches[0] as JournalEntry;
}

export interface GrowDeps {
  config: Config;
  run: Runner;
  log: Logger;
  out: (s: string) => void;
  journal?: Journal;
}

/**
 * Run `fn` on DOMAIN/VDEV's record as it is under the disk's backend-path lock (the hooks'
 * own lock: no add or remove of that disk runs meanwhile).
 */
export async function withRecord<T>(
  domain: string,
  vdev: string,
  deps: GrowDeps,
  journal: Journal,
  fn: (entry: JournalEntry) => Promise<T>,
): Promise<T> {
  const entry = findRecord(journal.list().entries, domain, vdev);
  const lockFile = pathLockPath(deps.config.stateDir, entry.backendPath);
  mkdirSync(dirname(lockFile), { recursive: true, mode: 0o700 });
  const lock = await acquireFlock(lockFile, { timeoutMs: 5000, runner: deps.run });
  try {
    const fresh = journal.load(entry.backendPath);
    if (!fresh) throw new GrowError(`${entry.backendPath} was removed meanwhile`);
    return await fn(fresh);
  } finally {
    await lock.release();
  }
}

export async function grow(
  domain: string,
  vdev: string,
  sizeArg: string,
  deps: GrowDeps,
  opts: { metadata?: boolean } = {},
): Promise<GrowAction> {
  const size = parseGrowSize(sizeArg);
  return withRecord(domain, vdev, deps, deps.journal ?? new Journal(deps.config.stateDir), async (entry) => {
    const action = await growStore(entry, size, deps, { part: opts.metadata ? 'metadata' : 'data' });
    deps.out(
      `grew ${domain}/${vdev}: ${action.target} ${humanBytes(action.beforeBytes)} → ${humanBytes(action.afterBytes)}, online`,
    );
    return action;
  });
}
