/**
 * dm-thin specifics on top of dmsetup.ts: pool messages (create_thin, delete), the pool table
 * this project always uses (`error_if_no_space`: a full pool fails writes at once instead of
 * queueing them for 60 s), sizes, and the pool usage numbers the watcher needs.
 *
 * Kernel facts (Documentation/admin-guide/device-mapper/thin-provisioning.rst, 6.1):
 *   - a metadata device whose first block is zero is formatted when the pool is first loaded;
 *   - `create_thin <id>` fails with EEXIST for an id the metadata already holds, `delete <id>`
 *     with ENODATA for one it does not (dmsetup prints "error ... No data available");
 *   - growing the data or metadata device: enlarge it, then reload the pool with the new length
 *     (data) and resume; the pool picks up a grown metadata device at resume too.
 */
import { CommandError, type Runner } from './runner.js';
import {
  messageArgs,
  parseStatus,
  parseThinPoolStatus,
  statusArgs,
  thinPoolTable,
  type DevRef,
  type ThinPoolStatus,
} from './dmsetup.js';

/** Sectors of one pool data block for a block size in KiB (a multiple of 64 KiB). */
export function blockSectors(blockKiB: number): number {
  if (!Number.isInteger(blockKiB) || blockKiB < 64 || blockKiB % 64 !== 0 || blockKiB > 1024 * 1024) {
    throw new Error(`thin pool block size must be a multiple of 64K up to 1G, got ${blockKiB}K`);
  }
  return blockKiB * 2;
}

/** The pool's length: the data device's sectors rounded down to whole blocks. */
export function poolSectors(dataBytes: bigint | number, blockKiB: number): bigint {
  const per = BigInt(blockSectors(blockKiB));
  const sectors = BigInt(dataBytes) / 512n;
  return (sectors / per) * per;
}

/** The table of every pool this project builds: no low-water event, error_if_no_space always. */
export function poolTable(lengthSectors: bigint, metadata: DevRef, data: DevRef, blockKiB: number): string {
  return thinPoolTable({ length: lengthSectors }, metadata, data, {
    blockSectors: blockSectors(blockKiB),
    lowWaterBlocks: 0,
    errorIfNoSpace: true,
  });
}

export function createThinArgs(pool: string, id: number): string[] {
  checkId(id);
  return messageArgs(pool, 0, 'create_thin', String(id));
}

export function deleteThinArgs(pool: string, id: number): string[] {
  checkId(id);
  return messageArgs(pool, 0, 'delete', String(id));
}

function checkId(id: number): void {
  if (!Number.isInteger(id) || id < 0 || id > 0xffffff)
    throw new Error(`thin device id must be 0..16777215, got ${id}`);
}

/** The lowest id at or above 0 not in `used`. */
export function freeThinId(used: Iterable<number>): number {
  const u = new Set(used);
  for (let i = 0; i <= 0xffffff; i++) if (!u.has(i)) return i;
  throw new Error('no free thin device id');
}

export function isExists(stderr: string): boolean {
  return /File exists/i.test(stderr);
}

export function isNoData(stderr: string): boolean {
  return /No data available/i.test(stderr);
}

/** `create_thin`: 'created', or 'exists' when the metadata already holds the id. */
export async function createThin(run: Runner, pool: string, id: number): Promise<'created' | 'exists'> {
  const r = await run.probe('dmsetup', createThinArgs(pool, id));
  if (!r.failed) return 'created';
  if (isExists(r.stderr)) return 'exists';
  throw new CommandError(r);
}

/** `delete`: true when deleted, false when the pool holds no such id. */
export async function deleteThin(run: Runner, pool: string, id: number): Promise<boolean> {
  const r = await run.probe('dmsetup', deleteThinArgs(pool, id));
  if (!r.failed) return true;
  if (isNoData(r.stderr)) return false;
  throw new CommandError(r);
}

export async function poolStatus(run: Runner, pool: string): Promise<ThinPoolStatus> {
  const lines = parseStatus((await run.run('dmsetup', statusArgs(pool))).stdout);
  const l = lines[0];
  if (!l || l.target !== 'thin-pool') throw new Error(`${pool} is not a thin-pool device (${l?.target ?? 'no table'})`);
  return parseThinPoolStatus(l.params);
}

export interface PoolUsage {
  dataPercent: number;
  metadataPercent: number;
  /** out_of_data_space, or ro (metadata full / error), or needs_check, or Fail/Error. */
  problem: string | undefined;
}

export function poolUsage(s: ThinPoolStatus): PoolUsage {
  if (s.state !== 'ok')
    return { dataPercent: 100, metadataPercent: 100, problem: s.state === 'fail' ? 'Fail' : 'Error' };
  const pct = (a: bigint, b: bigint) => (b === 0n ? 100 : Number((a * 10000n) / b) / 100);
  const problem =
    s.mode === 'out_of_data_space'
      ? 'out of data space'
      : s.mode === 'ro'
        ? 'read-only (metadata full or failed)'
        : s.needsCheck
          ? 'needs_check'
          : undefined;
  return {
    dataPercent: pct(s.usedDataBlocks, s.totalDataBlocks),
    metadataPercent: pct(s.usedMetadataBlocks, s.totalMetadataBlocks),
    problem,
  };
}
