/**
 * `xen-blockhooks gc`: take away what nobody will ever remove.
 *
 * Candidates: records whose backend path or domain is gone from xenstore (libxl can wipe the
 * nodes without running remove; a domain can die with its devices attached), records of adds
 * and removes that were killed half-way once xenstore forgot them, and kernel objects named or
 * backed like ours that no record mentions (leaked). Without `--apply` only the plan is printed.
 * With it, a record is undone through its hook's own undoers (the same code `remove` runs, under
 * the same per-path lock), and a leaked object is removed directly: dm devices first (users
 * before what they sit on), then loop devices, then nbd connections.
 */
import { mkdirSync, unlinkSync } from 'node:fs';
import { dirname } from 'node:path';
import type { Config } from '../config/config.js';
import type { Runner } from '../devices/runner.js';
import { Journal } from '../journal/journal.js';
import { undoAll } from '../journal/steps.js';
import { acquireFlock } from '../lock/flock.js';
import type { Logger } from '../log/logger.js';
import type { XenstoreClient } from '../xenstore/types.js';
import { hookNamed } from '../backends/index.js';
import { dmRemove } from '../devices/dmsetup.js';
import { detachLoop } from '../devices/losetup.js';
import { disconnectNbd } from '../devices/nbd.js';
import { takeInventory, type Inventory, type Row } from './inventory.js';
import { gcTakesOpen, isOpenRecord, openUndo } from './open.js';
import { pathLockPath } from '../lock/paths.js';
import { dropClaim, type StoreOwner } from '../lock/store-owner.js';

export const GC_HELP = `Usage: xen-blockhooks gc [--apply] [--without-xenstore] [--json]

Find what the hooks built for devices whose backend path or domain no longer exists in xenstore
(orphans, and adds or removes killed half-way), and kernel objects named or backed like ours
that no record mentions (leaked dm devices, loop devices on files in the store directory or
under a leaked dm device, nbd connections serving such files), and what a crash leaves: transient
store files nothing uses, block-lvsnap's transient snapshot LVs, block-thin's transient volumes
and the transient RBD clones this host made that no record holds, thin pool files that no record
and no persistent volume needs, this host's claims on persistent stores that no record holds,
and the partition maps (and image loop) of an "open" or "close" that was killed half-way.
Prints the plan; --apply carries it out: a record is undone with its hook's own teardown under
the hook's lock, a leaked object is removed directly (dmsetup remove, losetup -d, qemu-nbd -d,
lvremove, a thin pool's delete message, rbd rm, rm of a transient store file). gc never deletes
a persistent store, snapshot, volume or clone, and never touches a disk held for a saved domain,
another host's claim or partitions that are open (those go with "xen-blockhooks close").

Options:
  --apply              do it (default: only print the plan)
  --without-xenstore   xenstore is down for good (Xen not running): treat every record as orphaned
  --json               print the plan (and results) as JSON
  -h, --help           this text

Exit status: 0 nothing to collect or everything collected, 1 some removals failed (each is
named), 2 bad usage, 3 there is something to collect and --apply was not given.`;

export interface PlanItem {
  row: Row;
  /** One line for the plan. */
  action: string;
}

/** What gc would do. Rows owned by a running process are never in it. */
export function gcPlan(inv: Inventory, opts: { withoutXenstore: boolean }): PlanItem[] {
  const items: PlanItem[] = [];
  for (const r of inv.rows) {
    if (r.kind === 'record' && isOpenRecord({ script: r.hook ?? '' })) {
      if (gcTakesOpen(r))
        items.push({
          row: r,
          action: `undo open record ${r.backendPath}${r.device ? ` (partitions of ${r.device})` : ''}: ${r.why}`,
        });
    } else if (r.kind === 'record') {
      const gone = r.state === 'orphan' || (opts.withoutXenstore && r.state !== 'adding');
      if (!gone) continue;
      const why = r.state === 'orphan' ? r.why : 'xenstore is down (--without-xenstore)';
      items.push({
        row: r,
        action: `undo ${r.hook} record for ${r.backendPath}${r.device ? ` (${r.device})` : ''}: ${why}`,
      });
    }
  }
  const order = { dm: 0, loop: 1, nbd: 2, thin: 3, lv: 4, rbd: 5, store: 6, claim: 7, record: 8, saved: 9 } as const;
  const leaked = inv.rows.filter((r) => r.state === 'leaked').sort((a, b) => order[a.kind] - order[b.kind]);
  for (const r of leaked) {
    const what = r.leftover
      ? r.leftover.action
      : r.kind === 'dm'
        ? `dmsetup remove ${r.device?.replace('/dev/mapper/', '')}`
        : r.kind === 'loop'
          ? `losetup -d ${r.device}`
          : r.kind === 'store'
            ? `rm ${r.store}`
            : r.kind === 'claim'
              ? `release ${r.store}.owner`
              : `qemu-nbd -d ${r.device}`;
    items.push({ row: r, action: `${what}: ${r.why}` });
  }
  return items;
}

export interface GcDeps {
  config: Config;
  run: Runner;
  log: Logger;
  xs: XenstoreClient | undefined;
  journal?: Journal;
  /** The hooks whose undoers apply (default: every hook this build ships). */
  hooks?: (script: string) => { undo: import('../journal/steps.js').UndoRegistry } | undefined;
  /** Progress lines (one per item). */
  progress?: (s: string) => void;
  /** The clock leftovers' ages are judged by when a plan item is checked again (tests). */
  now?: () => number;
}

export interface GcResult {
  item: PlanItem;
  ok: boolean;
  error?: string;
}

export async function applyGc(items: PlanItem[], deps: GcDeps): Promise<GcResult[]> {
  const journal = deps.journal ?? new Journal(deps.config.stateDir);
  const results: GcResult[] = [];
  for (const item of items) {
    const r = item.row;
    deps.progress?.(item.action);
    try {
      if (r.kind === 'record') {
        const bp = r.backendPath as string;
        const backend = isOpenRecord({ script: r.hook ?? '' })
          ? { undo: openUndo }
          : (deps.hooks ?? hookNamed)(r.hook ?? '');
        if (!backend)
          throw new Error(
            `record ${journal.file(bp)} was made by "${r.hook}", which this version does not know; remove its devices by hand`,
          );
        const lockFile = pathLockPath(deps.config.stateDir, bp);
        mkdirSync(dirname(lockFile), { recursive: true, mode: 0o700 });
        const lock = await acquireFlock(lockFile, {
          timeoutMs: Math.min(deps.config.lockTimeoutMs, 5000),
          runner: deps.run,
        });
        try {
          const entry = journal.load(bp);
          const twin =
            entry?.device &&
            journal
              .list()
              .entries.find(
                (o) =>
                  o.backendPath !== bp &&
                  o.device?.major === entry.device?.major &&
                  o.device?.minor === entry.device?.minor,
              );
          if (entry && twin) {
            // A copy left by a crash while the record moved (held for a saved domain, or adopted
            // by its restore): the devices are the other record's, so only this file goes.
            journal.delete(bp);
            deps.log.warn(
              `gc: ${bp}'s record names the device of ${twin.backendPath} (a copy left by a crash while it moved); deleted the copy, kept the devices`,
            );
          } else if (entry) {
            const failures = await undoAll(entry, backend.undo, {
              run: deps.run,
              config: deps.config,
              log: deps.log,
              journal,
              xs: deps.xs,
            });
            if (failures.length) throw new Error(failures.map((f) => f.message).join('; '));
          }
        } finally {
          await lock.release();
        }
        deps.log.info(`gc: undid ${r.hook} record for ${bp}`, { device: r.device });
      } else if (r.kind === 'dm') {
        await dmRemove(
          deps.run,
          (r.device as string).replace('/dev/mapper/', ''),
          Math.max(deps.config.busyRetryMs, 1000),
        );
        deps.log.info(`gc: removed leaked dm device ${r.device}`);
      } else if (r.kind === 'loop') {
        await detachLoop(deps.run, r.device as string);
        deps.log.info(`gc: detached leaked loop device ${r.device}`, { backing: r.store ?? r.base });
      } else if (r.leftover) {
        // Judged again now: an add may have taken it since the plan was made.
        const l = r.leftover;
        const backend = hookNamed(r.hook ?? '');
        if (!backend?.collect)
          throw new Error(`${r.hook ?? 'an unknown hook'} cannot take away its ${l.kind} ${l.key}; remove it by hand`);
        const still = await takeInventory({
          config: deps.config,
          run: deps.run,
          xs: undefined,
          journal,
          ...(deps.now ? { now: deps.now } : {}),
        });
        if (!still.rows.some((x) => x.hook === r.hook && x.leftover?.kind === l.kind && x.leftover.key === l.key))
          throw new Error(`${l.key} is in use now (or gone); left alone`);
        await backend.collect(l, { config: deps.config, run: deps.run, log: deps.log, journal });
      } else if (r.kind === 'claim') {
        dropClaim(r.store as string, r.owner as StoreOwner);
        deps.log.info(`gc: released this host's stale claim on ${r.store}`, { backendPath: r.owner?.backendPath });
      } else if (r.kind === 'store') {
        // Judged again now: an add may have started using it since the plan was made.
        const still = await takeInventory({ config: deps.config, run: deps.run, xs: undefined, journal });
        if (!still.rows.some((x) => x.kind === 'store' && x.store === r.store))
          throw new Error(`${r.store} is in use now (or gone); left alone`);
        try {
          unlinkSync(r.store as string);
        } catch (e) {
          if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e;
        }
        deps.log.info(`gc: deleted leftover transient store ${r.store}`);
      } else {
        await disconnectNbd(deps.run, r.device as string);
        deps.log.info(`gc: disconnected leaked nbd ${r.device}`, { file: r.store });
      }
      results.push({ item, ok: true });
    } catch (e) {
      const error = e instanceof Error ? e.message : String(e);
      deps.log.error(`gc: ${item.action}: ${error}`);
      results.push({ item, ok: false, error });
    }
  }
  return results;
}
