/**
 * A domain's disks through the toolstack's operations beyond create and destroy (docs/lifecycle.md
 * has the table per hook):
 *
 *   xl save: our remove runs while the domain is shut down with reason "suspend". A record whose
 *     guest data lives only as long as its devices (JournalEntry.transient) is *held*: nothing is
 *     undone, the record moves to `held/<uuid>/<devid>`, and a marker
 *     `<store_dir>/saved/<uuid>-<devid>.json` says so, with its boot.
 *   xl restore: before planning, the add looks for its uuid and devid's marker. A held record with
 *     the same hook, params and mode whose device is still in the kernel is adopted and the same
 *     device reported; anything else (a dom0 reboot or crash since, a changed disk spec) is refused
 *     with a hotplug-error, nothing built and the marker kept, so a retry is never handed a fresh
 *     disk. A restore that fails before the guest ran (no `sectors` on the backend) holds the
 *     record again.
 *   xl migrate: on the receiving `NAME--incoming`, a disk with transient data is refused unless the
 *     backend hands it over itself (Backend.migrates); the sender (`NAME--migratedaway`) undoes as
 *     usual.
 *   Bootloader (pygrub, frontend-id 0): nothing is held for dom0, which is never saved.
 *
 * A persistent store is undone at save as at destroy; only its claim (lock/store-owner.ts) is kept,
 * named by a `claims` marker, so that no other host takes the store and gc does not release it
 * while the saved domain waits; the restore's add hands the claim to its new backend path.
 */
import { readFileSync, readlinkSync } from 'node:fs';
import type { Config } from '../config/config.js';
import type { Runner } from '../devices/runner.js';
import { sysBlockDir } from '../devices/sysfs.js';
import { recordStrings, type HeldFor, type Journal, type JournalEntry } from '../journal/journal.js';
import { undoAll, type UndoRegistry } from '../journal/steps.js';
import { handOverClaim, thisHost } from '../lock/store-owner.js';
import type { Logger } from '../log/logger.js';
import type { XenstoreClient, XsOps } from '../xenstore/types.js';
import { uuidOfVmPath, type DiskSpec } from '../disk/spec.js';
import { HotplugError } from '../disk/errors.js';
import { isMigratedAway } from '../disk/migration.js';
import { deleteMarker, heldKey, markerPath, readMarkerSafe, writeMarker, type SavedDisk } from '../journal/saved.js';

// ---------------------------------------------------------------------------------------------
// is the domain being saved?

export interface XlDomain {
  /** The six state letters: running, blocked, paused, shutdown, the shutdown reason's letter from "-rscwS", dying. */
  state: string;
  /** CPU time used, in seconds (one decimal). */
  cpuSeconds: number;
}

/** What `xl list` prints for `domid`, or undefined when the line is not there. */
export function xlDomainOf(stdout: string, domid: number): XlDomain | undefined {
  for (const line of stdout.split('\n')) {
    const m = /^(.*\S)\s+(\d+)\s+\d+\s+\d+\s+([-r][-b][-p][-s][-rscwS?][-d])\s+([\d.]+)/.exec(line);
    if (m && Number(m[2]) === domid) return { state: m[3] as string, cpuSeconds: Number(m[4]) };
  }
  return undefined;
}

/** The state letters alone (xlDomainOf). */
export function xlStateOf(stdout: string, domid: number): string | undefined {
  return xlDomainOf(stdout, domid)?.state;
}

/** Shut down, and the reason is suspend (SHUTDOWN_suspend): the domain is being saved or migrated. */
export function stateIsSuspended(state: string): boolean {
  return state[3] === 's' && state[4] === 's';
}

/**
 * The xl subcommand of the process that ran this hook (libxl forks the script from the xl
 * process: `xl save web FILE`, `xl destroy web`), or undefined when the parent is not xl (libvirt,
 * a test, simulate). Read from /proc, no process started.
 */
export function xlParentCommand(procRoot = '/proc', ppid = process.ppid): string | undefined {
  let argv: string[];
  try {
    argv = readFileSync(`${procRoot}/${ppid}/cmdline`, 'utf8').split('\0').filter(Boolean);
  } catch {
    return undefined;
  }
  if (!/(^|\/)xl$/.test(argv[0] ?? '')) return undefined;
  return argv.slice(1).find((a) => !a.startsWith('-')) ?? '';
}

/** xl subcommands that suspend a domain and then destroy it (the others never remove a suspended domain's disks). */
const SUSPENDING_XL = new Set(['save', 'migrate', 'remus', 'colo']);

/**
 * Domain `domid` as the hypervisor sees it, asked through `xl list` (libxl_domain_info: its state,
 * the shutdown reason, its CPU time). No xl, or no such domain: undefined.
 */
export async function xlDomain(run: Runner, domid: number, log: Logger): Promise<XlDomain | undefined> {
  const r = await run.probe('xl', ['list', String(domid)], { timeoutMs: 10_000 });
  if (r.failed) {
    log.debug(`${r.command}: ${r.stderr.trim() || `exit ${r.exitCode}`}; domain ${domid} unknown to xl`);
    return undefined;
  }
  return xlDomainOf(r.stdout, domid);
}

// ---------------------------------------------------------------------------------------------
// remove: hold instead of undo

export interface LifecycleEnv {
  config: Config;
  run: Runner;
  log: Logger;
  journal: Journal;
  /** The process that started the hook (default: this process's parent; see RuntimeDeps.parentPid). */
  parentPid?: number | undefined;
}

function devidOf(backendPath: string): string {
  return /(\d+)$/.exec(backendPath)?.[1] ?? '0';
}

function domidOf(entry: JournalEntry): number | undefined {
  if (entry.disk.frontendId !== undefined) return entry.disk.frontendId;
  const m = /backend\/vbd3?\/(\d+)\/\d+$/.exec(entry.backendPath);
  return m ? Number(m[1]) : undefined;
}

/**
 * Why `entry` must be held rather than undone by this remove, or undefined to undo it. Only a
 * record with transient data of a domain other than dom0 is ever held: one whose domain is being
 * saved, or one a restore adopted whose guest never connected (the restore failed).
 */
export async function holdReason(e: LifecycleEnv, xs: XsOps, entry: JournalEntry): Promise<string | undefined> {
  if (!entry.transient) return undefined;
  return savingReason(e, xs, entry);
}

/**
 * Why `entry`'s domain counts as being saved (or, for a restored record, as a restore that ended
 * before its guest ran), or undefined. holdReason for any record, transient or not.
 */
export async function savingReason(e: LifecycleEnv, xs: XsOps, entry: JournalEntry): Promise<string | undefined> {
  if (entry.phase !== 'ready') return undefined;
  const domid = domidOf(entry);
  if (domid === undefined || domid === 0) return undefined;
  const name = (await xs.tryRead(`/local/domain/${domid}/name`).catch(() => undefined)) ?? entry.disk.domainName;
  if (isMigratedAway(name)) return undefined;
  // Run by xl for a command that never saves (destroy, shutdown, block-detach, create's own
  // clean-up): nothing to ask. Otherwise (xl save or migrate, or another toolstack) ask xl.
  const parent = xlParentCommand('/proc', e.parentPid ?? process.ppid);
  if (parent !== undefined && !SUSPENDING_XL.has(parent) && !entry.restored) return undefined;
  const dom = await xlDomain(e.run, domid, e.log);
  if (dom && stateIsSuspended(dom.state)) return `domain ${domid}${name ? ` (${name})` : ''} is being saved`;
  // A restore that fails after its disks were added destroys the domain before it ran: it never
  // used a moment of CPU, and blkback never saw its frontend connect (no `sectors`).
  if (
    entry.restored &&
    (dom === undefined || dom.cpuSeconds === 0) &&
    (await xs.tryRead(`${entry.backendPath}/sectors`).catch(() => undefined)) === undefined
  ) {
    return `the restore that reattached it (${entry.restored.at}) ended before its guest ran`;
  }
  return undefined;
}

/** The key a saved disk is found by: the domain's uuid, else its name. */
export function domainKey(disk: Pick<DiskSpec, 'domainUuid' | 'domainName'>): string | undefined {
  if (disk.domainUuid) return disk.domainUuid;
  return disk.domainName ? `name:${disk.domainName}` : undefined;
}

/**
 * Keep `entry`'s devices for the domain's restore: write the marker, then move the record to its
 * held key. Throws (and changes nothing) when the domain cannot be named or a held record of the
 * same disk is already there.
 */
function savedMarker(
  entry: JournalEntry,
  key: string,
  devid: string,
  name: string | undefined,
  held: string,
): SavedDisk {
  const me = thisHost();
  return {
    version: 1,
    machine: me.machine,
    host: me.host,
    key,
    name: name ?? entry.disk.domainName,
    vdev: entry.disk.vdev,
    devid,
    script: entry.script,
    params: entry.disk.params,
    mode: entry.disk.mode,
    transient: entry.transient ?? '',
    held,
    from: entry.backendPath,
    bootId: me.boot,
    savedAt: new Date().toISOString(),
  };
}

/**
 * When a saved domain's disk could not be held (holdRecord threw), its restore must still be
 * refused rather than handed a fresh disk: a marker that names no held record says so. The
 * caller then takes the devices down. Throws when the domain has neither uuid nor name.
 */
export async function markLost(e: LifecycleEnv, xs: XsOps, entry: JournalEntry): Promise<void> {
  const { key, name } = await savedDomainKey(xs, entry, `mark ${entry.backendPath} lost`);
  writeMarker(e.config, savedMarker(entry, key, devidOf(entry.backendPath), name, ''));
}

/** The persistent stores this record claimed for this host (lock/store-owner.ts). */
export function claimedStores(entry: JournalEntry): string[] {
  return entry.steps.flatMap((s) => (s.kind === 'store-owner' && s.done && s.data.ours === true ? [s.data.path] : []));
}

/**
 * The key a saved domain's markers are filed under, from its uuid (or name) in xenstore now, else
 * as the record has them; throws "cannot <what> for its saved domain" when it has neither.
 */
async function savedDomainKey(
  xs: XsOps,
  entry: JournalEntry,
  what: string,
): Promise<{ key: string; name: string | undefined }> {
  const domid = domidOf(entry);
  const [vm, name] = await Promise.all([
    xs.tryRead(`/local/domain/${domid}/vm`).catch(() => undefined),
    xs.tryRead(`/local/domain/${domid}/name`).catch(() => undefined),
  ]);
  const key = domainKey({
    domainUuid: uuidOfVmPath(vm) ?? entry.disk.domainUuid,
    domainName: name ?? entry.disk.domainName,
  });
  if (!key)
    throw new Error(`cannot ${what} for its saved domain: the domain has neither a uuid nor a name in xenstore`);
  return { key, name };
}

/**
 * A persistent disk of a domain being saved: its devices go as at any remove, but its claims stay
 * for the restore. The marker naming them is written first; throws (and keeps nothing) when the
 * domain has neither uuid nor name.
 */
export async function keepClaims(e: LifecycleEnv, xs: XsOps, entry: JournalEntry, reason: string): Promise<SavedDisk> {
  const { key, name } = await savedDomainKey(xs, entry, `keep the claims of ${entry.backendPath}`);
  const marker = { ...savedMarker(entry, key, devidOf(entry.backendPath), name, ''), claims: claimedStores(entry) };
  writeMarker(e.config, marker);
  e.log.info(
    `remove ${entry.backendPath}: ${reason}; keeping this host's claim on ${marker.claims.join(', ')} for the restore (marker ${markerPath(e.config, key, marker.devid)})`,
  );
  return marker;
}

export async function holdRecord(
  e: LifecycleEnv & { undo: UndoRegistry },
  xs: XenstoreClient,
  entry: JournalEntry,
  reason: string,
): Promise<SavedDisk> {
  const { key, name } = await savedDomainKey(xs, entry, `hold ${entry.backendPath}`);
  const devid = devidOf(entry.backendPath);
  const target = heldKey(key, devid);
  const other = e.journal.load(target);
  if (other) {
    // A held disk of the same domain and devid whose marker is gone was given up (its saved
    // domain will never be restored): it goes, and this one is held in its place.
    if (readMarkerSafe(e.config, key, devid) !== undefined) {
      throw new Error(
        `cannot hold ${entry.backendPath} for its saved domain: ${target} already holds a disk of that domain (from ${other.held?.from ?? '?'}) and its marker is there; see "xen-blockhooks status"`,
      );
    }
    const failures = await undoAll(other, e.undo, { ...e, xs });
    if (failures.length)
      throw new Error(
        `cannot hold ${entry.backendPath}: taking down the given-up ${target} failed: ${failures.map((f) => f.message).join('; ')}`,
      );
  }
  const marker = savedMarker(entry, key, devid, name, target);
  writeMarker(e.config, marker);
  const held: HeldFor = {
    uuid: key,
    name: marker.name,
    devid,
    from: entry.backendPath,
    since: marker.savedAt,
    bootId: marker.bootId,
  };
  const from = entry.backendPath;
  entry.held = held;
  entry.phase = 'held';
  delete entry.restored;
  e.journal.move(entry, from, target);
  e.log.info(
    `remove ${from}: ${reason}; keeping ${entry.device?.path ?? 'its device'} and ${entry.transient} for the restore (record ${target}, marker ${markerPath(e.config, key, devid)})`,
  );
  return marker;
}

// ---------------------------------------------------------------------------------------------
// add: adopt what a saved domain left, or refuse

function readSys(path: string): string | undefined {
  try {
    return readFileSync(path, 'utf8').trim();
  } catch {
    return undefined;
  }
}

/**
 * Whether the record's device is still the one it built: the major:minor exists, and a dm
 * device's name or a loop's backing file is one the record names (a minor can be reused).
 */
export function deviceIsTheRecords(entry: JournalEntry, sysRoot = '/sys'): boolean {
  if (!entry.device) return false;
  const dir = sysBlockDir(entry.device, sysRoot);
  let kernelName: string;
  try {
    kernelName = readlinkSync(dir).replace(/^.*\//, '');
  } catch {
    return false;
  }
  const refs = recordStrings(entry);
  const dm = readSys(`${dir}/dm/name`);
  // A dm device the record names, or whose /dev/mapper path it holds (an LV: vg-lv, dashes doubled).
  if (dm !== undefined) return refs.has(dm) || refs.has(`/dev/mapper/${dm}`);
  const backing = readSys(`${dir}/loop/backing_file`);
  if (backing !== undefined) return refs.has(backing.replace(/ \(deleted\)$/, ''));
  return refs.has(`/dev/${kernelName}`);
}

function describeDisk(m: SavedDisk): string {
  return `${m.name ?? m.key}'s disk ${m.vdev ?? m.devid}`;
}

/**
 * The saved disk of this add's domain, if one was left by a save: adopted when its devices are
 * still there and it is the same disk; otherwise a HotplugError saying what was lost. Returns
 * undefined when the domain left nothing saved.
 */
export function adoptSaved(
  e: LifecycleEnv & { script: string },
  backendPath: string,
  disk: DiskSpec,
  sysRoot?: string,
): JournalEntry | undefined {
  const key = domainKey(disk);
  if (!key) return undefined;
  const devid = devidOf(backendPath);
  const read = readMarkerSafe(e.config, key, devid);
  if (!read) return undefined;
  const file = markerPath(e.config, key, devid);
  if (read === 'unreadable') {
    throw new HotplugError(
      `${e.script}: ${file} says this domain's disk was saved, and cannot be read; nothing was built. Restore needs it intact: check the file, or delete it to start the domain afresh.`,
    );
  }
  const m = read;
  const what = describeDisk(m);
  const startFresh = `To start the domain afresh instead (xl create, not restore), delete ${file} first.`;
  if (m.script !== e.script || m.params !== disk.params || m.mode !== disk.mode) {
    throw new HotplugError(
      `${e.script}: ${what} was saved on ${m.savedAt} as "${m.script} ${m.params}" (mode ${m.mode}), and this restore asks for "${e.script} ${disk.params}" (mode ${disk.mode}); the guest's memory expects the disk it was saved with, so nothing was built. Restore with the saved domain's disk configuration. ${startFresh}`,
    );
  }
  const me = thisHost();
  if (m.claims) {
    if (m.machine !== me.machine || m.host !== me.host) {
      throw new HotplugError(
        `${e.script}: the saved domain ${m.name ?? m.key}'s persistent store ${m.claims.join(', ')} on ${m.vdev ?? m.devid} is claimed by host ${m.host}, which saved it (${m.savedAt}); restore the domain there. Nothing was built. ${startFresh}`,
        'busy',
      );
    }
    // The devices went at the save, the store stayed: the add builds them again as usual, and
    // the claim kept since then becomes this backend path's.
    for (const store of m.claims) handOverClaim(store, m.from, backendPath);
    deleteMarker(e.config, key, devid);
    e.log.info(
      `add ${backendPath}: ${what}'s claim on ${m.claims.join(', ')}, kept since the save (${m.savedAt}, was ${m.from}), is this disk's again`,
    );
    return undefined;
  }
  if (m.machine !== undefined && (m.machine !== me.machine || m.host !== me.host)) {
    throw new HotplugError(
      `${e.script}: the saved domain ${m.name ?? m.key}'s ${m.transient} on ${m.vdev ?? m.devid} is held by host ${m.host}, which saved it (${m.savedAt}); restore the domain there, or start it fresh. Nothing was built. ${startFresh}`,
    );
  }
  const held = m.held ? e.journal.load(m.held) : undefined;
  if (m.bootId !== me.boot || !held || held.phase !== 'held' || !deviceIsTheRecords(held, sysRoot)) {
    const why =
      m.bootId !== me.boot
        ? 'dom0 has restarted since, and they lived only in its devices'
        : !m.held
          ? 'they could not be kept at the save (the hotplug log says why)'
          : held
            ? `its device ${held.device?.path ?? ''} is gone`
            : 'the record that kept them is gone';
    throw new HotplugError(
      `${e.script}: the saved domain ${m.name ?? m.key}'s ${m.transient} on ${m.vdev ?? m.devid} (saved ${m.savedAt}) did not survive: ${why}. Restoring it would hand the guest a disk without the blocks it wrote, so nothing was built. Start the domain fresh, or give the disk a persistent store so a saved domain survives a dom0 restart. ${startFresh}`,
    );
  }
  held.backendPath = backendPath;
  held.phase = 'ready';
  held.pid = process.pid;
  held.disk = {
    params: disk.params,
    mode: disk.mode,
    frontendId: disk.frontendId,
    vdev: disk.vdev,
    domainName: disk.domainName,
    domainUuid: disk.domainUuid,
  };
  held.restored = { from: m.from, at: new Date().toISOString() };
  delete held.held;
  e.journal.move(held, m.held, backendPath);
  deleteMarker(e.config, key, devid);
  e.log.info(
    `add ${backendPath}: reattaching ${what}'s ${m.transient} kept since the save (${m.savedAt}, was ${m.from}): ${held.device?.path}`,
  );
  return held;
}
