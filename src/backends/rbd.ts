/**
 * block-rbd: copy-on-write disks on Ceph RBD layered clones, mapped with the kernel's rbd driver.
 *
 *   access=w  pool/golden@snap (protected) ──rbd clone──→ pool/xbh-<domain>-<vdev> ──rbd map──→ /dev/rbdN
 *   access=r  pool/golden@snap ──rbd map --read-only──→ /dev/rbdN   (no clone)
 *
 * params: `<pool>/<image>@<snapshot> [clone=transient|persistent] [name=IMAGE] [conf=PATH] [id=ID]
 * [keyring=PATH] [map_options=OPT,…]` (docs/block-rbd.md).
 *
 * add checks pool, image and snapshot first (`rbd info`); access=w needs the snapshot protected
 * (v1 clones do). Steps, journaled before each runs and undone newest first:
 *   rbd-clone  under a local lock. An existing clone must be a clone of this snapshot with no
 *              watcher (mapped nowhere), except on a migration's receiving end; a transient clone
 *              that exists and is not this host's is refused. Undo deletes a transient clone, or a
 *              persistent one this add created and never handed out.
 *   rbd-map    records the device and its major:minor. Undo unmaps our mapping, found in
 *              `rbd showmapped` by spec and device, never by name alone (the kernel reuses names).
 *
 * Sharing is the watcher check (`rbd status`), not the exclusive-lock feature: krbd hands that lock
 * to any client that asks, so two hosts could write in turns.
 *
 * A marker `<store_dir>/rbd/<pool>@<image>.json`, written before `rbd clone` and deleted once the
 * clone is gone, tells this host's transient leftovers (the journal in /run does not survive a
 * reboot) from another host's clone: only a marked clone with no record and no watcher is deleted,
 * by the next add of that disk or by `gc`.
 *
 * Live migration: the receiver (`NAME--incoming`) uses the clone named after NAME and may map it
 * while the sender still watches it; the sender's remove then finds it watched and keeps it (rbd rm
 * refuses a watched image), and the receiver's remove deletes it later.
 */
import { existsSync, mkdirSync, readdirSync, readFileSync, renameSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { isAbsolute, join } from 'node:path';
import type { Config } from '../config/config.js';
import type { Runner, RunResult } from '../devices/runner.js';
import {
  RBD_NAME,
  cloneArgs,
  infoArgs,
  mapArgs,
  missingWhat,
  parseInfo,
  parseMapOutput,
  parseShowMapped,
  parseStatus,
  rbdCommand,
  rbdReason,
  rmArgs,
  showMappedArgs,
  snapProtectArgs,
  specString,
  statusArgs,
  unmapArgs,
  type Cluster,
  type ImageInfo,
  type ImageSpec,
  type Mapping,
  type Watcher,
  resizeArgs,
} from '../devices/rbd.js';
import type { DiskSpec } from '../disk/spec.js';
import { isIncoming } from '../disk/migration.js';
import { HotplugError, messageOf } from '../disk/errors.js';
import {
  findStep,
  recordsHolding,
  stepsHolding,
  type JournalEntry,
  type StepKind,
  type StepRecord,
} from '../journal/journal.js';
import type { UndoContext, UndoRegistry } from '../journal/steps.js';
import { acquireFlock } from '../lock/flock.js';
import { lockOptions, stateLockPath } from '../lock/paths.js';
import { thisHost } from '../lock/store-owner.js';
import type { Logger } from '../log/logger.js';
import type { Backend, BuiltDevice, HookContext } from './types.js';
import { deviceSectors } from '../devices/sysfs.js';
import { diskLabel, GrowError, human, MiB, wholeMiB, type ResizeDeps, type ResizeResult } from './growth.js';
import { backendIds, domainOwner, persistentOwner } from './naming.js';
import { optionPairs, paramsRefusal, sourceOf, splitPathWords } from './params-words.js';

export const SCRIPT = 'block-rbd';
export const STEP = { clone: 'rbd-clone', map: 'rbd-map' } as const satisfies Record<string, StepKind>;

/** Each rbd call; several fit in libxl's 40 s only when the cluster answers. */
export const RBD_TIMEOUT_MS = 30_000;
/** The domain name xl gives the receiving side of a live migration until it completes. */
/** Where the host is looked at (tests point these elsewhere): sysfs, and udevd's control socket (present while udevd runs). */
export const rbdHost = { sysRoot: '/sys', udevControl: '/run/udev/control' };

export type CloneKind = 'transient' | 'persistent';

export interface RbdParams {
  pool: string;
  image: string;
  snap: string;
  clone: CloneKind;
  /** Clone image name (name=), instead of xbh-<domain>-<vdev>. */
  name: string | undefined;
  cluster: Cluster;
  /** Extra krbd map options. */
  mapOptions: string[];
}

const GRAMMAR =
  '<pool>/<image>@<snapshot> [clone=transient|persistent] [name=IMAGE] [conf=PATH] [id=ID] [keyring=PATH] [map_options=OPT,...]';
const MAP_OPTION = /^[a-z_]{1,32}(=[A-Za-z0-9._:-]{1,64})?$/;
/** Map options the hook decides itself. */
const RESERVED_MAP_OPTIONS = new Set(['ro', 'rw', 'read_only', 'read_write', 'noudev', 'udev', 'share', 'noshare']);

const bad = paramsRefusal(SCRIPT, GRAMMAR, 'rbd/debian12@golden clone=transient');

function checkName(params: string, kind: string, v: string): string {
  if (v === '') throw bad(params, `the ${kind} name is empty`);
  if (!RBD_NAME.test(v))
    throw bad(
      params,
      `the ${kind} name "${v}" is not accepted: use letters, digits, ".", "_", "-" (at most 100, not starting with "." or "-")`,
    );
  return v;
}

function absFile(params: string, key: string, v: string): string {
  if (!isAbsolute(v) || v.split('/').includes('..') || /[\s\0]/.test(v))
    throw bad(params, `${key}=${v}: give an absolute path without ".." or spaces`);
  return v;
}

export function parseRbdParams(params: string): RbdParams {
  const split = splitPathWords(params, (w) => /^[A-Za-z_]+=/.test(w));
  if (split === undefined) throw bad(params, 'no image given');
  const first = split.path.split(/\s/, 1)[0] as string;
  const spec = /^[^/@=]*\/[^/@=]*@[^/@=]*$/;
  if (split.lastWord !== undefined && !spec.test(first) && spec.test(split.path))
    throw bad(params, `"${split.path}": pool, image and snapshot names cannot contain spaces`);
  const m = /^([^/@]*)\/([^/@]*)@([^/@]*)$/.exec(first);
  if (!m) {
    if (first.includes('='))
      throw bad(params, `the first word "${first}" looks like an option; pool/image@snapshot comes first`);
    if (!first.includes('@'))
      throw bad(params, `"${first}" names no snapshot: clones are made of a snapshot, write pool/image@snapshot`);
    throw bad(params, `"${first}" is not pool/image@snapshot`);
  }
  if (split.lastWord !== undefined)
    throw bad(
      params,
      `"${split.lastWord}" is not a key=value option; pool/image@snapshot comes first and its names cannot contain spaces`,
    );
  const out: RbdParams = {
    pool: checkName(params, 'pool', m[1] as string),
    image: checkName(params, 'image', m[2] as string),
    snap: checkName(params, 'snapshot', m[3] as string),
    clone: 'transient',
    name: undefined,
    cluster: {},
    mapOptions: [],
  };
  for (const [key, value] of optionPairs(split.rest, (what) => bad(params, what))) {
    switch (key) {
      case 'clone':
        if (value !== 'transient' && value !== 'persistent')
          throw bad(params, `clone=${value}: the value must be transient or persistent`);
        out.clone = value;
        break;
      case 'name':
        out.name = checkName(params, 'clone image', value);
        break;
      case 'conf':
        out.cluster.conf = absFile(params, key, value);
        break;
      case 'keyring':
        out.cluster.keyring = absFile(params, key, value);
        break;
      case 'id':
        if (!/^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$/.test(value))
          throw bad(
            params,
            `id=${value}: a client id holds letters, digits, ".", "_", "-" (e.g. id=xen for client.xen)`,
          );
        out.cluster.id = value;
        break;
      case 'map_options':
        for (const o of value.split(',')) {
          if (!MAP_OPTION.test(o))
            throw bad(params, `map_options: "${o}" is not an option such as queue_depth=128 or lock_on_read`);
          if (RESERVED_MAP_OPTIONS.has(o.replace(/=.*$/, '')))
            throw bad(
              params,
              `map_options: "${o}" is chosen by the hook (read-only from access=, noudev when no udevd runs)`,
            );
          out.mapOptions.push(o);
        }
        break;
      default:
        throw bad(params, `unknown option "${key}" (known: clone=, name=, conf=, id=, keyring=, map_options=)`);
    }
  }
  if (out.name !== undefined && out.clone !== 'persistent')
    throw bad(params, `name=${out.name} names a persistent clone; add clone=persistent or drop name=`);
  if (out.name !== undefined && out.name === out.image)
    throw bad(params, `name=${out.name} is the golden image itself`);
  return out;
}

// ---------------------------------------------------------------------------------------------
// names and plan

/** `xbh-<domain>-<vdev>`: both ends of a migration name the same image (the `--incoming` suffix dropped). */
export function cloneName(
  p: RbdParams,
  disk: Pick<DiskSpec, 'domainName' | 'frontendId' | 'vdev'>,
  xenbusPath: string,
): string {
  if (p.name !== undefined) return p.name;
  if (p.clone === 'persistent') persistentOwner(SCRIPT, disk, xenbusPath, 'clone', 'name=IMAGE');
  const { domid, devid } = backendIds(xenbusPath);
  const owner = domainOwner(disk.domainName);
  if (owner === undefined) {
    if (p.clone === 'persistent') {
      throw new HotplugError(
        `${SCRIPT}: a persistent clone is named after its domain, and /local/domain/${disk.frontendId ?? domid}/name is not set; name the clone with name=IMAGE.`,
      );
    }
    return `xbh-d${disk.frontendId ?? domid}-${disk.vdev ?? devid}`;
  }
  const name = `xbh-${owner}-${disk.vdev ?? devid}`.slice(0, 100);
  if (!RBD_NAME.test(name))
    throw new HotplugError(
      `${SCRIPT}: cannot make an image name from domain "${owner}" and vdev "${disk.vdev}"; name the clone with name=IMAGE.`,
    );
  return name;
}

export interface RbdPlan {
  params: RbdParams;
  readOnly: boolean;
  parent: ImageSpec & { snap: string };
  /** The clone (access=w only). */
  clone: string | undefined;
  incoming: boolean;
}

export function planRbd(disk: DiskSpec, ctx: { xenbusPath: string }): RbdPlan {
  const params = parseRbdParams(disk.params);
  const readOnly = disk.mode === 'r';
  const clone = readOnly ? undefined : cloneName(params, disk, ctx.xenbusPath);
  if (clone !== undefined && clone === params.image)
    throw new HotplugError(
      `${SCRIPT}: the clone's name ${clone} is the golden image's own name; choose another name=.`,
    );
  return {
    params,
    readOnly,
    parent: { pool: params.pool, image: params.image, snap: params.snap },
    clone,
    incoming: isIncoming(disk.domainName),
  };
}

// ---------------------------------------------------------------------------------------------
// running rbd

/** Whether udevd runs (its control socket exists); without it map/unmap need `-o noudev`. */
export function udevRunning(control = rbdHost.udevControl): boolean {
  return existsSync(control);
}

function clusterWords(c: Cluster): string {
  return c.conf ? ` (cluster ${c.conf})` : '';
}

function failure(r: RunResult, what: string, c: Cluster): HotplugError {
  if (r.timedOut)
    return new HotplugError(
      `${SCRIPT}: ${what}: rbd got no answer within ${Math.round(r.durationMs / 1000)} s; is the Ceph cluster${clusterWords(c)} reachable?`,
    );
  if (r.exitCode === undefined)
    return new HotplugError(`${SCRIPT}: ${what}: rbd could not be started (install ceph-common).`);
  const why = rbdReason(r.stderr) || `status ${r.exitCode}`;
  const hint = /couldn't connect to the cluster|\(110\)|Connection refused/.test(r.stderr)
    ? `; is the Ceph cluster${clusterWords(c)} reachable, and are conf=, id= and keyring= right?`
    : '';
  return new HotplugError(`${SCRIPT}: ${what}: ${why}${hint}`);
}

async function rbd(run: Runner, args: string[]): Promise<RunResult> {
  return rbdCommand(run, args, RBD_TIMEOUT_MS);
}

/** `rbd info` of the golden snapshot, with the missing part named. */
export async function goldenInfo(run: Runner, p: RbdParams): Promise<ImageInfo> {
  const spec = { pool: p.pool, image: p.image, snap: p.snap };
  const r = await rbd(run, infoArgs(p.cluster, spec));
  if (r.failed) {
    const miss = r.exitCode === 2 ? missingWhat(r.stderr) : undefined;
    if (miss === 'pool')
      throw new HotplugError(
        `${SCRIPT}: pool "${p.pool}" does not exist in the Ceph cluster${clusterWords(p.cluster)}; check the pool in ${specString(spec)}.`,
      );
    if (miss === 'image')
      throw new HotplugError(
        `${SCRIPT}: image "${p.image}" does not exist in pool "${p.pool}"${clusterWords(p.cluster)}; check the image in ${specString(spec)}.`,
      );
    if (miss === 'snapshot')
      throw new HotplugError(
        `${SCRIPT}: image ${p.pool}/${p.image} has no snapshot "${p.snap}"; create it with "rbd snap create ${specString(spec)}" or name an existing one (rbd snap ls ${p.pool}/${p.image}).`,
      );
    throw failure(r, `cannot read ${specString(spec)}`, p.cluster);
  }
  try {
    return parseInfo(r.stdout);
  } catch (e) {
    throw new HotplugError(`${SCRIPT}: ${specString(spec)}: ${messageOf(e)}`);
  }
}

/** Protect the snapshot unless it is protected already (another add may protect it meanwhile). */
export async function ensureProtected(run: Runner, p: RbdParams, info: ImageInfo): Promise<void> {
  if (info.protected === true) return;
  const spec = { pool: p.pool, image: p.image, snap: p.snap };
  const r = await rbd(run, snapProtectArgs(p.cluster, spec));
  if (!r.failed) return;
  if (r.exitCode === 16 || /already protected/.test(r.stderr)) return;
  throw failure(
    r,
    `cannot protect snapshot ${specString(spec)} (a layered clone needs a protected snapshot)`,
    p.cluster,
  );
}

/** `rbd info` of an image; undefined when it does not exist. */
export async function imageInfo(run: Runner, c: Cluster, s: Omit<ImageSpec, 'snap'>): Promise<ImageInfo | undefined> {
  const r = await rbd(run, infoArgs(c, s));
  if (r.failed) {
    if (r.exitCode === 2 && missingWhat(r.stderr) === 'image') return undefined;
    throw failure(r, `cannot read ${specString(s)}`, c);
  }
  return parseInfo(r.stdout);
}

export async function watchers(run: Runner, c: Cluster, s: Omit<ImageSpec, 'snap'>): Promise<Watcher[] | undefined> {
  const r = await rbd(run, statusArgs(c, s));
  if (r.failed) {
    if (r.exitCode === 2 && missingWhat(r.stderr) === 'image') return undefined;
    throw failure(r, `cannot read the watchers of ${specString(s)}`, c);
  }
  return parseStatus(r.stdout);
}

export async function showMapped(run: Runner, c: Cluster): Promise<Mapping[]> {
  const r = await rbd(run, showMappedArgs(c));
  if (r.failed) throw failure(r, 'cannot list mapped rbd devices', c);
  return parseShowMapped(r.stdout);
}

function mapsSpec(m: Mapping, s: ImageSpec): boolean {
  return m.pool === s.pool && m.namespace === '' && m.name === s.image && m.snap === s.snap;
}

/** The kernel's major:minor of /dev/rbdN, from sysfs. */
export function sysDev(device: string, sysRoot = rbdHost.sysRoot): { major: number; minor: number } {
  const name = device.replace(/^\/dev\//, '');
  const text = readFileSync(`${sysRoot}/block/${name}/dev`, 'utf8').trim();
  const m = /^(\d+):(\d+)$/.exec(text);
  if (!m) throw new Error(`${sysRoot}/block/${name}/dev says "${text}"`);
  return { major: Number(m[1]), minor: Number(m[2]) };
}

function readOnlyFlag(device: string, sysRoot = rbdHost.sysRoot): boolean | undefined {
  try {
    return readFileSync(`${sysRoot}/block/${device.replace(/^\/dev\//, '')}/ro`, 'utf8').trim() === '1';
  } catch {
    return undefined;
  }
}

function describeWatchers(ws: Watcher[]): string {
  return ws.map((w) => `client.${w.client} at ${w.address}`).join(', ');
}

/** Other records on this host that use the clone. */
export function localUsers(entries: JournalEntry[], pool: string, image: string, self: string): JournalEntry[] {
  return recordsHolding(entries, STEP.clone, { pool, image }, self);
}

function rbdLockPath(config: Config, pool: string, image: string): string {
  return stateLockPath(config.stateDir, `rbd-${pool}-${image}`);
}

// ---------------------------------------------------------------------------------------------
// markers of the transient clones this host made

export interface CloneMarker {
  pool: string;
  image: string;
  cluster: Cluster;
  backendPath: string;
  machine: string;
  host: string;
  boot: string;
  made: string;
}

export function markerDir(config: Pick<Config, 'storeDir'>): string {
  return join(config.storeDir, 'rbd');
}

export function cloneMarkerPath(config: Pick<Config, 'storeDir'>, pool: string, image: string): string {
  return join(markerDir(config), `${encodeURIComponent(pool)}@${encodeURIComponent(image)}.json`);
}

function readMarker(file: string): CloneMarker | undefined {
  try {
    const m = JSON.parse(readFileSync(file, 'utf8')) as CloneMarker;
    return typeof m.pool === 'string' && typeof m.image === 'string' && typeof m.machine === 'string' ? m : undefined;
  } catch {
    return undefined;
  }
}

/** This host's marker of the clone, if any (another host's, on a shared store_dir, is not). */
export function ownMarker(config: Pick<Config, 'storeDir'>, pool: string, image: string): CloneMarker | undefined {
  const m = readMarker(cloneMarkerPath(config, pool, image));
  const me = thisHost();
  return m && m.machine === me.machine && m.host === me.host ? m : undefined;
}

function writeMarker(
  config: Pick<Config, 'storeDir'>,
  m: Omit<CloneMarker, 'machine' | 'host' | 'boot' | 'made'>,
): void {
  const { machine, host, boot } = thisHost();
  mkdirSync(markerDir(config), { recursive: true, mode: 0o700 });
  const file = cloneMarkerPath(config, m.pool, m.image);
  const tmp = `${file}.${process.pid}.tmp`;
  writeFileSync(tmp, `${JSON.stringify({ ...m, machine, host, boot, made: new Date().toISOString() })}\n`, {
    mode: 0o600,
  });
  renameSync(tmp, file);
}

function dropMarker(config: Pick<Config, 'storeDir'>, pool: string, image: string): void {
  if (ownMarker(config, pool, image)) rmSync(cloneMarkerPath(config, pool, image), { force: true });
}

/**
 * This host's markers of transient clones that no journal record holds and that are older than
 * a minute (an add writes its marker after journaling, under the clone's lock): what a crash or a
 * reboot left in the cluster.
 */
export function leftoverClones(
  config: Pick<Config, 'storeDir'>,
  entries: readonly JournalEntry[],
  minAgeMs = 60_000,
): { file: string; marker: CloneMarker }[] {
  let names: string[];
  try {
    names = readdirSync(markerDir(config))
      .filter((n) => n.endsWith('.json'))
      .sort();
  } catch {
    return [];
  }
  const out: { file: string; marker: CloneMarker }[] = [];
  for (const n of names) {
    const file = join(markerDir(config), n);
    const m = readMarker(file);
    if (!m || ownMarker(config, m.pool, m.image) === undefined) continue;
    try {
      if (Date.now() - statSync(file).mtimeMs < minAgeMs) continue;
    } catch {
      continue;
    }
    if (localUsers([...entries], m.pool, m.image, '').length > 0) continue;
    out.push({ file, marker: m });
  }
  return out;
}

/** `rbd rm` of a clone; true when it is gone (or was), an error when it is still watched. */
async function removeClone(
  run: Runner,
  c: Cluster,
  target: { pool: string; image: string },
): Promise<'removed' | 'absent' | 'watched'> {
  const r = await rbd(run, rmArgs(c, target));
  if (!r.failed) return 'removed';
  if (r.exitCode === 2 && /No such file/.test(r.stderr)) return 'absent';
  if (r.exitCode === 16 && /watchers/.test(r.stderr)) return 'watched';
  throw new Error(`rbd rm ${specString(target)}: ${rbdReason(r.stderr) || `status ${r.exitCode}`}`);
}

/** gc: delete a leftover transient clone this host made, judged again under its lock. */
export async function collectClone(
  run: Runner,
  config: Config,
  journal: { list(): { entries: JournalEntry[] } },
  log: Logger,
  pool: string,
  image: string,
): Promise<void> {
  const lock = await acquireFlock(rbdLockPath(config, pool, image), lockOptions(config, run));
  try {
    const m = ownMarker(config, pool, image);
    if (!m || localUsers(journal.list().entries, pool, image, '').length > 0)
      throw new Error(`${pool}/${image} is held by a record now (or its marker is gone); left alone`);
    const res = await removeClone(run, m.cluster, { pool, image });
    if (res === 'watched') throw new Error(`${pool}/${image} is open somewhere (it has watchers); left alone`);
    dropMarker(config, pool, image);
    log.info(
      `gc: ${res === 'removed' ? 'deleted' : 'forgot (already gone)'} leftover transient clone ${pool}/${image}`,
    );
  } finally {
    await lock.release();
  }
}

// ---------------------------------------------------------------------------------------------
// add

/** An existing clone may be used: a clone of this snapshot, and unwatched and persistent, or taken over by a migration's receiver. */
async function checkExisting(
  ctx: HookContext,
  plan: RbdPlan,
  target: { pool: string; image: string },
  known?: ImageInfo,
  ownLeftover = false,
): Promise<'use' | 'leftover'> {
  const p = plan.params;
  const existing = known ?? (await imageInfo(ctx.run, p.cluster, target));
  if (!existing)
    throw new HotplugError(
      `${SCRIPT}: ${specString(target)} exists and vanished again while this add looked at it; try again.`,
    );
  const par = existing.parent;
  if (!par || par.pool !== p.pool || par.image !== p.image || par.snapshot !== p.snap || par.namespace !== '') {
    const what = par ? `a clone of ${par.pool}/${par.image}@${par.snapshot}` : 'not a clone';
    throw new HotplugError(
      `${SCRIPT}: image ${specString(target)} exists and is ${what}, not of ${p.pool}/${p.image}@${p.snap}; move it away (rbd mv) or choose another name=.`,
    );
  }
  const ws = (await watchers(ctx.run, p.cluster, target)) ?? [];
  if (ws.length > 0 && !plan.incoming) {
    throw new HotplugError(
      `${SCRIPT}: ${specString(target)} is open by ${describeWatchers(ws)} (mapped on this or another host); a clone is never given to a second writer. Remove the disk there first.`,
      'busy',
    );
  }
  if (p.clone !== 'persistent' && !plan.incoming && ownLeftover) return 'leftover';
  if (p.clone !== 'persistent' && !plan.incoming) {
    throw new HotplugError(
      `${SCRIPT}: the transient clone ${specString(target)} already exists and no record on this host made it (left by another host, or by a crash there); ` +
        `it is not reused, so that a transient disk never starts with someone's data. Delete it with "rbd rm ${specString(target)}" once nobody uses it.`,
      'busy',
    );
  }
  if (ws.length > 0)
    ctx.log.info(
      `${SCRIPT}: ${specString(target)} is mapped by ${describeWatchers(ws)}: taking it over for a live migration (domain ${ctx.disk.domainName})`,
    );
  return 'use';
}

/** Returns whether the clone was created by this add. */
async function claimClone(ctx: HookContext, plan: RbdPlan): Promise<boolean> {
  const { run, config } = ctx;
  const p = plan.params;
  const image = plan.clone as string;
  const target = { pool: p.pool, image };
  const persistent = p.clone === 'persistent';
  const lock = await acquireFlock(rbdLockPath(config, p.pool, image), lockOptions(config, run));
  try {
    const { entries, unreadable } = ctx.journal.list();
    if (unreadable.length > 0)
      ctx.log.warn(
        `journal records ${unreadable.map((u) => u.file).join(', ')} cannot be read; their disks are not seen by the sharing check`,
      );
    const others = localUsers(entries, p.pool, image, ctx.request.xenbusPath);
    // A migration to this same host (xl migrate localhost) finds the sender's record here.
    if (others.length > 0 && !plan.incoming) {
      const o = others[0] as JournalEntry;
      throw new HotplugError(
        `${SCRIPT}: ${specString(target)} is already in use on this host by ${o.backendPath}${o.disk.domainName ? ` (domain ${o.disk.domainName})` : ''}; a clone is never given to a second writer.`,
        'busy',
      );
    }
    // A persistent clone, or the clone a migration's receiver takes over, usually exists: look
    // first, so that the record says so before anything runs (its undo then never deletes it). A
    // transient clone usually does not: `rbd clone` decides atomically (EEXIST), one command.
    let existed = false;
    // A persistent clone of this name is never a transient leftover: a marker this host left
    // for an earlier transient clone of the same name must not make gc or a later add delete it.
    if (persistent) dropMarker(config, p.pool, image);
    if (persistent || plan.incoming) {
      const info = await imageInfo(run, p.cluster, target);
      if (info) {
        await checkExisting(ctx, plan, target, info);
        existed = true;
      }
    }
    await ctx.build.step(
      STEP.clone,
      { cluster: p.cluster, pool: p.pool, image, parent: plan.parent, persistent, existed, incoming: plan.incoming },
      async (note) => {
        if (existed) return;
        const transient = !persistent && !plan.incoming;
        // A marker from before this add: this host's says a clone found now is this host's
        // leftover; another host's (a shared store_dir) is that host's to keep.
        const found = transient ? readMarker(cloneMarkerPath(config, p.pool, image)) : undefined;
        const leftoverMarker = found && ownMarker(config, p.pool, image);
        const mark = () =>
          writeMarker(config, { pool: p.pool, image, cluster: p.cluster, backendPath: ctx.request.xenbusPath });
        if (transient && (!found || leftoverMarker)) mark();
        let r = await rbd(run, cloneArgs(p.cluster, plan.parent, target));
        if (!r.failed) {
          if (transient && found && !leftoverMarker) mark(); // the other host's marker named no clone
          return;
        }
        if (r.exitCode !== 17) {
          if (transient && !found) dropMarker(config, p.pool, image);
          throw failure(r, `cannot clone ${specString(plan.parent)} to ${specString(target)}`, p.cluster);
        }
        // Not made by this add: whatever happens next, undo never deletes it unless it was handed out.
        existed = true;
        note({ existed: true });
        if (leftoverMarker) {
          // Made by this host (its marker says so): when no record here holds it and nobody has
          // it open, it is a crash's or a reboot's leftover, whose data died with its domain.
          await checkExisting(ctx, plan, target, undefined, true);
          ctx.log.warn(
            `${SCRIPT}: deleting leftover transient clone ${specString(target)} (made by this host ${leftoverMarker.made} for ${leftoverMarker.backendPath}; no record holds it and nobody has it open) and cloning afresh`,
          );
          if ((await removeClone(run, p.cluster, target)) === 'watched')
            throw new HotplugError(
              `${SCRIPT}: ${specString(target)} was opened by another client while this add replaced it; try again.`,
              'busy',
            );
          existed = false;
          note({ existed: false });
          r = await rbd(run, cloneArgs(p.cluster, plan.parent, target));
          if (!r.failed) return;
          throw failure(r, `cannot clone ${specString(plan.parent)} to ${specString(target)}`, p.cluster);
        }
        if (transient && !found) dropMarker(config, p.pool, image);
        await checkExisting(ctx, plan, target);
      },
    );
    return !existed;
  } finally {
    await lock.release();
  }
}

async function mapImage(ctx: HookContext, plan: RbdPlan, spec: ImageSpec, fresh: boolean): Promise<BuiltDevice> {
  const { run } = ctx;
  const c = plan.params.cluster;
  const noudev = !udevRunning();
  // The mappings of the spec that are not ours, for an undo that never learned our device. A clone
  // this add just made has none; a snapshot (other read-only disks) or a clone taken over for a
  // migration (the sender, on this same host) may.
  const before = fresh ? [] : (await showMapped(run, c)).filter((m) => mapsSpec(m, spec)).map((m) => m.device);
  const info = await ctx.build.step(
    STEP.map,
    { cluster: c, spec, readOnly: plan.readOnly, noudev, before },
    async (note) => {
      const r = await rbd(run, mapArgs(c, spec, { readOnly: plan.readOnly, noudev, options: plan.params.mapOptions }));
      if (r.failed) {
        const hint =
          /\(2\)|No such file/.test(r.stderr) && !existsSync(`${rbdHost.sysRoot}/bus/rbd`)
            ? ' (the rbd kernel module is not loaded: modprobe rbd)'
            : '';
        throw failure(r, `cannot map ${specString(spec)}${hint}`, c);
      }
      const device = parseMapOutput(r.stdout);
      note({ device });
      const mm = sysDev(device);
      if (plan.readOnly && readOnlyFlag(device) !== true)
        throw new HotplugError(`${SCRIPT}: ${device} should be read-only but the kernel says it is writable.`);
      return { device, ...mm };
    },
    (r) => ({ device: r.device, major: r.major, minor: r.minor }),
  );
  return { path: info.device, major: info.major, minor: info.minor };
}

export async function addRbd(ctx: HookContext, plan: RbdPlan): Promise<BuiltDevice> {
  const p = plan.params;
  const golden = await goldenInfo(ctx.run, p);
  if (plan.readOnly) return mapImage(ctx, plan, plan.parent, false);
  if (!golden.features.includes('layering')) {
    throw new HotplugError(
      `${SCRIPT}: ${p.pool}/${p.image} lacks the layering feature, so it cannot be cloned; enable it with "rbd feature enable ${p.pool}/${p.image} layering".`,
    );
  }
  await ensureProtected(ctx.run, p, golden);
  const fresh = await claimClone(ctx, plan);
  return mapImage(ctx, plan, { pool: p.pool, image: plan.clone as string }, fresh);
}

// ---------------------------------------------------------------------------------------------
// resize: `rbd resize` of the clone; the kernel's rbd device follows the image's new size (krbd
// watches the image header), and blkback passes it on. Never smaller; the golden snapshot and a
// read-only mapping of it are never resized.

async function resizeRbd(entry: JournalEntry, bytes: number, deps: ResizeDeps): Promise<ResizeResult> {
  const who = diskLabel(entry);
  const clone = findStep(entry.steps, STEP.clone, (s) => s.done);
  const map = findStep(entry.steps, STEP.map, (s) => s.done && s.data.device !== undefined);
  const mapped = map?.data.device;
  if (!clone || !map || mapped === undefined || !entry.device)
    throw new GrowError(`${who} (${entry.backendPath}) maps the golden snapshot read-only: it is the snapshot's size`);
  const before = deviceSectors(deps.run, entry.device.major, entry.device.minor) * 512;
  const after = wholeMiB(bytes);
  if (after < before)
    throw new GrowError(
      `${who} is ${human(before)}: block-rbd never shrinks a clone (nothing says which blocks the guest wrote)`,
    );
  if (after === before) throw new GrowError(`${who} is already ${human(before)}`);
  const target = { pool: clone.data.pool, image: clone.data.image };
  const c = clusterOf(map);
  const r = await rbd(deps.run, resizeArgs(c, target, after / MiB));
  if (r.failed) throw failure(r, `cannot resize ${specString(target)}`, c);
  // krbd applies the new size when the header watch fires: wait for it briefly, then say so.
  let now = before;
  for (let i = 0; i < 50 && now < after; i++) {
    await sleep(100);
    now = deviceSectors(deps.run, entry.device.major, entry.device.minor) * 512;
  }
  const how = `${specString(target)} resized (rbd resize)${now < after ? `; ${mapped} still shows ${human(now)}` : ''}`;
  deps.log.info(`resize ${entry.backendPath} (${who}): ${human(before)} → ${human(after)}: ${how}`, {
    action: 'resize',
  });
  return {
    backendPath: entry.backendPath,
    script: entry.script,
    target: specString(target),
    beforeBytes: before,
    afterBytes: now,
    online: true,
    how,
  };
}

// ---------------------------------------------------------------------------------------------
// undo

function clusterOf(step: StepRecord<typeof STEP.clone | typeof STEP.map>): Cluster {
  const { conf, id, keyring } = step.data.cluster;
  return { conf, id, keyring };
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function unmapDevice(ctx: UndoContext, c: Cluster, device: string): Promise<void> {
  const noudev = !udevRunning();
  const until = Date.now() + Math.min(ctx.config.busyRetryMs, 20_000);
  for (;;) {
    const r = await rbd(ctx.run, unmapArgs(c, device, { noudev }));
    if (!r.failed) return;
    // blkback lets go of the device asynchronously: retry EBUSY for a bounded time.
    if (r.exitCode === 16 && Date.now() < until) {
      await sleep(300);
      continue;
    }
    throw new Error(`rbd unmap ${device}: ${rbdReason(r.stderr) || `status ${r.exitCode}`}`);
  }
}

async function undoMap(step: StepRecord<'rbd-map'>, ctx: UndoContext): Promise<void> {
  const { spec: s, device } = step.data;
  const c = clusterOf(step);
  const before = new Set(step.data.before);
  const mapped = (await showMapped(ctx.run, c)).filter((m) => mapsSpec(m, s));
  let ours: Mapping[];
  if (device !== undefined) ours = mapped.filter((m) => m.device === device);
  else {
    // Killed between `rbd map` and the record of its device: the mappings of the spec that were
    // not there before and that no other record names.
    const claimed = new Set(
      stepsHolding(ctx.journal.list().entries, STEP.map, {}, ctx.entry.backendPath).map((h) => h.step.data.device),
    );
    ours = mapped.filter((m) => !before.has(m.device) && !claimed.has(m.device));
    if (ours.length > 1)
      throw new Error(
        `${specString(s)} gained ${ours.length} mappings (${ours.map((m) => m.device).join(', ')}) while this add was killed; cannot tell which is ours: unmap it by hand, then run "xen-blockhooks gc"`,
      );
  }
  for (const m of ours) await unmapDevice(ctx, c, m.device);
}

async function undoClone(step: StepRecord<'rbd-clone'>, ctx: UndoContext): Promise<void> {
  const { pool, image, existed } = step.data;
  const c = clusterOf(step);
  const target = { pool, image };
  const handedOut = ctx.entry.device !== undefined;
  if (step.data.persistent) {
    // A persistent clone stays, unless this very add created it and never handed it out.
    if (existed || handedOut) return;
  } else if (existed && !handedOut) {
    // Taken over for a migration that did not complete: the sender still runs on it.
    ctx.log.info(`${SCRIPT}: keeping ${specString(target)}: this add found it and never handed it out`);
    return;
  }
  // rbd rm refuses an image that has watchers (EBUSY): the check and the delete are one step.
  if ((await removeClone(ctx.run, c, target)) === 'watched') {
    ctx.log.warn(
      `${SCRIPT}: keeping ${specString(target)}: it still has watchers, i.e. it is mapped or open elsewhere (the disk lives on there, e.g. after a live migration)`,
    );
    return;
  }
  dropMarker(ctx.config, pool, image);
}

export const rbdUndo: UndoRegistry = {
  [STEP.clone]: undoClone,
  [STEP.map]: undoMap,
};

export const rbdBackend: Backend<RbdPlan> = {
  source: (params) =>
    sourceOf(() => {
      const p = parseRbdParams(params);
      return `${p.pool}/${p.image}@${p.snap}`;
    }),
  transient: (plan) =>
    plan.clone !== undefined && plan.params.clone === 'transient'
      ? `transient clone ${plan.params.pool}/${plan.clone}`
      : undefined,
  // Both ends of a migration name the same clone (cloneName drops --incoming): the receiver maps it.
  migrates: true,
  script: SCRIPT,
  summary: 'copy-on-write disks on Ceph RBD layered clones of a golden snapshot, mapped with the kernel rbd driver',
  usage: [
    `params: ${GRAMMAR}`,
    '  pool/image@snapshot   the golden snapshot (protected on first use); access=r maps it read-only, no clone',
    '  clone=transient       (default) access=w clones it to pool/xbh-<domain>-<vdev>, deleted on remove',
    '  clone=persistent      the same clone is kept on remove and reused by the next add',
    "  name=IMAGE            the persistent clone's image name (in the same pool)",
    '  conf=PATH id=ID keyring=PATH   the cluster and client (default /etc/ceph/ceph.conf, client.admin)',
    '  map_options=OPT,...   extra krbd map options (noudev is added by itself when no udevd runs)',
    'xl:  disk = [ "vdev=xvda,access=w,script=block-rbd,target=rbd/debian12@golden" ]',
    'A clone open anywhere in the cluster (an rbd watcher) is never mapped writable again, except by the receiving side of a live migration.',
  ].join('\n'),
  plan: (disk, ctx) => planRbd(disk, ctx),
  add: addRbd,
  undo: rbdUndo,
  resize: resizeRbd,
  leftovers: async (ctx) =>
    leftoverClones(ctx.config, ctx.entries).map(({ file, marker: m }) => ({
      kind: 'rbd' as const,
      key: `${m.pool}/${m.image}`,
      store: file,
      action: `rbd rm ${m.pool}/${m.image}`,
      why: `transient RBD clone this host made ${m.made} for ${m.backendPath}, which no record holds (left by a crash or a reboot)`,
    })),
  collect(l, ctx) {
    const at = l.key.indexOf('/');
    return collectClone(ctx.run, ctx.config, ctx.journal, ctx.log, l.key.slice(0, at), l.key.slice(at + 1));
  },
};
