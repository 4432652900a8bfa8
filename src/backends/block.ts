/**
 * The drop-in `block`: phy: and file: disks, as Xen's stock `/etc/xen/scripts/block` does them.
 *
 *   params is a path and what it is on disk decides: a block device is handed to blkback directly
 *   (phy), a regular file through a loop device of its own (file). Relative names get `/dev/`
 *   in front (expand_dev), symbolic links are resolved. mode r gives a read-only loop.
 *
 *   Under Xen's own `block` lock (/var/run/xen-hotplug/block, the flock protocol of locking.sh,
 *   so stock scripts and ours exclude each other), which the runtime holds around the whole add
 *   and remove (lockScope 'xen-block', as the stock script holds it; one lock, no path lock): the state guard (file: the backend must still
 *   be waiting in InitWait, else nothing is built), the read-only-file check, the sharing check
 *   (sharing.ts), the loop allocation, and, through BuiltDevice.release, the runtime's writing of
 *   physical-device. Only then may the next instance look.
 *
 *   remove undoes the journal: the loop device recorded at add time is detached, after checking it
 *   still backs the same file (device and inode numbers, which survive the file's deletion), so a
 *   deleted or moved image does not leak its loop as it does with the stock script.
 */
import {
  accessSync,
  constants as fsc,
  readFileSync,
  realpathSync,
  statSync,
  truncateSync,
  type BigIntStats,
} from 'node:fs';
import { isAbsolute } from 'node:path';
import {
  attachLoop,
  detachLoop,
  filterBacking,
  listLoops,
  LoopRedirected,
  resizeLoop,
  type LoopInfo,
} from '../devices/losetup.js';
import { lvExtendTo } from '../devices/lvm.js';
import {
  diskLabel,
  GrowError,
  human,
  refuseIfRecorded,
  wholeMiB,
  type ResizeDeps,
  type ResizeResult,
} from './growth.js';
import { decodeDev, deviceSectors, devString, loopAutoclear, loopBackingFile, type FileId } from '../devices/sysfs.js';
import { HotplugError } from '../disk/errors.js';
import { findStep, type JournalEntry, type StepKind, type StepRecord } from '../journal/journal.js';
import type { UndoContext } from '../journal/steps.js';
import { takeXenBlockLock } from '../lock/xen-lock.js';
import type { XsOps } from '../xenstore/types.js';
import { checkSharing, findUsers, type AccessDevice } from './sharing.js';
import type { Backend, BuiltDevice, HookContext, UnrecordedContext } from './types.js';

export interface BlockPlan {
  kind: 'phy' | 'file';
  /** params as given. */
  given: string;
  /** The resolved path (symlinks followed). */
  path: string;
}

/** The step kind of this backend: one loop over a file that other disks may share read-only. */
export const BLOCK_LOOP_STEP = 'block-loop' satisfies StepKind;

// ---------------------------------------------------------------------------------------------
// device numbers and loop devices

function accessOf(l: LoopInfo): AccessDevice {
  return { path: l.name, major: l.major, minor: l.minor, readOnly: l.readOnly };
}

// ---------------------------------------------------------------------------------------------
// plan

function describeKind(st: {
  isDirectory(): boolean;
  isCharacterDevice(): boolean;
  isFIFO(): boolean;
  isSocket(): boolean;
}): string {
  if (st.isDirectory()) return 'a directory';
  if (st.isCharacterDevice()) return 'a character device';
  if (st.isFIFO()) return 'a FIFO';
  if (st.isSocket()) return 'a socket';
  return 'not a block device or regular file';
}

/** params → what to attach: expand_dev, resolve symlinks, and look at what it is. */
export function planBlock(params: string, where: string): BlockPlan {
  const given = params;
  const expanded = isAbsolute(given) ? given : `/dev/${given}`;
  let path: string;
  try {
    path = realpathSync(expanded);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    const hint = isAbsolute(given)
      ? ''
      : ' (a relative target names a device under /dev; give a file as an absolute path)';
    throw new HotplugError(
      `${where}/params: ${expanded} does not exist${code && code !== 'ENOENT' ? ` (${code})` : ''}${hint}; check the disk's target.`,
    );
  }
  const st = statSync(path);
  if (st.isBlockDevice()) return { kind: 'phy', given, path };
  if (st.isFile()) return { kind: 'file', given, path };
  throw new HotplugError(
    `${where}/params: ${path} is ${describeKind(st)}; a disk must be a block device or a regular file.`,
  );
}

// ---------------------------------------------------------------------------------------------
// add

/** Re-resolve under the lock: the path must still be what plan() saw. */
function recheck(plan: BlockPlan, where: string): { path: string; st: BigIntStats } {
  const again = planBlock(plan.given, where);
  if (again.kind !== plan.kind)
    throw new HotplugError(
      `${where}/params: ${plan.given} changed from a ${plan.kind} to a ${again.kind} disk while it was being attached; try again.`,
    );
  return { path: again.path, st: statSync(again.path, { bigint: true }) };
}

/** The kernel's read-only flag of a block device (a read-only loop, a write-protected disk). */
function readOnlyDevice(major: number, minor: number): boolean {
  try {
    return readFileSync(`/sys/dev/block/${major}:${minor}/ro`, 'utf8').trim() === '1';
  } catch {
    return false;
  }
}

async function addPhy(ctx: HookContext, plan: BlockPlan): Promise<BuiltDevice> {
  const where = ctx.request.xenbusPath;
  const { path, st } = recheck(plan, where);
  const { major, minor } = decodeDev(st.rdev);
  if (ctx.disk.mode === 'w' && readOnlyDevice(major, minor)) {
    throw new HotplugError(
      `Device ${path} is read-only, and so will not be given read-write to a guest domain; use access=r.`,
      'busy',
    );
  }
  const devices: AccessDevice[] = [{ path, major, minor, readOnly: false }];
  // A loop device given as phy: every other loop over the same file reaches the same data.
  if (major === 7) {
    const loops = await listLoops(ctx.run);
    const me = loops.find((l) => l.major === major && l.minor === minor);
    if (me) {
      devices[0] = { ...accessOf(me), path };
      if (me.backDev !== undefined && me.backIno !== undefined) {
        for (const l of filterBacking(loops, { dev: me.backDev, ino: me.backIno }))
          if (l.name !== me.name) devices.push(accessOf(l));
      }
    }
  }
  await checkSharing(ctx.xs, {
    what: `Device ${path}`,
    devices,
    mode: ctx.disk.mode,
    frontendId: ctx.disk.frontendId,
    self: where,
  });
  return { path, major, minor };
}

function writable(path: string, mode: bigint): boolean {
  if ((mode & 0o222n) === 0n) return false;
  try {
    accessSync(path, fsc.W_OK);
    return true;
  } catch {
    return false;
  }
}

async function addFile(ctx: HookContext, plan: BlockPlan): Promise<BuiltDevice> {
  const where = ctx.request.xenbusPath;
  // Under the runtime's lock the state it read a moment ago, under that same lock, still holds.
  const state =
    ctx.xenBlockLockHeld && ctx.disk.state !== undefined
      ? String(ctx.disk.state)
      : await ctx.xs.tryRead(`${where}/state`);
  if (state !== '2') {
    throw new HotplugError(
      `Path closed or removed during hotplug add: ${where} state: ${state ?? 'unknown'}; nothing was attached.`,
    );
  }
  const { path, st } = recheck(plan, where);
  const readOnly = ctx.disk.mode === 'r';
  if (!readOnly && !writable(path, st.mode)) {
    throw new HotplugError(
      `File ${path} is read-only, and so I will not mount it read-write in a guest domain; use access=r or make the file writable.`,
      'busy',
    );
  }
  const id: FileId = { dev: devString(st.dev), ino: st.ino.toString() };
  const before = filterBacking(await listLoops(ctx.run), id);
  await checkSharing(ctx.xs, {
    what: `File ${path}`,
    devices: before.map(accessOf),
    mode: ctx.disk.mode,
    frontendId: ctx.disk.frontendId,
    self: where,
  });
  const loop = await ctx.build.step(
    BLOCK_LOOP_STEP,
    { file: path, dev: id.dev, ino: id.ino, readOnly, before: before.map((l) => l.name) },
    async () => {
      try {
        const l = await attachLoop(ctx.run, path, id, { readOnly });
        return { name: l.name, major: l.major, minor: l.minor };
      } catch (e) {
        if (e instanceof LoopRedirected) throw new HotplugError(e.message);
        throw e;
      }
    },
    (l) => ({ device: l.name, major: l.major, minor: l.minor }),
  );
  return { path: loop.name, major: loop.major, minor: loop.minor, node: loop.name };
}

async function addBlock(ctx: HookContext, plan: BlockPlan): Promise<BuiltDevice> {
  // The runtime holds the lock around the whole add (lockScope below); the branch after it is
  // for a caller that does not.
  if (ctx.xenBlockLockHeld) return plan.kind === 'phy' ? addPhy(ctx, plan) : addFile(ctx, plan);
  const lock = await takeXenBlockLock(ctx.request.xenbusPath, ctx.config, ctx.run);
  try {
    const dev = plan.kind === 'phy' ? await addPhy(ctx, plan) : await addFile(ctx, plan);
    // Held until the runtime has written physical-device (see BuiltDevice.release).
    return { ...dev, release: () => lock.release() };
  } catch (e) {
    await lock.release();
    throw e;
  }
}

// ---------------------------------------------------------------------------------------------
// remove

/** Loops whose device number is some vbd's physical-device (they belong to a disk, maybe not ours). */
async function loopsInUse(xs: XsOps | undefined, entry: JournalEntry, loops: LoopInfo[]): Promise<Set<string>> {
  const used = new Set<string>();
  if (!xs) return used;
  const users = await findUsers(xs, { devices: loops.map(accessOf), self: entry.backendPath }, {});
  for (const u of users) used.add(u.via);
  return used;
}

/**
 * Detach this disk's loop. With a recorded device: detach it if it still backs the recorded file
 * (by device and inode numbers, which stay valid after the file was deleted), else leave it, it is
 * someone else's by now. With an intent only (the add was killed while losetup ran): loops over
 * the file that were not there before, are not any vbd's physical-device and are not mounted or
 * stacked on are this add's.
 */
export async function undoBlockLoop(step: StepRecord<'block-loop'>, ctx: UndoContext): Promise<void> {
  const { file, dev, ino, device } = step.data;
  const loops = await listLoops(ctx.run);
  const onFile = new Set(filterBacking(loops, { dev, ino }).map((l) => l.name));
  let targets: LoopInfo[];
  if (device) {
    const l = loops.find((x) => x.name === device);
    if (!l) return;
    if (!onFile.has(l.name)) {
      ctx.log.warn(
        `${ctx.entry.backendPath}: ${device} no longer backs ${file} (it was detached by someone else); leaving it alone`,
      );
      return;
    }
    targets = [l];
  } else {
    const before = new Set(step.data.before);
    const fresh = loops.filter((l) => onFile.has(l.name) && !before.has(l.name) && l.readOnly === step.data.readOnly);
    const used = await loopsInUse(ctx.xs, ctx.entry, fresh);
    targets = fresh.filter((l) => !used.has(l.name));
  }
  for (const l of targets) await detachLoop(ctx.run, l.name);
  // `losetup -d` of a loop that something holds open succeeds and only sets autoclear: the loop
  // stays bound to the same file until the last close. sysfs tells without another losetup.
  const left: LoopInfo[] = [];
  for (const l of targets) {
    if ((await loopBackingFile(l))?.replace(/ \(deleted\)$/, '') === l.backFile && (await loopAutoclear(l)) === true)
      left.push(l);
  }
  if (left.length) {
    throw new Error(
      `${left.map((l) => l.name).join(', ')} (loop of ${file}) is still open by something; the kernel detaches it when it is closed`,
    );
  }
}

/**
 * remove of a file: disk this hook has no record of, because the stock `block` attached it (the
 * drop-in was installed while the domain ran). Like the stock remove, under Xen's lock: the
 * backend's `node` names the loop; it is detached only when it is a loop device that still backs
 * the disk's file (same device and inode when the file still exists, the same path otherwise) and
 * no other vbd uses it. Anything else is left alone and said in the log.
 */
export async function removeUnrecordedBlock(ctx: UnrecordedContext): Promise<void> {
  const [node, params] = await Promise.all([
    ctx.xs.tryRead(`${ctx.xenbusPath}/node`),
    ctx.xs.tryRead(`${ctx.xenbusPath}/params`),
  ]);
  if (node === undefined || !/^\/dev\/loop\d+$/.test(node) || params === undefined) {
    ctx.log.info(`remove ${ctx.xenbusPath}: nothing recorded and no loop device in node; nothing to undo`);
    return;
  }
  const lock = ctx.xenBlockLockHeld ? undefined : await takeXenBlockLock(ctx.xenbusPath, ctx.config, ctx.run);
  try {
    const loop = (await listLoops(ctx.run)).find((l) => l.name === node);
    if (!loop) return;
    let st: BigIntStats | undefined;
    try {
      st = statSync(params, { bigint: true });
    } catch {
      st = undefined;
    }
    const backs = st
      ? filterBacking([loop], { dev: devString(st.dev), ino: st.ino.toString() }).length === 1
      : loop.backFile === params;
    if (!backs) {
      ctx.log.warn(
        `remove ${ctx.xenbusPath}: ${node} does not back ${params}; it is not this disk's loop, leaving it alone`,
      );
      return;
    }
    const users = await findUsers(ctx.xs, { devices: [accessOf(loop)], self: ctx.xenbusPath }, {});
    if (users.length) {
      ctx.log.warn(
        `remove ${ctx.xenbusPath}: ${node} is also used by ${users.map((u) => u.via).join(', ')}; leaving it alone`,
      );
      return;
    }
    await detachLoop(ctx.run, node);
    ctx.log.info(`remove ${ctx.xenbusPath}: detached ${node}, attached by another script (no record of ours)`);
  } finally {
    await lock?.release();
  }
}

// ---------------------------------------------------------------------------------------------
// resize: a file: image is extended and its loop re-read (`losetup -c`); a phy: logical volume
// is extended (lvextend refuses any other device, and says so). Never smaller: nothing says
// which sectors the guest wrote. A read-only disk may be shared by several domains: refused.

async function resizeBlock(entry: JournalEntry, bytes: number, deps: ResizeDeps): Promise<ResizeResult> {
  const who = diskLabel(entry);
  if (entry.disk.mode !== 'w')
    throw new GrowError(`${who} is read-only and may be shared by other domains; resize its image with them stopped`);
  const dev = entry.device;
  if (!dev) throw new GrowError(`${who} has no device recorded`);
  const before = deviceSectors(deps.run, dev.major, dev.minor) * 512;
  const after = wholeMiB(bytes);
  if (after < before)
    throw new GrowError(
      `${who} is ${human(before)}: the block hook never shrinks a disk (nothing says which sectors the guest wrote)`,
    );
  if (after === before) throw new GrowError(`${who} is already ${human(before)}`);
  const loop = findStep(entry.steps, BLOCK_LOOP_STEP, (s) => s.done && s.data.device !== undefined)?.data;
  let target: string;
  let how: string;
  if (loop?.device !== undefined) {
    const device = loop.device;
    target = loop.file;
    const st = statSync(target, { bigint: true });
    if (devString(st.dev) !== loop.dev || st.ino.toString() !== loop.ino)
      throw new GrowError(`${target} is not the file ${who} was attached from any more (replaced since): not resized`);
    if (Number(st.size) >= after)
      throw new GrowError(
        `${target} is already ${human(Number(st.size))}; its loop is re-read by "losetup -c ${device}"`,
      );
    truncateSync(target, after);
    await resizeLoop(deps.run, device);
    how = `${target} extended, ${device} re-read`;
  } else {
    target = planBlock(entry.disk.params, entry.backendPath).path;
    await lvExtendTo(deps.run, target, after);
    how = `${target} extended (lvextend)`;
  }
  const now = deviceSectors(deps.run, dev.major, dev.minor) * 512;
  deps.log.info(`resize ${entry.backendPath} (${who}): ${human(before)} → ${human(now)}: ${how}`, { action: 'resize' });
  return {
    backendPath: entry.backendPath,
    script: entry.script,
    target,
    beforeBytes: before,
    afterBytes: now,
    online: true,
    how,
  };
}

/** A disk not attached: the image is extended (no loop may serve it), or the LV. */
async function resizeBlockDetached(plan: BlockPlan, bytes: number, deps: ResizeDeps): Promise<ResizeResult> {
  const after = wholeMiB(bytes);
  if (plan.kind === 'phy') {
    await lvExtendTo(deps.run, plan.path, after);
    return {
      backendPath: '',
      script: 'block',
      target: plan.path,
      beforeBytes: 0,
      afterBytes: after,
      online: false,
      how: `${plan.path} extended (lvextend)`,
    };
  }
  refuseIfRecorded(deps.journal, plan.path, 'the image');
  const st = statSync(plan.path, { bigint: true });
  const on = filterBacking(await listLoops(deps.run), { dev: devString(st.dev), ino: st.ino.toString() });
  if (on.length) throw new GrowError(`${plan.path} is in use by ${on.map((l) => l.name).join(', ')}: not resized`);
  const before = Number(st.size);
  if (after < before)
    throw new GrowError(
      `${plan.path} is ${human(before)}: the block hook never shrinks a disk (nothing says which sectors the guest wrote)`,
    );
  if (after === before) throw new GrowError(`${plan.path} is already ${human(before)}`);
  truncateSync(plan.path, after);
  const how = `${plan.path} extended`;
  deps.log.info(`resize of a detached disk: ${human(before)} → ${human(after)}: ${how}`, { action: 'resize' });
  return {
    backendPath: '',
    script: 'block',
    target: plan.path,
    beforeBytes: before,
    afterBytes: after,
    online: false,
    how,
  };
}

export const blockBackend: Backend<BlockPlan> = {
  source: (params) => params,
  script: 'block',
  lockScope: 'xen-block',
  summary:
    "Attach a phy: (block device) or file: (regular file, through a loop device) disk, with Xen's sharing check.",
  usage: `params is a path; what it is on disk decides:
  a block device        given to blkback directly (a relative name means /dev/<name>)
  a regular file        attached to a loop device of its own (read-only for access=r)
Symbolic links are followed. A device or file given read-write to one domain is never given
to another; read-only may be shared with read-only (hotplug-status=busy otherwise).
xend's type dispatch: a backend whose type is not phy or file runs <xen script dir>/block-<type>.`,
  plan(disk, { xenbusPath }) {
    return planBlock(disk.params, xenbusPath);
  },
  add: addBlock,
  undo: { [BLOCK_LOOP_STEP]: undoBlockLoop },
  resize: resizeBlock,
  resizeDetached: resizeBlockDetached,
  removeUnrecorded: removeUnrecordedBlock,
};
