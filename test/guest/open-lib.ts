/**
 * Shared set-up of the open/close guest tests (not a test file itself): images with a partition
 * table written by sfdisk, ext4 file systems written into them at an offset, and what open and
 * close may leave. Builds on cli-lib.ts (a scratch folder, the settings, the built command).
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { dmNames, env, images, loopsOn, sock, work } from './cli-lib.js';

export const xsEnv = { XENSTORED_PATH: sock };
export const mnt = join(work, 'mnt');
export const journalDir = () => join(env.XEN_BLOCKHOOKS_STATE_DIR as string, 'journal');
export const openRecords = () => {
  try {
    return readdirSync(journalDir()).filter((n) => n.startsWith('open~'));
  } catch {
    return [];
  }
};
export const sh = (file: string, args: string[], input?: string) =>
  execFileSync(file, args, { encoding: 'utf8', ...(input !== undefined ? { input } : {}) });
export const partMaps = () => dmNames().filter((n) => /p\d+$/.test(n));

/** An image of `mib` MiB with the sfdisk `script`'s table. */
export function image(name: string, mib: number, script: string): string {
  const p = join(images, name);
  sh('truncate', ['-s', `${mib}M`, p]);
  sh('sfdisk', ['--quiet', '--', p], script);
  return p;
}

/** An ext4 file system holding `files`, written at `startSector` of `target` (an image or a device), `mib` MiB long. */
export function ext4At(target: string, startSector: number, mib: number, files: Record<string, string>): void {
  const dir = join(work, `fs-${Math.random().toString(36).slice(2)}`);
  mkdirSync(dir, { recursive: true });
  for (const [f, text] of Object.entries(files)) writeFileSync(join(dir, f), text);
  sh('mkfs.ext4', ['-q', '-F', '-E', `offset=${startSector * 512}`, '-d', dir, target, `${mib}M`]);
}

export function mountRead(dev: string, file: string, opts = 'ro'): string | undefined {
  mkdirSync(mnt, { recursive: true });
  sh('mount', ['-t', 'ext4', '-o', opts, dev, mnt]);
  try {
    return readFileSync(join(mnt, file), 'utf8');
  } catch {
    return undefined;
  } finally {
    sh('umount', [mnt]);
  }
}

/** The /dev/mapper paths open printed, in order. */
export const paths = (out: string) =>
  out
    .trim()
    .split('\n')
    .map((l) => l.split('\t')[0] as string);

export function assertNothingLeft(what: string): void {
  assert.deepEqual(partMaps(), [], `${what}: no partition maps left`);
  assert.deepEqual(loopsOn(images), [], `${what}: no loop on the images left`);
  assert.deepEqual(openRecords(), [], `${what}: no open record left`);
}
