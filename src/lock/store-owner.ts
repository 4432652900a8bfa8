/**
 * Which host holds a persistent store. A store on storage that several dom0s share (NFS) must be
 * attached by one host at a time: two hosts' loops over one file keep their own page cache, so
 * each would read stale blocks and write over the other's.
 *
 * Protocol (one claim directory next to the store, `<store>.owner/`, holding `owner.json`):
 *   claim    mkdir(<store>.owner); on success write owner.json {machine, host, boot, backendPath,
 *            since} (to a temporary name, then renamed). On EEXIST read owner.json:
 *              - another machine: refused (busy), naming the host, the disk and since when;
 *              - this machine, an earlier boot: a crash or restart's leftover: taken over;
 *              - this machine, this boot: the loop check of the store (one writer) decides, and
 *                the claim is not ours to release unless it names this backend path;
 *              - no owner.json (cut between mkdir and write): older than a minute, the directory
 *                is renamed away (atomic: one of two hosts wins) and the claim starts again;
 *                younger, busy.
 *            "This machine" is /etc/machine-id and the host name together: dom0s cloned from one
 *            image share a machine-id, not a host name.
 *   release  only by the machine, boot and backend path owner.json names: owner.json, then the
 *            directory.
 * The claim lasts while the disk is attached, across hook processes and a crash of its host; a
 * save keeps it for the restore (hotplug/lifecycle.ts).
 *
 * Why mkdir: one NFS MKDIR call that the server decides, so atomic for every client. flock(2) over
 * NFS and proper-lockfile hold a lock only while a process lives, but a store stays claimed after
 * the hook that attached it has exited; so the claim is a directory with an owner record.
 */
import { mkdirSync, readFileSync, renameSync, rmdirSync, rmSync, statSync, unlinkSync, writeFileSync } from 'node:fs';
import { hostname } from 'node:os';
import { join } from 'node:path';
import { HotplugError } from '../disk/errors.js';

export interface HostIdentity {
  /** /etc/machine-id (unique per installation), else the host name. */
  machine: string;
  host: string;
  /** The kernel's id of this boot: devices live no longer. */
  boot: string;
}

function readTrim(path: string): string | undefined {
  try {
    return readFileSync(path, 'utf8').trim() || undefined;
  } catch {
    return undefined;
  }
}

export function thisHost(): HostIdentity {
  const host = hostname();
  return {
    machine: readTrim('/etc/machine-id') ?? host,
    host,
    boot: readTrim('/proc/sys/kernel/random/boot_id') ?? 'unknown',
  };
}

export interface StoreOwner extends HostIdentity {
  backendPath: string;
  since: string;
}

export function ownerDir(store: string): string {
  return `${store}.owner`;
}

const CLAIM_GRACE_MS = 60_000;

function readOwner(dir: string): StoreOwner | undefined {
  try {
    return JSON.parse(readFileSync(join(dir, 'owner.json'), 'utf8')) as StoreOwner;
  } catch {
    return undefined;
  }
}

function writeOwner(dir: string, o: StoreOwner): void {
  const tmp = join(dir, `.owner.${process.pid}.tmp`);
  writeFileSync(tmp, `${JSON.stringify(o)}\n`, { mode: 0o600 });
  renameSync(tmp, join(dir, 'owner.json'));
}

/**
 * Claim `store` for `backendPath` on this host. Returns whether the claim is this disk's (and so
 * its to release); throws a busy HotplugError when another host holds it.
 */
export function claimStore(
  script: string,
  store: string,
  backendPath: string,
  me: HostIdentity = thisHost(),
  attempt = 0,
): { ours: boolean } {
  const dir = ownerDir(store);
  const mine: StoreOwner = { ...me, backendPath, since: new Date().toISOString() };
  try {
    mkdirSync(dir, { mode: 0o700 });
    writeOwner(dir, mine);
    return { ours: true };
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
  }
  const o = readOwner(dir);
  if (!o) {
    let age: number;
    try {
      age = Date.now() - statSync(dir).mtimeMs;
    } catch {
      age = Infinity; // released meanwhile
    }
    if (age < CLAIM_GRACE_MS || attempt > 2)
      throw new HotplugError(
        `${script}: the persistent store ${store} is being claimed right now (${dir} has no owner yet); try again.`,
        'busy',
      );
    if (age !== Infinity) {
      const away = `${dir}.stale.${me.machine.slice(0, 12)}.${process.pid}`;
      try {
        renameSync(dir, away);
        rmSync(away, { recursive: true, force: true });
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e; // another host moved it first
      }
    }
    return claimStore(script, store, backendPath, me, attempt + 1);
  }
  if (o.machine !== me.machine || o.host !== me.host) {
    throw new HotplugError(
      `${script}: the persistent store ${store} is held by host ${o.host} (since ${o.since}, disk ${o.backendPath}); a store serves one host at a time. Detach it there first (for a migration: the store stays with the host the domain runs on); if ${o.host} is down for good, remove the directory ${dir}.`,
      'busy',
    );
  }
  if (o.boot !== me.boot || o.backendPath === backendPath) {
    writeOwner(dir, mine);
    return { ours: true };
  }
  return { ours: false };
}

/** Give up the claim, if owner.json still names this host, boot and backend path. */
export function releaseStore(store: string, backendPath: string, me: HostIdentity = thisHost()): void {
  const dir = ownerDir(store);
  const o = readOwner(dir);
  if (!o || o.machine !== me.machine || o.host !== me.host || o.boot !== me.boot || o.backendPath !== backendPath)
    return;
  try {
    unlinkSync(join(dir, 'owner.json'));
    rmdirSync(dir);
  } catch (e) {
    // ENOTEMPTY: a writer's temporary file is left; the directory has no owner and is taken over.
    if (!['ENOENT', 'ENOTEMPTY'].includes((e as NodeJS.ErrnoException).code ?? '')) throw e;
  }
}

/**
 * This host's claims that nothing holds any more: made in an earlier boot (its devices are gone),
 * or in this boot for a backend path `recorded` does not know. Claims of other hosts are never
 * listed. `stores` are the persistent stores to look at.
 */
export function staleClaims(
  stores: string[],
  recorded: (backendPath: string) => boolean,
  me: HostIdentity = thisHost(),
): { store: string; owner: StoreOwner }[] {
  const out: { store: string; owner: StoreOwner }[] = [];
  for (const store of stores) {
    const o = readOwner(ownerDir(store));
    if (!o || o.machine !== me.machine || o.host !== me.host) continue;
    if (o.boot !== me.boot || !recorded(o.backendPath)) out.push({ store, owner: o });
  }
  return out;
}

/**
 * A claim this host kept for a saved domain's disk (backend path `from`) passes to the restored
 * disk's backend path `to`, in this boot. False when the claim is gone or names something else.
 */
export function handOverClaim(store: string, from: string, to: string, me: HostIdentity = thisHost()): boolean {
  const dir = ownerDir(store);
  const o = readOwner(dir);
  if (!o || o.machine !== me.machine || o.host !== me.host || o.backendPath !== from) return false;
  writeOwner(dir, { ...me, backendPath: to, since: new Date().toISOString() });
  return true;
}

/** Drop a claim of this host that staleClaims listed (its owner record may name another boot). */
export function dropClaim(store: string, owner: StoreOwner): void {
  releaseStore(store, owner.backendPath, { machine: owner.machine, host: owner.host, boot: owner.boot });
}
