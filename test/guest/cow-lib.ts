/**
 * Shared set-up of the block-cow guest tests (not a test file itself): the bundled hook
 * (dist/block-cow.mjs, built by `npm run build`) run as a child process, as libxl or xend would,
 * against an in-process xenstore server with the backend nodes written as the toolstack writes
 * them, a base image with known content, and a census of everything a hook could leave behind
 * (test/lib/hook-world.ts). Real loop devices, real dm-snapshot, no udev. Importing this module
 * registers before/after hooks.
 */
import { after, before } from 'node:test';
import { join } from 'node:path';
import type { XenstoreClient } from '../../src/xenstore/types.js';
import {
  backendPath,
  closeBackend,
  destroyNodes,
  writeBackendNodes,
  type DiskNodes,
  type HookRun,
} from '../lib/backend-nodes.js';
import { patternedImage, sh } from '../lib/disk-io.js';
import { hookWorld } from '../lib/hook-world.js';

export { backendPath, closeBackend, destroyNodes, writeBackendNodes };
export { block, listDir, MiB, pread, pwrite, sh, sha256File } from '../lib/disk-io.js';

const world = hookWorld({
  name: 'cow',
  bundle: 'block-cow',
  // XBH_COW_HOOK may name a private copy of the bundle (a copy no concurrent build rewrites).
  hookPath: process.env.XBH_COW_HOOK,
  // A single emulated CPU (TCG) runs 16 concurrent hooks 20-50 times slower than a dom0 would.
  env: { XEN_BLOCKHOOKS_LOCK_TIMEOUT_MS: '240000' },
});

/** The bundle `npm run build` makes, or XBH_COW_HOOK. */
export const HOOK = world.hookPath;
export const { root, images, storeDir, stateDir, xenLockDir, logFile, env, explain, hook, addOk, removeOk, leftovers } =
  world;
export const base = join(images, 'rootfs.img');
export const BASE_MIB = 32;

export let xs: XenstoreClient;
export let baseSum = '';

export function loopsOnBase(): string[] {
  const ino = sh('stat', ['-c', '%i', base]);
  return sh('losetup', ['-a'])
    .split('\n')
    .filter((l) => l.includes(`:${ino} `) || l.endsWith(`(${base})`))
    .map((l) => l.split(':')[0] as string);
}

export function disk(domid: number, extra: Partial<DiskNodes> = {}): DiskNodes {
  return { domid, devid: 51712, params: `${base} 16`, mode: 'w', vdev: 'xvda', domainName: `guest${domid}`, ...extra };
}

before(async () => {
  xs = await world.start();
  baseSum = patternedImage(base, BASE_MIB, 'base');
});

after(() => world.stop({ dmPrefixes: ['xbh-cow-'] }));

export type { DiskNodes, HookRun };
