/**
 * The lifecycle every hook shares (Ganeti's BlockDev contract, reduced to what a hotplug
 * script needs):
 *
 *   plan(disk)        parse and check the disk spec; nothing is touched. Throws HotplugError.
 *   add(ctx, plan)    build the device through `ctx.build.step(...)`, each step journaled before
 *                     it runs and paired with an undoer in `undo`. Returns the finished device.
 *   remove            generic: the journal's steps are undone newest first (journal/steps.ts).
 *
 * Idempotence is the runtime's job (an add whose `physical-device` exists returns at once; a
 * remove with no record has nothing to do), so backends only build and undo.
 */
import type { Config } from '../config/config.js';
import type { Runner } from '../devices/runner.js';
import type { DiskSpec } from '../hotplug/disk.js';
import type { HotplugRequest } from '../hotplug/request.js';
import type { Build, UndoRegistry } from '../journal/steps.js';
import type { Journal } from '../journal/journal.js';
import type { Logger } from '../log/logger.js';
import type { XenstoreClient } from '../xenstore/types.js';

export interface BuiltDevice {
  /** What goes into physical-device-path: /dev/mapper/NAME when udev made it, else /dev/dm-N, /dev/loopN, /dev/nbdN. */
  path: string;
  major: number;
  minor: number;
  /** Written to the backend's `node` key (the stock scripts' convention); defaults to `path`. */
  node?: string;
  /**
   * A lock the backend still holds (Xen's `block` lock) that must stay held until physical-device
   * is written: the sharing check of every other instance reads physical-device, so nobody may
   * decide between our check and our report. The runtime calls it exactly once, right after the
   * success report, or, when the add fails after add() returned, before undoing anything.
   */
  release?: () => Promise<void>;
}

export interface HookContext {
  request: HotplugRequest;
  disk: DiskSpec;
  config: Config;
  run: Runner;
  log: Logger;
  xs: XenstoreClient;
  journal: Journal;
  build: Build;
  env: NodeJS.ProcessEnv;
  /** The runtime holds Xen's `block` lock around this whole add (Backend.lockScope 'xen-block'). */
  xenBlockLockHeld?: boolean;
}

export interface Backend<Plan = unknown> {
  /** Installed script name, e.g. `block-cow`. */
  readonly script: string;
  /** One line for --help. */
  readonly summary: string;
  /** The params grammar and options, for --help and the man page. */
  readonly usage: string;
  /**
   * The lock the runtime holds around a whole add or remove: by default the backend path's own
   * lock (<stateDir>/locks/path-*), and the backend takes Xen's `block` lock itself around its
   * critical part. 'xen-block': Xen's global `block` lock instead, for a backend whose whole add
   * is what the stock scripts do under that lock (the drop-in `block`): one lock, one `flock`
   * child, and no other lock may then be taken inside.
   */
  readonly lockScope?: 'path' | 'xen-block';
  plan(disk: DiskSpec, ctx: { config: Config; env: NodeJS.ProcessEnv; xenbusPath: string }): Promise<Plan> | Plan;
  add(ctx: HookContext, plan: Plan): Promise<BuiltDevice>;
  readonly undo: UndoRegistry;
  /**
   * What of the guest's writes this plan keeps only as long as its devices live (a transient
   * store, overlay, volume or clone), in a few words; undefined when everything the guest writes
   * outlives the devices (a persistent store, the image itself, a read-only disk). The runtime
   * records it in the journal: a remove for a domain being saved then holds the devices for the
   * restore instead of undoing them, and a migration's receiving end is refused such a disk
   * unless the backend `migrates` it (src/hotplug/lifecycle.ts).
   */
  transient?(plan: Plan): string | undefined;
  /**
   * What a disk's params read from (the base image, the image, the origin volume, the golden
   * snapshot), as the params grammar parses it (a path may hold spaces); undefined when the
   * params do not parse. For `status` and `simulate`: never split params on white space.
   */
  source?(params: string): string | undefined;
  /** The backend hands its disk to a live migration's receiving end itself (block-rbd). */
  readonly migrates?: boolean;
  /**
   * remove of a disk with no journal record: one that another script attached (the stock
   * `block`, before this one replaced it). Optional; only backends that can recognise such a
   * device from the backend's xenstore keys implement it, and they must take away nothing they
   * cannot prove belongs to this disk.
   */
  removeUnrecorded?(ctx: UnrecordedContext): Promise<void>;
}

export interface UnrecordedContext {
  xenbusPath: string;
  xs: XenstoreClient;
  config: Config;
  run: Runner;
  log: Logger;
  /** As HookContext.xenBlockLockHeld. */
  xenBlockLockHeld?: boolean;
}
