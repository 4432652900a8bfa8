/**
 * The vocabulary of the grow and watch facets (Backend.grow, Backend.watch): what a growth did,
 * what a watch pass found, and the size arithmetic every hook shares. The hooks implement the
 * facets in their own files; src/grow finds them through the registry and never looks inside.
 */
import type { Config } from '../config/config.js';
import type { Runner } from '../devices/runner.js';
import { recordStrings, type Journal, type JournalEntry } from '../journal/journal.js';
import type { Logger } from '../log/logger.js';

export class GrowError extends Error {
  override name = 'GrowError';
}

/** `+512M` (relative) or `4G` (the new total), as the CLI parses it. */
export interface GrowSize {
  relative: boolean;
  bytes: number;
}

export interface GrowDeps {
  config: Config;
  run: Runner;
  log: Logger;
}

export interface GrowAction {
  backendPath: string;
  script: string;
  /** What grew: a store file, the pool's data or metadata, an LV. */
  kind: 'cow-store' | 'thin-data' | 'thin-metadata' | 'lv' | 'lv-pool-data' | 'lv-pool-metadata';
  /** The file or LV that grew. */
  target: string;
  beforeBytes: number;
  afterBytes: number;
}

export interface GrowOptions {
  /** A pool's data (default) or its metadata. */
  part?: 'data' | 'metadata';
}

export type FindingState = 'ok' | 'grown' | 'invalid' | 'full' | 'busy' | 'error';

export interface WatchFinding {
  backendPath: string;
  script: string;
  /** The dm device, store, pool or LV looked at. */
  device: string;
  /** Percent in use before any growth, when known. */
  usedPercent?: number;
  state: FindingState;
  message: string;
}

/** What one hook's watch of one disk (or of its shared pool) reports back. */
export interface WatchOutcome {
  findings: WatchFinding[];
  grown: GrowAction[];
}

/**
 * The end of one disk's watch pass once its store is known to be sound: `used` percent below
 * watch.threshold is a finding 'ok'; at or past it the store is grown once and the finding says how.
 */
export async function growPastThreshold(
  out: WatchOutcome,
  at: Omit<WatchFinding, 'state' | 'message' | 'usedPercent'>,
  used: number,
  deps: GrowDeps,
  how: { store: string; grow: () => Promise<GrowAction>; grown: string },
): Promise<WatchOutcome> {
  const threshold = deps.config.watch.thresholdPercent;
  if (used < threshold) {
    out.findings.push({ ...at, usedPercent: used, state: 'ok', message: `${used}% of the ${how.store} used` });
    return out;
  }
  const g = await how.grow();
  out.grown.push(g);
  out.findings.push({
    ...at,
    usedPercent: used,
    state: 'grown',
    message: `${used}% used ≥ ${threshold}%: ${how.grown} ${g.afterBytes} bytes`,
  });
  return out;
}

export const MiB = 1048576;

export function human(n: number): string {
  if (n >= 1024 * MiB && n % (1024 * MiB) === 0) return `${n / (1024 * MiB)} GiB`;
  if (n >= MiB) return `${Math.round((n / MiB) * 10) / 10} MiB`;
  return `${n} B`;
}

/** `domain/vdev` of a record, for log lines. */
export function diskLabel(entry: JournalEntry): string {
  return `${entry.disk.domainName ?? entry.disk.frontendId ?? '?'}/${entry.disk.vdev ?? '?'}`;
}

/** The new size: `size` applied to `current`, or `current` grown by the configured step. */
export function targetBytes(current: number, size: GrowSize | undefined, stepPercent: number, align: number): number {
  let t: number;
  if (size === undefined) t = current + Math.max(align, Math.ceil((current * stepPercent) / 100));
  else t = size.relative ? current + size.bytes : size.bytes;
  return Math.ceil(t / align) * align;
}

/** used/total as a percentage with two decimals; an empty total counts as full. */
export function percent(used: bigint, total: bigint): number {
  return total === 0n ? 100 : Number((used * 10000n) / total) / 100;
}

export interface ResizeDeps extends GrowDeps {
  journal: Journal;
  /** The administrator asked for a smaller disk (`--shrink`); a hook that cannot prove it safe refuses. */
  shrink: boolean;
}

/** What a resize did. */
export interface ResizeResult {
  backendPath: string;
  script: string;
  /** What grew: the file, LV, volume or image whose size the guest sees. */
  target: string;
  beforeBytes: number;
  afterBytes: number;
  /** The guest sees the new size now (blkback passes a device's new size on to a running PV guest); false: at the next add. */
  online: boolean;
  /** How, in a few words (for the log and the CLI). */
  how: string;
}

/** `bytes` rounded up to whole MiB. */
export function wholeMiB(bytes: number): number {
  return Math.ceil(bytes / MiB) * MiB;
}

/** A detached disk's file (store, volume list, overlay, image): refused while a record names it. */
export function refuseIfRecorded(journal: Journal, path: string, what: string): void {
  const user = journal.list().entries.find((e) => recordStrings(e).has(path));
  if (user)
    throw new GrowError(
      `${what} ${path} is attached (${user.backendPath}): resize it through its domain and vdev instead`,
    );
}
