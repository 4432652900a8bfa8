/**
 * block-lvsnap: LVM snapshots as copy-on-write disks. "Create a basic image, snapshot it multiple
 * times, and modify each snapshot slightly for another domain": the origin LV is the golden
 * image; each disk is `lvcreate -s` of it, named after the domain and vdev, handed out as is.
 *
 *   classic origin:  lvcreate -s -L <cow-size> -n xbh-<owner>-<vdev> VG/ORIGIN  (dm snapshot)
 *   thin origin:     lvcreate -s -kn -n xbh-<owner>-<vdev> VG/ORIGIN           (thin snapshot, no size)
 *   access=r:        the origin itself, read-only (nothing is created)
 *
 * Steps: `lv-snapshot` {vg, lv, origin, persistent, existed} journaled before lvcreate. Undo:
 * `lvremove -f` (retrying while blkback still holds it), except a persistent snapshot, which the
 * next add of the same domain and vdev finds again by name and tag. Every snapshot carries an
 * LVM tag saying what it is (`xbh_transient` or `xbh_persistent`), so a leftover transient one
 * (a crash, a lost /run) is recognised and replaced, and a persistent one is never mistaken
 * for a leftover.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import type { Config } from '../config/config.js';
import {
  isLvNotFound,
  lvActivate,
  lvCreateSnapshot,
  lvExtendBy,
  lvExtendPoolMetadataBy,
  lvExtendTo,
  lvInfo,
  lvRemove,
  lvNameProblem,
  lvsTagged,
  parseLvRef,
  vgNameProblem,
  type LvInfo,
  type LvRef,
} from '../devices/lvm.js';
import { CommandError, type Runner } from '../devices/runner.js';
import type { DiskSpec } from '../disk/spec.js';
import { HotplugError, messageOf } from '../disk/errors.js';
import { findStep, recordsHolding, type JournalEntry, type StepKind, type StepRecord } from '../journal/journal.js';
import type { UndoContext } from '../journal/steps.js';
import { paramsRefusal, parseSizePersistent, sizeOrPersistentWord, sourceOf, splitPathWords } from './params-words.js';
import { looksLikeSize, notASize, sizeGrammar } from '../units/size.js';
import { backendIds, ownerName, persistentOwner } from './naming.js';
import { findUsers } from './sharing.js';
import type { Backend, BuiltDevice, HookContext, Leftover, LeftoverContext } from './types.js';
import {
  diskLabel,
  GrowError,
  growPastThreshold,
  human,
  MiB,
  wholeMiB,
  type GrowAction,
  type GrowDeps,
  type GrowSize,
  type ResizeDeps,
  type ResizeResult,
  type WatchOutcome,
} from './growth.js';

export const LVSNAP_STEP = 'lv-snapshot' satisfies StepKind;
export const TAG_TRANSIENT = 'xbh_transient';
export const TAG_PERSISTENT = 'xbh_persistent';

export interface LvsnapParams {
  origin: LvRef;
  /** CoW area in MiB (classic origins only). */
  sizeMiB: number | undefined;
  persistent: boolean;
}

const USAGE_LINE = '<vg>/<origin-lv> [<cow-size>] [persistent[=yes|no]]';

const bad = paramsRefusal('block-lvsnap', USAGE_LINE, 'vg0/golden 2G');

export function parseLvsnapParams(params: string): LvsnapParams {
  const split = splitPathWords(params, sizeOrPersistentWord);
  if (split === undefined) throw bad(params, 'no origin volume given');
  const first = split.path.split(/\s/, 1)[0] as string;
  let ref: LvRef;
  const spec = first.replace(/^\/dev\//, '');
  try {
    ref = parseLvRef(spec);
  } catch (e) {
    throw bad(params, `the origin "${first}" is not a valid VG/LV: ${messageOf(e)}`);
  }
  if (split.lastWord !== undefined) {
    const w = split.lastWord;
    if (looksLikeSize(w)) throw bad(params, notASize(w));
    throw bad(
      params,
      `"${w}" is neither a size (${sizeGrammar()}) nor an option (known: persistent); the origin is VG/LV, and LVM names cannot contain spaces`,
    );
  }
  return {
    origin: ref,
    ...parseSizePersistent(split.rest, (what) => bad(params, what), { size: 'copy-on-write size', path: 'the origin' }),
  };
}

/** `xbh-<owner>-<vdev>`: the snapshot LV's name (valid for LVM: owner and vdev are safe names). */
export function snapshotName(disk: Pick<DiskSpec, 'domainName' | 'frontendId' | 'vdev'>, xenbusPath: string): string {
  const { domid, devid } = backendIds(xenbusPath);
  const name = `xbh-${ownerName(disk, domid)}-${disk.vdev ?? devid}`.replace(/[^A-Za-z0-9+_.-]/g, '_');
  const p = lvNameProblem(name);
  if (p) throw new HotplugError(`block-lvsnap: cannot name the snapshot after this disk: ${p}.`);
  return name;
}

export interface LvsnapPlan {
  params: LvsnapParams;
  readOnly: boolean;
  snap: LvRef;
}

export function planLvsnap(disk: DiskSpec, ctx: { config: Config; xenbusPath: string }): LvsnapPlan {
  const params = parseLvsnapParams(disk.params);
  const readOnly = disk.mode === 'r';
  if (readOnly && (params.persistent || params.sizeMiB !== undefined)) {
    throw new HotplugError(
      `block-lvsnap params "${disk.params}": access=r hands out the origin itself; a size or persistent makes no sense there.`,
    );
  }
  if (params.persistent && !readOnly) persistentOwner('block-lvsnap', disk, ctx.xenbusPath, 'snapshot', undefined);
  const snap = { vg: params.origin.vg, lv: snapshotName(disk, ctx.xenbusPath) };
  if (vgNameProblem(snap.vg)) throw new HotplugError(`block-lvsnap: invalid volume group ${snap.vg}`);
  return { params, readOnly, snap };
}

function devOf(l: LvInfo, what: string): { path: string; major: number; minor: number } {
  if (l.major === undefined || l.minor === undefined)
    throw new HotplugError(
      `block-lvsnap: ${what} ${l.vg}/${l.lv} is not active (no kernel device); activate it (lvchange -ay ${l.vg}/${l.lv}).`,
    );
  return { path: l.dmPath ?? `/dev/${l.vg}/${l.lv}`, major: l.major, minor: l.minor };
}

async function lvsOrFail(run: Runner, r: LvRef): Promise<LvInfo | undefined> {
  try {
    return await lvInfo(run, r);
  } catch (e) {
    throw new HotplugError(`block-lvsnap: cannot read ${r.vg}/${r.lv} with lvs: ${messageOf(e)}`);
  }
}

async function checkOrigin(ctx: HookContext, origin: LvInfo): Promise<void> {
  const o = devOf(origin, 'the origin');
  const users = (
    await findUsers(ctx.xs, {
      devices: [{ path: o.path, major: o.major, minor: o.minor, readOnly: false }],
      self: ctx.request.xenbusPath,
    })
  ).filter((u) => u.mode === 'w' && !(u.kind === 'guest' && u.via !== o.path));
  const u = users[0];
  if (u) {
    const who = u.kind === 'local' ? `mounted read-write on ${u.mountPoint}` : `given writable to ${u.backendPath}`;
    throw new HotplugError(
      `block-lvsnap: the origin ${origin.vg}/${origin.lv} is ${who}; snapshots of an origin that is being written are not a golden image: stop that user first.`,
      'busy',
    );
  }
}

async function addLvsnap(ctx: HookContext, plan: LvsnapPlan): Promise<BuiltDevice> {
  const o = plan.params.origin;
  const origin = await lvsOrFail(ctx.run, o);
  if (!origin)
    throw new HotplugError(
      `block-lvsnap: the origin logical volume ${o.vg}/${o.lv} does not exist (lvs finds no such volume); check the name with "lvs ${o.vg}".`,
    );
  if (
    origin.kind === 'thin-pool' ||
    origin.kind === 'snapshot' ||
    /^(thin-pool|cache|cache-pool|vdo|vdo-pool)$/.test(origin.segtype)
  ) {
    throw new HotplugError(
      `block-lvsnap: ${o.vg}/${o.lv} is a ${origin.kind === 'snapshot' ? 'snapshot' : origin.segtype}, not a volume to snapshot; give the golden image's LV.`,
    );
  }
  if (origin.invalid)
    throw new HotplugError(
      `block-lvsnap: the origin ${o.vg}/${o.lv} is marked invalid by LVM (attr ${origin.attr}); repair it first.`,
    );
  await checkOrigin(ctx, origin);
  if (plan.readOnly) {
    const d = devOf(origin, 'the origin');
    return d;
  }
  const thin = origin.kind === 'thin' || origin.segtype === 'thin';
  if (thin && plan.params.sizeMiB !== undefined) {
    throw new HotplugError(
      `block-lvsnap: ${o.vg}/${o.lv} is a thin volume: its snapshots are thin too and take their space from the pool, so they have no size; drop "${plan.params.sizeMiB}" from the params.`,
    );
  }
  const sizeMiB = thin
    ? undefined
    : (plan.params.sizeMiB ??
      Math.max(1, Math.min(ctx.config.cow.defaultSizeMiB, Math.ceil(Number(origin.sizeBytes) / 1048576))));
  const tag = plan.params.persistent ? TAG_PERSISTENT : TAG_TRANSIENT;
  const snap = plan.snap;

  const existing = await lvsOrFail(ctx.run, snap);
  let existed = false;
  if (existing) {
    const tags = existing.tags;
    const leftover = tags.includes(TAG_TRANSIENT) && !ownedElsewhere(ctx, snap);
    if (plan.params.persistent && tags.includes(TAG_PERSISTENT) && existing.origin === o.lv) {
      // One writer: the same domain's disk on another backend path (a migration's receiver on
      // this host: both ends name the snapshot after the domain) is refused while it is attached.
      if (ownedElsewhere(ctx, snap))
        throw new HotplugError(
          `block-lvsnap: the persistent snapshot ${snap.vg}/${snap.lv} is in use by another disk of this domain; a snapshot serves one writer: remove that disk first.`,
          'busy',
        );
      if (existing.invalid)
        throw new HotplugError(
          `block-lvsnap: the persistent snapshot ${snap.vg}/${snap.lv} overflowed and is invalid (attr ${existing.attr}); its data is lost: lvremove it to start afresh.`,
        );
      existed = true;
    } else if (leftover && !plan.params.persistent) {
      ctx.log.warn(`${ctx.request.xenbusPath}: removing leftover transient snapshot ${snap.vg}/${snap.lv}`);
      await removeSnapshot(ctx.run, snap, ctx.config.busyRetryMs);
    } else {
      const what = tags.includes(TAG_PERSISTENT)
        ? 'a persistent snapshot'
        : tags.includes(TAG_TRANSIENT)
          ? 'a snapshot in use by another disk'
          : 'a volume this tool did not make';
      throw new HotplugError(
        `block-lvsnap: ${snap.vg}/${snap.lv} already exists and is ${what}${existing.origin ? ` (of ${existing.origin})` : ''}; remove that disk, lvremove it, or ${plan.params.persistent ? 'drop' : 'add'} persistent.`,
        'busy',
      );
    }
  }
  await ctx.build.step(
    LVSNAP_STEP,
    {
      vg: snap.vg,
      lv: snap.lv,
      origin: o.lv,
      persistent: plan.params.persistent,
      existed,
      thin,
      ...(sizeMiB === undefined ? {} : { sizeMiB }),
    },
    async () => {
      if (existed) {
        ctx.log.info(`${ctx.request.xenbusPath}: reattaching persistent snapshot ${snap.vg}/${snap.lv}`);
        await lvActivate(ctx.run, snap);
        return;
      }
      await lvCreateSnapshot(ctx.run, o, snap.lv, sizeMiB, { addTag: tag });
    },
  );
  const made = await lvsOrFail(ctx.run, snap);
  if (!made) throw new HotplugError(`block-lvsnap: ${snap.vg}/${snap.lv} is missing right after lvcreate.`);
  const d = devOf(made, 'the snapshot');
  ctx.log.info(
    `${ctx.request.xenbusPath}: ${thin ? 'thin snapshot' : `snapshot with ${sizeMiB} MiB copy-on-write`} ${snap.vg}/${snap.lv} of ${o.vg}/${o.lv}`,
  );
  return d;
}

/** Another journal record holds a step for this LV. */
function ownedElsewhere(ctx: HookContext, snap: LvRef): boolean {
  return (
    recordsHolding(ctx.journal.list().entries, LVSNAP_STEP, { vg: snap.vg, lv: snap.lv }, ctx.build.entry.backendPath)
      .length > 0
  );
}

/** `lvremove -f`, retried while the volume is open (blkback lets go asynchronously). */
export async function removeSnapshot(run: Runner, r: LvRef, busyRetryMs: number): Promise<boolean> {
  const deadline = Date.now() + busyRetryMs;
  for (let delay = 100; ; delay = Math.min(delay * 2, 1000)) {
    try {
      return await lvRemove(run, r);
    } catch (e) {
      const busy = e instanceof CommandError && /in use|open|busy/i.test(e.result.stderr);
      if (!busy || Date.now() >= deadline) throw e;
    }
    await sleep(delay);
  }
}

async function undoLvsnap(step: StepRecord<'lv-snapshot'>, ctx: UndoContext): Promise<void> {
  const { vg, lv } = step.data;
  if (step.data.persistent && (step.data.existed || ctx.entry.device !== undefined)) {
    ctx.log.debug(`persistent snapshot ${vg}/${lv} kept`);
    return;
  }
  try {
    await removeSnapshot(ctx.run, { vg, lv }, ctx.config.busyRetryMs);
  } catch (e) {
    if (e instanceof CommandError && isLvNotFound(e.result.stderr)) return;
    throw e;
  }
}

// ---------------------------------------------------------------------------------------------
// grow and watch: `lvextend -L +N` of a classic snapshot; for a thin snapshot, of its LVM pool
// (data, or `--poolmetadatasize +N` for metadata). An Invalid snapshot cannot be saved by growing.

export function lvsnapRef(entry: JournalEntry): LvRef | undefined {
  const s = findStep(entry.steps, LVSNAP_STEP);
  return s ? { vg: s.data.vg, lv: s.data.lv } : undefined;
}

function lvDropped(l: LvInfo): string {
  return `${l.vg}/${l.lv} is Invalid (attr ${l.attr}): its copy-on-write area overflowed and the kernel dropped the snapshot; lvextend cannot bring it back (the disk must be removed and added again, its changes are lost)`;
}

export async function growLv(
  entry: JournalEntry,
  size: GrowSize | undefined,
  deps: GrowDeps,
  part: 'data' | 'metadata' = 'data',
): Promise<GrowAction> {
  const ref = lvsnapRef(entry);
  if (!ref) throw new GrowError(`${diskLabel(entry)} (${entry.backendPath}) has no snapshot (a read-only disk?)`);
  const snap = await lvInfo(deps.run, ref);
  if (!snap) throw new GrowError(`${ref.vg}/${ref.lv} does not exist any more`);
  if (snap.invalid) throw new GrowError(lvDropped(snap));
  const thin = snap.kind === 'thin';
  let target: LvRef = ref;
  let before = Number(snap.sizeBytes);
  if (thin) {
    if (!snap.pool) throw new GrowError(`${ref.vg}/${ref.lv} is a thin volume without a pool`);
    target = { vg: ref.vg, lv: snap.pool };
    const pool = await lvInfo(deps.run, target);
    if (!pool) throw new GrowError(`the pool ${ref.vg}/${snap.pool} of ${ref.vg}/${ref.lv} is not there`);
    before = Number(pool.sizeBytes);
  }
  if (part === 'metadata' && !thin)
    throw new GrowError(`${ref.vg}/${ref.lv} is a classic snapshot: it has no pool metadata to grow`);
  const add =
    size === undefined
      ? Math.max(MiB, Math.ceil((before * deps.config.watch.stepPercent) / 100))
      : size.relative
        ? size.bytes
        : size.bytes - before;
  if (add <= 0)
    throw new GrowError(
      `${target.vg}/${target.lv} is already ${human(before)}; ${human(size?.bytes ?? 0)} is not larger`,
    );
  const addMiB = Math.ceil(add / MiB);
  if (part === 'metadata') await lvExtendPoolMetadataBy(deps.run, target, addMiB);
  else await lvExtendBy(deps.run, target, addMiB);
  const now = await lvInfo(deps.run, target);
  const after = now ? Number(now.sizeBytes) : before + addMiB * MiB;
  const kind = !thin ? 'lv' : part === 'data' ? 'lv-pool-data' : 'lv-pool-metadata';
  deps.log.info(
    `grow ${entry.backendPath} (${diskLabel(entry)}): ${thin ? `thin pool ${target.vg}/${target.lv} ${part}` : `snapshot ${ref.vg}/${ref.lv}`} +${addMiB} MiB (lvextend)${part === 'data' ? `, ${human(before)} → ${human(after)}` : ''}`,
    { action: 'grow', kind },
  );
  return {
    backendPath: entry.backendPath,
    script: entry.script,
    kind,
    target: `${target.vg}/${target.lv}`,
    beforeBytes: before,
    afterBytes: after,
  };
}

async function watchLv(entry: JournalEntry, deps: GrowDeps): Promise<WatchOutcome> {
  const out: WatchOutcome = { findings: [], grown: [] };
  const ref = lvsnapRef(entry);
  if (!ref) return out;
  const name = `${ref.vg}/${ref.lv}`;
  const at = { backendPath: entry.backendPath, script: entry.script, device: name };
  const threshold = deps.config.watch.thresholdPercent;
  const l = await lvInfo(deps.run, ref);
  if (!l) {
    out.findings.push({
      ...at,
      state: 'error',
      message: `${name} (${entry.backendPath}) is recorded but LVM does not know it any more`,
    });
    return out;
  }
  if (l.invalid) {
    const m = `${name} (${entry.backendPath}) is Invalid (attr ${l.attr}): the snapshot overflowed and the kernel dropped it; the guest gets I/O errors and its changes are lost. Remove and add the disk again.`;
    out.findings.push({ ...at, state: 'invalid', message: m });
    return out;
  }
  if (l.kind === 'thin') {
    const pool = l.pool ? await lvInfo(deps.run, { vg: ref.vg, lv: l.pool }) : undefined;
    if (!pool) return out;
    const data = pool.dataPercent ?? 0;
    const meta = pool.metadataPercent ?? 0;
    if (data >= threshold) out.grown.push(await growLv(entry, undefined, deps, 'data'));
    if (meta >= threshold) out.grown.push(await growLv(entry, undefined, deps, 'metadata'));
    out.findings.push({
      ...at,
      device: `${ref.vg}/${l.pool}`,
      usedPercent: Math.max(data, meta),
      state: out.grown.length ? 'grown' : 'ok',
      message: `pool data ${data}% metadata ${meta}%`,
    });
    return out;
  }
  return growPastThreshold(out, at, l.dataPercent ?? 0, deps, {
    store: 'snapshot',
    grow: () => growLv(entry, undefined, deps),
    grown: 'lvextend to',
  });
}

// ---------------------------------------------------------------------------------------------
// resize: a thin snapshot is a thin LV of its own size (lvextend -L); a classic snapshot is as
// large as its origin and cannot be. Never smaller.

async function resizeLvsnap(entry: JournalEntry, bytes: number, deps: ResizeDeps): Promise<ResizeResult> {
  const who = diskLabel(entry);
  const ref = lvsnapRef(entry);
  if (!ref)
    throw new GrowError(`${who} (${entry.backendPath}) hands out its origin read-only: resize the origin LV itself`);
  const snap = await lvInfo(deps.run, ref);
  if (!snap) throw new GrowError(`${ref.vg}/${ref.lv} does not exist any more`);
  if (snap.kind !== 'thin')
    throw new GrowError(
      `${ref.vg}/${ref.lv} is a classic snapshot: it is as large as its origin and cannot be resized (a thin origin gives thin snapshots, which can)`,
    );
  const before = Number(snap.sizeBytes);
  const after = wholeMiB(bytes);
  if (after < before)
    throw new GrowError(
      `${who} is ${human(before)}: block-lvsnap never shrinks a snapshot (nothing says which blocks the guest wrote)`,
    );
  if (after === before) throw new GrowError(`${who} is already ${human(before)}`);
  await lvExtendTo(deps.run, `/dev/${ref.vg}/${ref.lv}`, after);
  const now = Number((await lvInfo(deps.run, ref))?.sizeBytes ?? after);
  const how = `thin snapshot ${ref.vg}/${ref.lv} extended (lvextend)`;
  deps.log.info(`resize ${entry.backendPath} (${who}): ${human(before)} → ${human(now)}: ${how}`, { action: 'resize' });
  return {
    backendPath: entry.backendPath,
    script: entry.script,
    target: `${ref.vg}/${ref.lv}`,
    beforeBytes: before,
    afterBytes: now,
    online: true,
    how,
  };
}

// ---------------------------------------------------------------------------------------------
// leftovers: transient snapshots (tagged when made) that no record names, that nothing holds
// open and that are older than a minute: a crash or a reboot left them, and their domain's next
// add would replace them anyway. Persistent snapshots carry another tag.

const LEFTOVER_AGE_S = 60;

async function leftoverSnapshots(ctx: LeftoverContext): Promise<Leftover[]> {
  const named = (lv: LvInfo) => recordsHolding(ctx.entries, LVSNAP_STEP, { vg: lv.vg, lv: lv.lv }).length > 0;
  const now = ctx.now / 1000;
  return (await lvsTagged(ctx.run, TAG_TRANSIENT))
    .filter(
      (lv) =>
        lv.tags.includes(TAG_TRANSIENT) &&
        !named(lv) &&
        lv.open === false &&
        lv.createdS !== undefined &&
        now - lv.createdS > LEFTOVER_AGE_S,
    )
    .map((lv) => ({
      kind: 'lv' as const,
      key: `${lv.vg}/${lv.lv}`,
      device: `/dev/${lv.vg}/${lv.lv}`,
      ...(lv.major !== undefined && lv.minor !== undefined ? { majmin: `${lv.major}:${lv.minor}` } : {}),
      ...(lv.origin ? { base: `${lv.vg}/${lv.origin}` } : {}),
      action: `lvremove -f ${lv.vg}/${lv.lv}`,
      why: `transient snapshot LV (tag ${TAG_TRANSIENT}) that no record names and nothing holds open (left by a crash or a reboot)`,
    }));
}

export const lvsnapBackend: Backend<LvsnapPlan> = {
  source: (params) =>
    sourceOf(() => {
      const o = parseLvsnapParams(params).origin;
      return `${o.vg}/${o.lv}`;
    }),
  transient: (plan) =>
    !plan.readOnly && !plan.params.persistent ? `transient snapshot ${plan.snap.vg}/${plan.snap.lv}` : undefined,
  script: 'block-lvsnap',
  summary: 'copy-on-write disk as an LVM snapshot of an origin logical volume (classic or thin)',
  usage: [
    `params: ${USAGE_LINE}`,
    '  vg/origin-lv  the golden image: an LV (classic or thin); names as LVM allows (letters, digits, + _ . -, no spaces)',
    '  cow-size      copy-on-write space of a classic snapshot: 512 (a bare number is MiB), 512M, 1.5G, 2T;',
    "                rounded up to whole MiB; default the smaller of the origin's size and cow.default_size.",
    '                A thin origin gets a thin snapshot: give no size',
    '  persistent    keep the snapshot after remove and reattach it on the next add of the same domain and vdev',
    'The snapshot is VG/xbh-<domain>-<vdev>. Run "xen-blockhooks watch" to lvextend classic snapshots before they fill up.',
    'xl:  disk = [ "vdev=xvda,access=w,script=block-lvsnap,target=vg0/golden 2G" ]',
    'xm:  disk = [ "lvsnap:vg0/golden 2G,xvda,w" ]',
    'access=r hands out the origin itself, read-only.',
  ].join('\n'),
  plan: (disk, ctx) => planLvsnap(disk, ctx),
  add: addLvsnap,
  undo: { [LVSNAP_STEP]: undoLvsnap },
  grow: (entry, size, deps, opts) => growLv(entry, size, deps, opts.part ?? 'data'),
  resize: resizeLvsnap,
  watch: watchLv,
  leftovers: leftoverSnapshots,
  async collect(l, ctx) {
    const ref = parseLvRef(l.key);
    await removeSnapshot(ctx.run, ref, ctx.config.busyRetryMs);
    ctx.log.info(`gc: removed leftover transient snapshot ${l.key}`);
  },
};
