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
import type { DiskSpec } from '../disk/spec.js';
import type { HotplugRequest } from '../disk/request.js';
import type { Build, UndoRegistry } from '../journal/steps.js';
import type { Journal, JournalEntry } from '../journal/journal.js';
import type { Logger } from '../log/logger.js';
import type { XenstoreClient } from '../xenstore/types.js';
import type { GrowAction, GrowDeps, GrowOptions, GrowSize, ResizeDeps, ResizeResult, WatchOutcome } from './growth.js';

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

  // Facets: what the admin tool asks of a hook's disks once they are built. Each is optional; the
  // tool finds them through the registry (backends/index.ts) and never reads a hook's records itself.

  /**
   * Grow what fills as the guest writes (`xen-blockhooks grow`): block-cow its store file,
   * block-thin the shared pool, block-lvsnap its snapshot (or the pool under a thin snapshot).
   * `size` undefined: by watch.step percent. The record is ready and the caller holds the disk's
   * backend-path lock. Throws GrowError with the reason when the disk cannot grow.
   */
  grow?(entry: JournalEntry, size: GrowSize | undefined, deps: GrowDeps, opts: GrowOptions): Promise<GrowAction>;
  /**
   * Change the size the guest sees to `bytes` (`xen-blockhooks resize`): larger, or smaller only
   * with deps.shrink and only where the hook can tell that the guest wrote nothing past the new
   * end (else it refuses). Online where the stack allows it; a hook that cannot says so and records
   * the size for the next add (ResizeResult.online false). The record is ready and the caller holds
   * the disk's backend-path lock. Throws GrowError with the reason.
   */
  resize?(entry: JournalEntry, bytes: number, deps: ResizeDeps): Promise<ResizeResult>;
  /**
   * The same for a persistent disk that is not attached, by its spec (`xen-blockhooks resize
   * DOMAIN DISKSPEC SIZE`): `plan` is this hook's plan of that spec for that domain. Only what
   * outlives the devices can be resized (a store, volume, overlay or image): refused while any
   * record or device uses it, and for a transient disk, which exists only while attached.
   */
  resizeDetached?(plan: Plan, bytes: number, deps: ResizeDeps): Promise<ResizeResult>;
  /**
   * One `watch` pass over one ready disk, under its backend-path lock: its usage, grown once it is
   * at or past watch.threshold, and what the kernel already dropped.
   */
  watch?(entry: JournalEntry, deps: GrowDeps): Promise<WatchOutcome>;
  /**
   * One `watch` pass over what this hook's disks share (block-thin's pool), once per pass, given
   * every ready record of the hook; it takes its own locks.
   */
  watchShared?(entries: JournalEntry[], deps: GrowDeps): Promise<WatchOutcome>;
  /**
   * What a crash or a reboot left of this hook's work that no record holds (`status`, `gc`):
   * transient snapshots, volumes, clones or files. Only what the hook can prove is its own.
   */
  leftovers?(ctx: LeftoverContext): Promise<Leftover[]>;
  /** Take one of its leftovers away (`gc --apply`); gc has judged it again just before. */
  collect?(leftover: Leftover, ctx: CollectContext): Promise<void>;
  /**
   * What this hook's disks share host-wide beyond their own records, which a disk recorded in
   * another journal (`simulate`'s) would decide blind to the disks of the real one. Absent when
   * the hook's disks share nothing.
   */
  readonly shared?: SharedState;
}

/** The host-wide state a hook's disks share (block-thin's pool, block-qcow's free nbd choice). */
export interface SharedState {
  /** What they share, in a few words, e.g. `the thin pool xbh-thinpool`. */
  readonly what: string;
  /** A record of another hook that uses it too (the hook's own records always do). */
  alsoUsedBy?(entry: JournalEntry): boolean;
  /** A record that made it (so a journal holding one made what exists). */
  madeBy?(entry: JournalEntry): boolean;
  /** What on the host shows it exists without a record: a running device, its files. */
  present?(deps: { config: Config; run: Runner }): Promise<string[]>;
}

/** One leftover, as `status` lists it and `gc` plans it. */
export interface Leftover {
  /** A logical volume, a volume in a thin pool, an RBD clone, or a file in the store directory. */
  kind: 'lv' | 'thin' | 'rbd' | 'store';
  /** What identifies it: the same thing seen twice has the same key. */
  key: string;
  device?: string;
  majmin?: string;
  base?: string;
  store?: string;
  /** The command `gc --apply` runs on it, for the plan. */
  action: string;
  /** Why it is a leftover, in a few words. */
  why: string;
}

export interface LeftoverContext {
  config: Config;
  run: Runner;
  /** Every journal record (any phase). */
  entries: readonly JournalEntry[];
  /** The kernel as the inventory read it. */
  kernel: {
    dmNames: ReadonlySet<string>;
    /** A loop device backs this file. */
    looped(file: string): boolean;
  };
  /** Milliseconds since the epoch. */
  now: number;
}

export interface CollectContext {
  config: Config;
  run: Runner;
  log: Logger;
  journal: Journal;
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
