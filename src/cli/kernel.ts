/**
 * What the kernel holds right now: device-mapper devices (name, major:minor, table, status),
 * loop devices and their backing files, connected nbd devices and the process serving each.
 * Read through the Runner (dmsetup, losetup) and /sys; a machine without device-mapper simply
 * has no dm devices (`dmAvailable: false`).
 */
import { readFileSync, readdirSync } from 'node:fs';
import { dmList, dmTablesAndStatus } from '../devices/dmsetup.js';
import { listLoops, type LoopInfo } from '../devices/losetup.js';
import { CommandError, type Runner } from '../devices/runner.js';

export interface DmDevice {
  name: string;
  major: number;
  minor: number;
  /** Table lines without the name, e.g. `0 131072 snapshot 7:0 7:1 N 128`. */
  table: string[];
  /** Status lines without the name, e.g. `0 131072 snapshot 2072/8192 24`. */
  status: string[];
}

/** A loop device as status and gc look at it. */
export type LoopDevice = Pick<LoopInfo, 'name' | 'backFile' | 'major' | 'minor' | 'readOnly'>;

export interface NbdDevice {
  name: string;
  pid: number;
  /** The serving process's command line (qemu-nbd … FILE), when readable. */
  cmdline: string[];
}

export interface KernelState {
  dmAvailable: boolean;
  dm: DmDevice[];
  loops: LoopDevice[];
  nbds: NbdDevice[];
}

/** `name: rest` lines → name → rest lines. */
function parseNamedLines(text: string): Map<string, string[]> {
  const out = new Map<string, string[]>();
  for (const line of text.split('\n')) {
    const i = line.indexOf(': ');
    if (i <= 0) continue;
    const name = line.slice(0, i);
    const rest = line.slice(i + 2).trim();
    const list = out.get(name) ?? [];
    list.push(rest);
    out.set(name, list);
  }
  return out;
}

export async function readDm(run: Runner): Promise<{ available: boolean; devices: DmDevice[] }> {
  const list = await dmList(run);
  if (!list.available || list.devices.length === 0) return { available: list.available, devices: [] };
  const { tables, status } = await dmTablesAndStatus(run);
  const t = parseNamedLines(tables);
  const st = parseNamedLines(status);
  return {
    available: true,
    devices: list.devices.map((d) => ({
      name: d.name,
      major: d.major,
      minor: d.minor,
      table: t.get(d.name) ?? [],
      status: st.get(d.name) ?? [],
    })),
  };
}

export async function readLoops(run: Runner): Promise<LoopDevice[]> {
  try {
    return await listLoops(run);
  } catch (e) {
    if (e instanceof CommandError && e.result.exitCode === undefined) return []; // no losetup here
    throw e;
  }
}

export function readNbds(sysBlock = '/sys/block'): NbdDevice[] {
  const out: NbdDevice[] = [];
  let names: string[];
  try {
    names = readdirSync(sysBlock).filter((n) => /^nbd\d+$/.test(n));
  } catch {
    return out;
  }
  for (const n of names) {
    let pid: number;
    try {
      pid = Number(readFileSync(`${sysBlock}/${n}/pid`, 'utf8').trim());
    } catch {
      continue; // not connected
    }
    let cmdline: string[] = [];
    try {
      cmdline = readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0').filter(Boolean);
    } catch {
      /* gone or not ours to read */
    }
    out.push({ name: `/dev/${n}`, pid, cmdline });
  }
  return out;
}

export async function readKernel(run: Runner): Promise<KernelState> {
  const [dm, loops] = await Promise.all([readDm(run), readLoops(run)]);
  return { dmAvailable: dm.available, dm: dm.devices, loops, nbds: readNbds() };
}

export interface Usage {
  /** What the target reports: `snapshot`, `thin`, `thin-pool`, … */
  target: string;
  /** In 512-byte sectors, except thin-pool data blocks (`unit`). */
  used: number | undefined;
  total: number | undefined;
  unit: 'sectors' | 'blocks';
  /** thin-pool: the data block size in 512-byte sectors, from the table (`… thin-pool META DATA BLOCK …`). */
  blockSectors?: number;
  /** `Invalid`, `Overflow`, `Merge failed`, `out_of_data_space`, `Fail`… when the target says so. */
  problem: string | undefined;
}

/**
 * Usage from one device's status and table lines:
 *   snapshot  `0 131072 snapshot 2072/8192 24` → store sectors used/total; or `Invalid`, `Overflow`
 *   thin      `0 131072 thin 2048 131071` → mapped sectors / device length; `Fail` when failed
 *   thin-pool `0 … thin-pool 1 10/4096 20/8192 - rw …` → data blocks used/total
 */
export function parseUsage(status: string[], table: string[]): Usage | undefined {
  const line = status[0];
  if (line === undefined) return undefined;
  const w = line.split(/\s+/);
  const target = w[2] ?? '';
  const length = table.reduce((n, l) => n + Number(l.split(/\s+/)[1] ?? 0), 0) || Number(w[1]);
  const rest = w.slice(3);
  if (target === 'snapshot') {
    const m = /^(\d+)\/(\d+)$/.exec(rest[0] ?? '');
    if (m) return { target, used: Number(m[1]), total: Number(m[2]), unit: 'sectors', problem: undefined };
    return { target, used: undefined, total: undefined, unit: 'sectors', problem: rest.join(' ') || 'unknown' };
  }
  if (target === 'thin') {
    if (rest[0] === 'Fail' || rest[0] === 'Error')
      return { target, used: undefined, total: length, unit: 'sectors', problem: rest[0] };
    const n = Number(rest[0]);
    return { target, used: Number.isFinite(n) ? n : undefined, total: length, unit: 'sectors', problem: undefined };
  }
  if (target === 'thin-pool') {
    if (rest[0] === 'Fail' || rest[0] === 'Error')
      return { target, used: undefined, total: undefined, unit: 'sectors', problem: rest[0] };
    const m = /^(\d+)\/(\d+)$/.exec(rest[2] ?? '');
    const mode = rest[4];
    const problem = mode === 'out_of_data_space' || mode === 'ro' ? mode : undefined;
    const block = Number(table[0]?.split(/\s+/)[5]);
    const blockSectors = Number.isInteger(block) && block > 0 ? { blockSectors: block } : {};
    return m
      ? { target, used: Number(m[1]), total: Number(m[2]), unit: 'blocks', problem, ...blockSectors }
      : { target, used: undefined, total: undefined, unit: 'blocks', problem, ...blockSectors };
  }
  return { target, used: undefined, total: undefined, unit: 'sectors', problem: undefined };
}
