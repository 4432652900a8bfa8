/**
 * Shared set-up of the block-cow guest tests (not a test file itself): the bundled hook
 * (dist/block-cow.mjs, built by `npm run build`) run as a child process, as libxl or xend would,
 * against an in-process xenstore server with the backend nodes written as the toolstack writes
 * them, a base image with known content, and a census of everything a hook could leave behind.
 * Real loop devices, real dm-snapshot, no udev. Importing this module registers before/after hooks.
 */
import { after, before } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { connectXenstore } from '../../src/xenstore/client.js';
import { startXenstoreServer, type XenstoreServer } from '../../src/xenstore/server.js';
import type { XenstoreClient } from '../../src/xenstore/types.js';
import { projectRoot } from '../lib/project-root.js';
import {
  backendPath,
  closeBackend,
  destroyNodes,
  runHookProcess,
  writeBackendNodes,
  type DiskNodes,
  type HookRun,
} from '../lib/backend-nodes.js';
import { listDir, patternedImage, sh } from '../lib/disk-io.js';

export { backendPath, closeBackend, destroyNodes, writeBackendNodes };
export { block, listDir, MiB, pread, pwrite, sh, sha256File } from '../lib/disk-io.js';

/** The bundle `npm run build` makes; XBH_COW_HOOK may name a private copy of it (a copy no concurrent build rewrites). */
export const HOOK = process.env.XBH_COW_HOOK ?? join(projectRoot(), 'dist', 'block-cow.mjs');
const scratchRoot = process.env.XEN_BLOCKHOOKS_SCRATCH ?? '/tmp';
export const root = join(scratchRoot, `cow-${process.pid}`);
export const images = join(root, 'images');
export const storeDir = join(root, 'store');
export const stateDir = join(root, 'state');
export const xenLockDir = join(root, 'xen-hotplug');
export const logFile = join(root, 'hook.log');
const sock = join(root, 'xenstored.sock');
export const base = join(images, 'rootfs.img');
export const BASE_MIB = 32;

let server: XenstoreServer;
export let xs: XenstoreClient;
export let baseSum = '';

export const env: NodeJS.ProcessEnv = {
  PATH: process.env.PATH,
  DM_DISABLE_UDEV: process.env.DM_DISABLE_UDEV ?? '1',
  XENSTORED_PATH: sock,
  XEN_BLOCKHOOKS_CONF: join(root, 'no-such.conf'),
  XEN_BLOCKHOOKS_STORE_DIR: storeDir,
  XEN_BLOCKHOOKS_STATE_DIR: stateDir,
  XEN_BLOCKHOOKS_IMAGE_DIRS: images,
  XEN_BLOCKHOOKS_XEN_LOCK_DIR: xenLockDir,
  XEN_BLOCKHOOKS_LOG_FILE: logFile,
  XEN_BLOCKHOOKS_BUSY_RETRY_MS: '5000',
  // A single emulated CPU (TCG) runs 16 concurrent hooks 20-50 times slower than a dom0 would.
  XEN_BLOCKHOOKS_LOCK_TIMEOUT_MS: '240000',
};

export function loopsOnBase(): string[] {
  const ino = sh('stat', ['-c', '%i', base]);
  return sh('losetup', ['-a'])
    .split('\n')
    .filter((l) => l.includes(`:${ino} `) || l.endsWith(`(${base})`))
    .map((l) => l.split(':')[0] as string);
}

/** Everything a hook could leave behind; an empty list when nothing is. */
export function leftovers(keepStores: string[] = []): string[] {
  const out: string[] = [];
  const dm = sh('dmsetup', ['ls']);
  if (!/No devices found/.test(dm)) out.push(...dm.split('\n').map((l) => `dm ${l}`));
  const loops = sh('losetup', ['-a']);
  if (loops) out.push(...loops.split('\n').map((l) => `loop ${l}`));
  out.push(
    ...listDir(storeDir)
      .filter((f) => !keepStores.includes(f))
      .map((f) => `store ${f}`),
  );
  out.push(...listDir(join(stateDir, 'journal')).map((f) => `journal ${f}`));
  out.push(...listDir(join(stateDir, 'locks')).map((f) => `lock ${f}`));
  out.push(...listDir(xenLockDir).map((f) => `xen lock ${f}`));
  return out;
}

export function disk(domid: number, extra: Partial<DiskNodes> = {}): DiskNodes {
  return { domid, devid: 51712, params: `${base} 16`, mode: 'w', vdev: 'xvda', domainName: `guest${domid}`, ...extra };
}

export function explain(r: HookRun): string {
  const log = existsSync(logFile) ? readFileSync(logFile, 'utf8').split('\n').slice(-15).join('\n') : '';
  return `exit ${r.code} signal ${r.signal}\nstderr: ${r.stderr}\nlog tail:\n${log}`;
}

export async function hook(
  action: string,
  d: Pick<DiskNodes, 'domid' | 'devid'>,
  extraEnv: NodeJS.ProcessEnv = {},
): Promise<HookRun> {
  return runHookProcess(HOOK, action, backendPath(d), { ...env, ...extraEnv });
}

export async function addOk(d: DiskNodes): Promise<{ path: string; pd: string }> {
  await writeBackendNodes(xs, d);
  const r = await hook(d.dialect === 'xend' ? 'create' : 'add', d);
  assert.equal(r.code, 0, `add ${backendPath(d)}: ${explain(r)}`);
  const be = backendPath(d);
  const pd = await xs.read(`${be}/physical-device`);
  const path = await xs.read(`${be}/physical-device-path`);
  assert.equal(await xs.read(`${be}/hotplug-status`), 'connected');
  assert.match(pd, /^[0-9a-f]+:[0-9a-f]+$/);
  assert.equal(sh('stat', ['-L', '-c', '%t:%T', path]), pd, 'physical-device-path is the device physical-device names');
  return { path, pd };
}

export async function removeOk(d: DiskNodes): Promise<void> {
  await closeBackend(xs, d);
  const r = await hook(d.dialect === 'xend' ? 'destroy' : 'remove', d);
  assert.equal(r.code, 0, `remove ${backendPath(d)}: ${explain(r)}`);
  await destroyNodes(xs, d);
}

before(async () => {
  assert.ok(existsSync(HOOK), `${HOOK} is missing: run npm run build first`);
  rmSync(root, { recursive: true, force: true });
  mkdirSync(images, { recursive: true });
  server = await startXenstoreServer({ socketPath: sock });
  xs = await connectXenstore({ path: sock });
  baseSum = patternedImage(base, BASE_MIB, 'base');
});

after(async () => {
  await xs?.close().catch(() => {});
  await server?.close().catch(() => {});
  for (const l of sh('dmsetup', ['ls']).split('\n')) {
    const name = l.split(/\s+/)[0];
    if (name?.startsWith('xbh-cow-')) spawnSync('dmsetup', ['remove', name]);
  }
  for (const l of loopsOnBase()) spawnSync('losetup', ['-d', l]);
  rmSync(root, { recursive: true, force: true });
});

export type { DiskNodes, HookRun };
