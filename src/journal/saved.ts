/**
 * Saved-disk markers: `<store_dir>/saved/<uuid>-<devid>.json`, one per disk of a saved domain,
 * written (and synced) before its record is held, so that a later restore adopts exactly that
 * record or is refused, never handed a fresh disk (src/hotplug/lifecycle.ts has the contract).
 * They live in the store directory because they must outlive a reboot; the journal is in /run.
 */
import {
  closeSync,
  fsyncSync,
  mkdirSync,
  openSync,
  readdirSync,
  readFileSync,
  renameSync,
  unlinkSync,
  writeFileSync,
} from 'node:fs';
import { join } from 'node:path';
import type { Config } from '../config/config.js';
import { thisHost } from '../lock/store-owner.js';

export interface SavedDisk {
  version: 1;
  /** The host that saved it (lock/store-owner.ts's identity): only it holds the devices. */
  machine: string;
  host: string;
  /** The domain's uuid (or `name:<name>` when it had none). */
  key: string;
  name: string | undefined;
  vdev: string | undefined;
  devid: string;
  script: string;
  params: string;
  mode: string;
  /** What lived only as long as the devices (JournalEntry.transient). */
  transient: string;
  /** The held record's journal key ('' for a disk that could not be held, or that kept only claims). */
  held: string;
  /** A persistent disk's stores whose claims were kept for the restore (nothing else was kept). */
  claims?: string[];
  /** The backend path the disk had when it was saved. */
  from: string;
  bootId: string;
  savedAt: string;
}

/** The kernel's id of this boot; devices (dm, loop, nbd, krbd mappings) live no longer. */
export function bootId(): string {
  return thisHost().boot;
}

export function savedDir(config: Config): string {
  return join(config.storeDir, 'saved');
}

function fileKey(key: string): string {
  return key.replace(/[^A-Za-z0-9._-]/g, '_');
}

export function markerPath(config: Config, key: string, devid: string): string {
  return join(savedDir(config), `${fileKey(key)}-${devid}.json`);
}

export function heldKey(key: string, devid: string): string {
  return `held/${fileKey(key)}/${devid}`;
}

export function readMarker(config: Config, key: string, devid: string): SavedDisk | undefined {
  let text: string;
  try {
    text = readFileSync(markerPath(config, key, devid), 'utf8');
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw e;
  }
  return JSON.parse(text) as SavedDisk;
}

/** Written and synced before the record moves: a marker is what makes a later restore refuse rather than build afresh. */
/** readMarker, with an unreadable marker taken as "there is one" (it still stands for a saved disk). */
export function readMarkerSafe(config: Config, key: string, devid: string): SavedDisk | 'unreadable' | undefined {
  try {
    return readMarker(config, key, devid);
  } catch {
    return 'unreadable';
  }
}

export function writeMarker(config: Config, m: SavedDisk): void {
  const dir = savedDir(config);
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  const file = markerPath(config, m.key, m.devid);
  const tmp = `${file}.${process.pid}.tmp`;
  const fd = openSync(tmp, 'w', 0o600);
  try {
    writeFileSync(fd, `${JSON.stringify(m, null, 1)}\n`);
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
  renameSync(tmp, file);
  const d = openSync(dir, 'r');
  try {
    fsyncSync(d);
  } finally {
    closeSync(d);
  }
}

export function deleteMarker(config: Config, key: string, devid: string): void {
  try {
    unlinkSync(markerPath(config, key, devid));
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e;
  }
}

/** Every marker, with the file it is in. */
export function listMarkers(config: Config): { file: string; marker: SavedDisk }[] {
  let names: string[];
  try {
    names = readdirSync(savedDir(config));
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw e;
  }
  const out: { file: string; marker: SavedDisk }[] = [];
  for (const n of names.filter((n) => n.endsWith('.json')).sort()) {
    const file = join(savedDir(config), n);
    try {
      out.push({ file, marker: JSON.parse(readFileSync(file, 'utf8')) as SavedDisk });
    } catch {
      // a half-written marker is a tmp file, never a .json: anything else unreadable is skipped here and shown by status
    }
  }
  return out;
}

/** The saved-disk marker that keeps this host's claim on `store` for a restore, if any. */
export function savedClaimMarker(config: Config, store: string): (SavedDisk & { file: string }) | undefined {
  const found = listMarkers(config).find(({ marker }) => marker.claims?.includes(store));
  return found ? { ...found.marker, file: found.file } : undefined;
}
