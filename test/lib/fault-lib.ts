/**
 * Shared pieces of the fault-injection and hostile-input suites (host tier: test/host/hostile-*;
 * guest tier: test/guest/fault-*). Framework-free: no tap, no node:test, so the guest bundles stay small.
 *
 *   - reliability rows: every check reports one row (hook, fault, what was checked, result) as a
 *     `# reliability {json}` TAP comment on stdout and, when XEN_BLOCKHOOKS_RELIABILITY_OUT names a
 *     file, as a JSON line appended to it; scripts/reliability.mjs turns them into RELIABILITY.md.
 *   - a recording Runner that plays losetup and dmsetup in memory (argv of every command kept);
 *   - file-tree snapshots and their difference (nothing created outside the store directory);
 *   - a census of everything a hook could leave on a real kernel (guest tier).
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import {
  appendFileSync,
  lstatSync,
  mkdirSync,
  readdirSync,
  readFileSync,
  realpathSync,
  statSync,
  writeFileSync,
} from 'node:fs';
import { join } from 'node:path';
import { devString } from '../../src/devices/sysfs.js';
import type { Backend } from '../../src/backends/types.js';
import { cliMain } from '../../src/cli/main.js';
import { runHook } from '../../src/hotplug/main.js';
import { CommandError, type RunOptions, type RunResult, type Runner } from '../../src/devices/runner.js';

// ---------------------------------------------------------------------------------------------
// reliability rows

export type RowResult = 'pass' | 'fail' | 'todo';

export interface ReliabilityRow {
  hook: string;
  fault: string;
  checked: string;
  result: RowResult;
  detail?: string;
}

export function reportRow(row: ReliabilityRow): void {
  process.stdout.write(`# reliability ${JSON.stringify(row)}\n`);
  const out = process.env.XEN_BLOCKHOOKS_RELIABILITY_OUT;
  if (out) appendFileSync(out, `${JSON.stringify(row)}\n`);
}

/**
 * Run `fn`; report a pass row, or a fail row with the first line of the error (and rethrow).
 * `failures` counts the failed assertions of a framework whose assertions do not throw (tap:
 * `() => t.counts.fail`): an assertion that failed inside `fn` makes the row fail too.
 */
export async function checked<T>(
  hook: string,
  fault: string,
  what: string,
  fn: () => Promise<T> | T,
  failures?: () => number,
): Promise<T> {
  const before = failures?.() ?? 0;
  try {
    const r = await fn();
    const failed = (failures?.() ?? 0) - before;
    if (failed > 0) throw new Error(`${failed} assertion${failed === 1 ? '' : 's'} failed`);
    reportRow({ hook, fault, checked: what, result: 'pass' });
    return r;
  } catch (e) {
    reportRow({
      hook,
      fault,
      checked: what,
      result: 'fail',
      detail: String((e as Error)?.message ?? e)
        .split('\n')[0]
        ?.slice(0, 300),
    });
    throw e;
  }
}

// ---------------------------------------------------------------------------------------------
// file trees

export interface TreeEntry {
  type: 'file' | 'dir' | 'link' | 'other';
  size: number;
  mode: number;
  mtimeMs: number;
  sha?: string;
}

/** Every path below `dir` (lstat, symlinks not followed) with type, size, mode and mtime. */
export function snapshotTree(dir: string): Map<string, TreeEntry> {
  const out = new Map<string, TreeEntry>();
  const walk = (d: string): void => {
    let names: string[];
    try {
      names = readdirSync(d);
    } catch {
      return;
    }
    for (const n of names) {
      const p = join(d, n);
      let st;
      try {
        st = lstatSync(p);
      } catch {
        continue;
      }
      const type = st.isDirectory() ? 'dir' : st.isFile() ? 'file' : st.isSymbolicLink() ? 'link' : 'other';
      out.set(p, { type, size: st.size, mode: st.mode & 0o7777, mtimeMs: st.mtimeMs });
      if (type === 'dir') walk(p);
    }
  };
  walk(dir);
  return out;
}

/**
 * Paths created, removed or changed between two snapshots, except below one of `allowed`
 * (directories that are expected to change, e.g. the state directory's lock and journal folders,
 * which must be empty again anyway) and except empty directories created there.
 */
export function treeChanges(
  before: Map<string, TreeEntry>,
  after: Map<string, TreeEntry>,
  allowed: string[] = [],
): string[] {
  const ok = (p: string): boolean => allowed.some((a) => p === a || p.startsWith(`${a}/`));
  const out: string[] = [];
  for (const [p, e] of after) {
    const b = before.get(p);
    if (!b) {
      if (!(ok(p) && e.type === 'dir')) out.push(`created ${p} (${e.type})`);
    } else if (
      b.type !== e.type ||
      b.size !== e.size ||
      b.mode !== e.mode ||
      (e.type === 'file' && b.mtimeMs !== e.mtimeMs)
    ) {
      if (!(ok(p) && e.type === 'dir')) out.push(`changed ${p}`);
    }
  }
  for (const p of before.keys()) if (!after.has(p)) out.push(`removed ${p}`);
  return out.sort();
}

export function sha256(path: string): string {
  return createHash('sha256').update(readFileSync(path)).digest('hex');
}

// ---------------------------------------------------------------------------------------------
// a recording Runner with losetup and dmsetup played in memory

export interface FakeLoop {
  name: string;
  minor: number;
  file: string;
  dev: string;
  ino: string;
  ro: boolean;
}
export interface FakeDm {
  name: string;
  minor: number;
  table: string;
  ro: boolean;
  open: number;
  uuid?: string;
}

function result(cmd: string, ok: boolean, stdout = '', stderr = ''): RunResult {
  return {
    command: cmd,
    exitCode: ok ? 0 : 1,
    signal: undefined,
    stdout,
    stderr,
    durationMs: 1,
    failed: !ok,
    timedOut: false,
  };
}

/**
 * Every command is kept in `calls` (file + argv, exactly as given). flock succeeds (the real lock
 * files are still made by the lock module); losetup --find/--list/--detach and dmsetup
 * create/info/remove are played against in-memory devices and a fake sysfs tree at `sysRoot`
 * (the runtime reads it through Runner.sysRoot). Like the real losetup, `--find` opens the path it is
 * given at that moment (a symlink swapped in between is followed). `onCall` runs before each
 * command (to inject a fault or race a swap).
 */
export class FakeDeviceRunner implements Runner {
  calls: { file: string; args: string[] }[] = [];
  loops: FakeLoop[] = [];
  dms: FakeDm[] = [];
  onCall: ((file: string, args: readonly string[]) => void | Promise<void>) | undefined;
  constructor(readonly sysRoot: string) {}

  deviceCalls(): { file: string; args: string[] }[] {
    return this.calls.filter((c) => c.file !== 'flock');
  }

  async probe(file: string, args: readonly string[], _opts?: RunOptions): Promise<RunResult> {
    this.calls.push({ file, args: [...args] });
    const cmd = [file, ...args].join(' ');
    if (this.onCall) await this.onCall(file, args);
    if (file === 'flock') return result(cmd, true);
    if (file === 'losetup') return this.losetup(cmd, args);
    if (file === 'dmsetup') return this.dmsetup(cmd, args);
    return result(cmd, false, '', `${file}: not played by the fake runner`);
  }

  async run(file: string, args: readonly string[], opts?: RunOptions): Promise<RunResult> {
    const r = await this.probe(file, args, opts);
    if (r.failed) throw new CommandError(r);
    return r;
  }

  private losetup(cmd: string, args: readonly string[]): RunResult {
    if (args[0] === '--list') {
      const devs = this.loops.map((l) => ({
        name: l.name,
        'back-file': l.file,
        'back-ino': Number(l.ino),
        'back-maj:min': l.dev,
        'maj:min': `7:${l.minor}`,
        ro: l.ro,
        offset: 0,
        sizelimit: 0,
      }));
      return result(cmd, true, devs.length ? JSON.stringify({ loopdevices: devs }) : '');
    }
    if (args[0] === '--find') {
      const file = args[args.length - 1] as string;
      let st;
      try {
        st = statSync(file, { bigint: true });
      } catch (e) {
        return result(cmd, false, '', `losetup: ${file}: failed to set up loop device: ${(e as Error).message}`);
      }
      let minor = 0;
      while (this.loops.some((l) => l.minor === minor)) minor++;
      const l: FakeLoop = {
        name: `/dev/loop${minor}`,
        minor,
        file,
        dev: devString(st.dev),
        ino: st.ino.toString(),
        ro: args.includes('--read-only'),
      };
      this.loops.push(l);
      const dir = join(this.sysRoot, 'block', `loop${minor}`);
      mkdirSync(dir, { recursive: true });
      writeFileSync(join(dir, 'dev'), `7:${minor}\n`);
      writeFileSync(join(dir, 'ro'), l.ro ? '1\n' : '0\n');
      // The kernel names the file it opened by its resolved path, as losetup just followed it.
      mkdirSync(join(dir, 'loop'), { recursive: true });
      writeFileSync(join(dir, 'loop', 'backing_file'), `${realpathSync(file)}\n`);
      mkdirSync(join(this.sysRoot, 'dev', 'block', `7:${minor}`), { recursive: true });
      writeFileSync(join(this.sysRoot, 'dev', 'block', `7:${minor}`, 'size'), `${Number(st.size / 512n)}\n`);
      return result(cmd, true, `${l.name}\n`);
    }
    if (args[0] === '--detach') {
      const i = this.loops.findIndex((l) => l.name === args[1]);
      if (i < 0) return result(cmd, false, '', `losetup: ${args[1]}: detach failed: No such device or address`);
      this.loops.splice(i, 1);
      return result(cmd, true);
    }
    return result(cmd, false, '', 'losetup: unexpected arguments');
  }

  private dmsetup(cmd: string, args: readonly string[]): RunResult {
    const name = args[args.length - 1] as string;
    const dm = this.dms.find((d) => d.name === name);
    switch (args[0]) {
      case 'create': {
        if (dm) return result(cmd, false, '', `device-mapper: create ioctl on ${name} failed: Device or resource busy`);
        let minor = 0;
        while (this.dms.some((d) => d.minor === minor)) minor++;
        this.dms.push({
          name,
          minor,
          table: args[args.indexOf('--table') + 1] as string,
          ro: args.includes('--readonly'),
          open: 0,
          uuid: args.includes('--uuid') ? (args[args.indexOf('--uuid') + 1] as string) : '',
        });
        return result(cmd, true);
      }
      case 'info':
        return dm
          ? result(cmd, true, `${name}|254|${dm.minor}|${dm.open}|${dm.uuid ?? ''}\n`)
          : result(cmd, false, '', `Device ${name} does not exist.\nCommand failed.`);
      case 'remove':
        if (!dm)
          return result(cmd, false, '', `device-mapper: remove ioctl on ${name}  failed: No such device or address`);
        if (dm.open > 0)
          return result(
            cmd,
            false,
            '',
            `device-mapper: remove ioctl on ${name}  failed: Device or resource busy\nCommand failed.`,
          );
        this.dms = this.dms.filter((d) => d !== dm);
        return result(cmd, true);
      default:
        return result(cmd, false, '', 'dmsetup: unexpected arguments');
    }
  }
}

// ---------------------------------------------------------------------------------------------
// census of a real kernel (guest tier)

function out(file: string, args: string[]): string {
  const r = spawnSync(file, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
  return (r.stdout ?? '').trim();
}

export function sh(file: string, args: string[]): string {
  return execFileSync(file, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] }).trim();
}

function list(d: string): string[] {
  try {
    return readdirSync(d).sort();
  } catch {
    return [];
  }
}

export interface CensusDirs {
  storeDir: string;
  stateDir: string;
  xenLockDir: string;
  /** A volume group whose LVs named xbh-* count as leftovers. */
  vg?: string;
  /** Store files that are meant to stay (persistent stores). */
  keepStores?: string[];
  /** Loop devices (by name) that the test itself holds and that are not leftovers. */
  keepLoops?: string[];
  /** dm devices (by name) that are not leftovers. */
  keepDms?: string[];
}

/** Connected nbd devices (/sys/block/nbdN/pid exists while connected). */
export function connectedNbds(): string[] {
  return list('/sys/block')
    .filter((n) => /^nbd\d+$/.test(n))
    .filter((n) => {
      try {
        return readFileSync(`/sys/block/${n}/pid`, 'utf8').trim() !== '';
      } catch {
        return false;
      }
    });
}

/** qemu-nbd processes alive (by /proc/PID/comm). */
export function qemuNbdProcesses(): string[] {
  return list('/proc')
    .filter((p) => /^\d+$/.test(p))
    .filter((p) => {
      try {
        return readFileSync(`/proc/${p}/comm`, 'utf8').trim() === 'qemu-nbd';
      } catch {
        return false;
      }
    })
    .map((p) => `qemu-nbd pid ${p}`);
}

/** Lock files and POSIX/flock locks held on files below `dirs` (from /proc/locks by inode). */
export function heldLocks(dirs: string[]): string[] {
  const inodes = new Map<string, string>();
  for (const d of dirs) {
    for (const n of list(d)) {
      try {
        inodes.set(String(statSync(join(d, n)).ino), join(d, n));
      } catch {
        // gone
      }
    }
  }
  const held: string[] = [];
  for (const line of readFileSync('/proc/locks', 'utf8').split('\n')) {
    const f = line.trim().split(/\s+/);
    const id = f.find((x) => /^[0-9a-f]+:[0-9a-f]+:\d+$/.test(x));
    const ino = id?.split(':')[2];
    if (ino && inodes.has(ino)) held.push(`held lock ${inodes.get(ino)}`);
  }
  return held;
}

/** Everything a hook could leave behind; empty when nothing is. */
export function census(c: CensusDirs): string[] {
  const left: string[] = [];
  const dm = out('dmsetup', ['ls']);
  if (dm && !/No devices found/.test(dm)) {
    for (const l of dm.split('\n')) {
      const name = l.split(/\s+/)[0] as string;
      if (!(c.keepDms ?? []).includes(name)) left.push(`dm ${l}`);
    }
  }
  const loops = out('losetup', ['-a']);
  if (loops)
    for (const l of loops.split('\n'))
      if (!(c.keepLoops ?? []).includes(l.split(':')[0] as string)) left.push(`loop ${l}`);
  left.push(...connectedNbds().map((n) => `nbd ${n} connected`));
  left.push(...qemuNbdProcesses());
  if (c.vg) {
    const lvs = out('lvm', ['lvs', '--noheadings', '-o', 'lv_name', c.vg]);
    left.push(
      ...lvs
        .split('\n')
        .map((s) => s.trim())
        .filter((s) => s.startsWith('xbh'))
        .map((s) => `lv ${c.vg}/${s}`),
    );
  }
  left.push(
    ...list(c.storeDir)
      .filter((f) => !(c.keepStores ?? []).includes(f))
      .map((f) => `store ${f}`),
  );
  left.push(...list(join(c.stateDir, 'journal')).map((f) => `journal ${f}`));
  left.push(...list(join(c.stateDir, 'locks')).map((f) => `lock file ${f}`));
  left.push(...list(c.xenLockDir).map((f) => `xen lock file ${f}`));
  left.push(...heldLocks([join(c.stateDir, 'locks'), c.xenLockDir]));
  return left;
}

/**
 * A hook run in this process (the runtime its bundle runs), with its output collected: under TCG a
 * child costs seconds of node start-up, so only the runs that are to be killed need one.
 */
export async function hookInProcess(
  backend: Backend,
  action: string,
  xenbusPath: string,
  env: NodeJS.ProcessEnv,
): Promise<{ code: number; text: string }> {
  let text = '';
  const code = await runHook(
    backend,
    [action],
    { ...env, XENBUS_PATH: xenbusPath },
    { out: (s) => (text += s), err: (s) => (text += s) },
  );
  return { code, text };
}

/** `xen-blockhooks ARGS…` in this process, with its output collected. */
export async function cliInProcess(args: string[], env: NodeJS.ProcessEnv): Promise<{ code: number; text: string }> {
  let text = '';
  const code = await cliMain(args, env, { out: (s) => (text += `${s}\n`), err: (s) => (text += `${s}\n`) });
  return { code, text };
}

/** `xen-blockhooks gc --apply`, which must succeed. */
export async function gcApply(env: NodeJS.ProcessEnv): Promise<void> {
  const r = await cliInProcess(['gc', '--apply'], env);
  if (r.code !== 0) throw new Error(`gc --apply: exit ${r.code}\n${r.text}`);
}
