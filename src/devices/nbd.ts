/**
 * /dev/nbdN devices served by qemu-nbd daemons.
 *
 * Allocation is race-free across concurrent hooks: a device is chosen under one lock
 * (`<stateDir>/locks/nbd`) among those the kernel shows free — no `/sys/block/nbdN/pid` (present
 * only while a client is connected) and a size of 0 — that no journal record names, and it is
 * written into the caller's record before the lock is released; that record is the reservation
 * until it is undone. A device that a process outside our hooks grabs in between makes qemu-nbd
 * fail, which is reported; it is never disconnected by us.
 *
 * Ownership: `/sys/block/nbdN/pid` names the thread that runs the NBD_DO_IT ioctl inside the
 * qemu-nbd daemon; its Tgid (from /proc/<tid>/status) is the daemon's pid, the one qemu-nbd writes
 * to its --pid-file. A device is ours only when that pid is the daemon started with our pid file,
 * so a record whose add died before connecting never disconnects a device another hook took since.
 */
import { existsSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import type { Runner } from './runner.js';
import { qemuNbdDisconnectArgs } from './qemu.js';

/** How many devices `modprobe nbd` creates when the module was not loaded. */
export const NBDS_MAX = 64;

export interface NbdState {
  /** `nbd3` */
  name: string;
  /** Size in 512-byte sectors (0 when nothing is connected). */
  sectors: number;
  /** The daemon's pid (Tgid of the receiving thread), when connected and /proc shows it. */
  owner: number | undefined;
  /** Something is connected (the kernel shows a pid). */
  connected: boolean;
  readOnly: boolean;
  major: number;
  minor: number;
}

function read(path: string): string | undefined {
  try {
    return readFileSync(path, 'utf8').trim();
  } catch {
    return undefined;
  }
}

/** `/dev/nbd3` or `nbd3` → `nbd3`; anything else → undefined. */
export function nbdName(device: string): string | undefined {
  const m = /^(?:\/dev\/)?(nbd\d+)$/.exec(device);
  return m ? m[1] : undefined;
}

/** The process a thread belongs to (Tgid), or undefined. */
export function threadGroup(tid: number, procRoot = '/proc'): number | undefined {
  const status = read(`${procRoot}/${tid}/status`);
  const m = status ? /^Tgid:\s*(\d+)$/m.exec(status) : null;
  return m ? Number(m[1]) : undefined;
}

export function nbdState(device: string, sysRoot = '/sys', procRoot = '/proc'): NbdState | undefined {
  const name = nbdName(device);
  if (!name) return undefined;
  const dir = `${sysRoot}/block/${name}`;
  const dev = read(`${dir}/dev`);
  if (dev === undefined) return undefined;
  const [major = 0, minor = 0] = dev.split(':').map(Number);
  const pid = read(`${dir}/pid`);
  const tid = pid !== undefined && /^\d+$/.test(pid) ? Number(pid) : undefined;
  return {
    name,
    sectors: Number(read(`${dir}/size`) ?? 0),
    owner: tid === undefined ? undefined : threadGroup(tid, procRoot),
    connected: pid !== undefined,
    readOnly: read(`${dir}/ro`) === '1',
    major,
    minor,
  };
}

/** Every nbd device the kernel has, by number. */
export function listNbdDevices(sysRoot = '/sys'): string[] {
  let names: string[];
  try {
    names = readdirSync(`${sysRoot}/block`);
  } catch {
    return [];
  }
  return names
    .filter((n) => /^nbd\d+$/.test(n))
    .sort((a, b) => Number(a.slice(3)) - Number(b.slice(3)))
    .map((n) => `/dev/${n}`);
}

/** Free: nothing connected and no size. (Call under the nbd lock.) */
export function isNbdFree(device: string, sysRoot = '/sys'): boolean {
  const s = nbdState(device, sysRoot);
  return s !== undefined && !s.connected && s.sectors === 0;
}

export function freeNbdDevices(sysRoot = '/sys'): string[] {
  return listNbdDevices(sysRoot).filter((d) => isNbdFree(d, sysRoot));
}

/** Load the nbd module when the kernel has no nbd devices yet (`modprobe nbd nbds_max=64`). */
export async function ensureNbdModule(run: Runner, sysRoot = '/sys'): Promise<void> {
  if (listNbdDevices(sysRoot).length > 0) return;
  if (!existsSync(`${sysRoot}/module/nbd`)) {
    const r = await run.probe('modprobe', ['nbd', `nbds_max=${NBDS_MAX}`]);
    if (r.failed)
      throw new Error(
        `the kernel has no nbd devices and "modprobe nbd" failed (${r.stderr.trim() || `status ${r.exitCode}`}); load the nbd module`,
      );
  }
  for (let i = 0; i < 50 && listNbdDevices(sysRoot).length === 0; i++) await sleep(100);
  if (listNbdDevices(sysRoot).length === 0)
    throw new Error('the nbd module is loaded but /sys/block has no nbd devices (loaded with nbds_max=0?)');
}

/** The pid in a qemu-nbd --pid-file, if it holds one. */
export function readPidFile(pidFile: string): number | undefined {
  const t = read(pidFile);
  return t !== undefined && /^\d+$/.test(t) ? Number(t) : undefined;
}

/** argv of a process, or undefined when it is gone. */
export function processArgv(pid: number, procRoot = '/proc'): string[] | undefined {
  try {
    return readFileSync(`${procRoot}/${pid}/cmdline`)
      .toString('utf8')
      .split('\0')
      .filter((s, i, a) => s !== '' || i < a.length - 1);
  } catch {
    return undefined;
  }
}

function isQemuNbdWith(argv: string[] | undefined, pidFile: string): boolean {
  if (!argv || argv.length === 0) return false;
  const exe = argv[0] ?? '';
  return /(^|\/)qemu-nbd$/.test(exe) && argv.includes(`--pid-file=${pidFile}`);
}

/**
 * qemu-nbd processes started with `--pid-file=<pidFile>`: ours, found even when the pid file was
 * not written yet (a hook killed while qemu-nbd was starting) or the pid was reused since.
 */
export function qemuNbdProcesses(pidFile: string, procRoot = '/proc'): number[] {
  let pids: string[];
  try {
    pids = readdirSync(procRoot).filter((p) => /^\d+$/.test(p));
  } catch {
    return [];
  }
  return pids.map(Number).filter((pid) => isQemuNbdWith(processArgv(pid, procRoot), pidFile));
}

export function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** Wait up to `ms` for every pid to exit; returns those still running. */
export async function waitExit(pids: number[], ms: number): Promise<number[]> {
  const until = Date.now() + ms;
  let left = pids.filter(alive);
  while (left.length > 0 && Date.now() < until) {
    await sleep(50);
    left = left.filter(alive);
  }
  return left;
}

export interface DisconnectTarget {
  /** The device, when it was chosen. */
  device: string | undefined;
  pidFile: string;
  /** The daemon's pid, when it was recorded. */
  pid: number | undefined;
}

/**
 * Take down what one qemu-nbd connection of ours may have left: disconnect the device if our
 * daemon serves it, wait (bounded) for the daemon to exit, and end it with SIGTERM then SIGKILL
 * if it does not. Idempotent; a device that another daemon serves is left alone.
 */
export async function disconnectOurs(
  run: Runner,
  t: DisconnectTarget,
  waitMs: number,
  sysRoot = '/sys',
): Promise<void> {
  const ours = new Set<number>(qemuNbdProcesses(t.pidFile));
  const filed = readPidFile(t.pidFile);
  for (const p of [t.pid, filed]) if (p !== undefined && isQemuNbdWith(processArgv(p), t.pidFile)) ours.add(p);
  const servedByUs = (): boolean => {
    if (!t.device) return false;
    const s = nbdState(t.device, sysRoot);
    return s !== undefined && s.connected && s.owner !== undefined && ours.has(s.owner);
  };
  if (servedByUs() && t.device) {
    const r = await run.probe('qemu-nbd', qemuNbdDisconnectArgs(t.device));
    if (r.failed && servedByUs())
      throw new Error(`qemu-nbd --disconnect ${t.device} failed: ${r.stderr.trim() || `status ${r.exitCode}`}`);
  }
  let left = await waitExit([...ours], waitMs);
  for (const [signal, ms] of [
    ['SIGTERM', 3000],
    ['SIGKILL', 2000],
  ] as const) {
    if (left.length === 0) break;
    for (const p of left) {
      try {
        process.kill(p, signal);
      } catch {
        // gone meanwhile
      }
    }
    left = await waitExit(left, ms);
  }
  if (left.length > 0)
    throw new Error(`qemu-nbd (pid ${left.join(', ')}) for ${t.device ?? 'an nbd device'} does not exit`);
  if (servedByUs()) throw new Error(`${t.device} is still connected after its qemu-nbd exited`);
  rmSync(t.pidFile, { force: true });
}

/** `qemu-nbd --disconnect DEV`: the daemon serving it then exits. */
export async function disconnectNbd(run: Runner, device: string): Promise<void> {
  await run.run('qemu-nbd', qemuNbdDisconnectArgs(device));
}
