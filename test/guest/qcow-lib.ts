/**
 * Shared by the block-qcow guest tests: an in-process xenstore, the bundled hook run as a child
 * process the way libxl runs it, data helpers, and the "nothing left" check (no nbd connected,
 * no qemu-nbd running, no overlay, no journal record).
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { connectXenstore } from '../../src/xenstore/client.js';
import { startXenstoreServer, type XenstoreServer } from '../../src/xenstore/server.js';
import type { XenstoreClient } from '../../src/xenstore/types.js';
import {
  closeBackend,
  destroyNodes,
  runHookProcess,
  writeBackendNodes,
  type DiskNodes,
  type HookRun,
} from '../lib/backend-nodes.js';
import { block, pwrite, sh } from '../lib/disk-io.js';
export { block, pread, pwrite, sh, sha256File } from '../lib/disk-io.js';

export const HOOK = join(process.cwd(), 'dist', 'block-qcow.mjs');

export interface World {
  root: string;
  images: string;
  outside: string;
  store: string;
  state: string;
  server: XenstoreServer;
  xs: XenstoreClient;
  env: NodeJS.ProcessEnv;
  close(): Promise<void>;
}

export async function makeWorld(name: string): Promise<World> {
  const scratch = process.env.XEN_BLOCKHOOKS_SCRATCH;
  assert.ok(scratch, 'XEN_BLOCKHOOKS_SCRATCH is set (run in the guest tier)');
  assert.ok(existsSync(HOOK), `${HOOK} exists (npm run build first)`);
  const root = join(scratch, name);
  const w = {
    root,
    images: join(root, 'images'),
    outside: join(root, 'outside'),
    store: join(root, 'store'),
    state: join(root, 'state'),
  };
  for (const d of [w.images, w.outside]) mkdirSync(d, { recursive: true });
  const server = await startXenstoreServer({ socketPath: join(root, 'xs.sock') });
  const xs = await connectXenstore({ path: server.socketPath });
  const env: NodeJS.ProcessEnv = {
    PATH: process.env.PATH,
    DM_DISABLE_UDEV: '1',
    XENSTORED_PATH: server.socketPath,
    XEN_BLOCKHOOKS_CONF: join(root, 'none.conf'),
    XEN_BLOCKHOOKS_STORE_DIR: w.store,
    XEN_BLOCKHOOKS_STATE_DIR: w.state,
    XEN_BLOCKHOOKS_IMAGE_DIRS: w.images,
    XEN_BLOCKHOOKS_LOG_FILE: join(root, 'hook.log'),
  };
  return {
    ...w,
    server,
    xs,
    env,
    async close() {
      await xs.close();
      await server.close();
    },
  };
}

export function img(...args: string[]): void {
  execFileSync('qemu-img', args, { stdio: ['ignore', 'ignore', 'pipe'] });
}

export const MiB = 1024 * 1024;

/** Deterministic 4 KiB block. */

/** A raw image with a known block at every MiB. */
export function patternedRaw(path: string, mib: number, salt: string): void {
  img('create', '-q', '-f', 'raw', path, `${mib}M`);
  for (let i = 0; i < mib; i++) pwrite(path, i * MiB, block(i, salt));
}

let nextDevid = 51712;

export interface Added {
  d: DiskNodes;
  be: string;
  run: HookRun;
  device: string | undefined;
}

export function disk(domid: number, params: string, extra: Partial<DiskNodes> = {}): DiskNodes {
  nextDevid += 1;
  return {
    domid,
    devid: nextDevid,
    params,
    mode: 'w',
    vdev: 'xvda',
    domainName: `dom${domid}`,
    script: '/etc/xen/scripts/block-qcow',
    ...extra,
  };
}

export async function add(w: World, d: DiskNodes, env: NodeJS.ProcessEnv = {}): Promise<Added> {
  const be = await writeBackendNodes(w.xs, d);
  const run = await runHookProcess(HOOK, 'add', be, { ...w.env, ...env });
  const device = await w.xs.tryRead(`${be}/physical-device-path`);
  return { d, be, run, device };
}

export async function addOk(w: World, d: DiskNodes): Promise<Added & { device: string }> {
  const a = await add(w, d);
  assert.equal(a.run.code, 0, `add ${d.params} failed: ${await w.xs.tryRead(`${a.be}/hotplug-error`)} ${a.run.stderr}`);
  assert.equal(await w.xs.tryRead(`${a.be}/hotplug-status`), 'connected');
  assert.ok(a.device && /^\/dev\/nbd\d+$/.test(a.device), `physical-device-path ${a.device}`);
  const pd = await w.xs.tryRead(`${a.be}/physical-device`);
  const [maj, min] = sh('stat', ['-L', '-c', '%t:%T', a.device]).split(':');
  assert.equal(pd, `${maj}:${min}`, 'physical-device is the nbd device, hex major:minor');
  return a as Added & { device: string };
}

export async function remove(w: World, d: DiskNodes, env: NodeJS.ProcessEnv = {}): Promise<HookRun> {
  const be = await writeBackendNodes(w.xs, d).catch(() => `backend/vbd/${d.domid}/${d.devid}`);
  await closeBackend(w.xs, d);
  const r = await runHookProcess(HOOK, 'remove', be, { ...w.env, ...env });
  await destroyNodes(w.xs, d);
  return r;
}

export async function removeOk(w: World, d: DiskNodes): Promise<void> {
  const r = await remove(w, d);
  assert.equal(r.code, 0, `remove failed: ${r.stderr}`);
}

export function connectedNbds(): string[] {
  if (!existsSync('/sys/block')) return [];
  return readdirSync('/sys/block').filter((n) => /^nbd\d+$/.test(n) && existsSync(`/sys/block/${n}/pid`));
}

export function qemuNbdProcesses(): string[] {
  return sh('ps', ['-eo', 'pid,args'])
    .split('\n')
    .filter((l) => /qemu-nbd\s/.test(l));
}

function filesIn(dir: string): string[] {
  return existsSync(dir) ? readdirSync(dir) : [];
}

/** Nothing of ours left: no nbd connection, no qemu-nbd, no (transient) overlay, no journal record. */
export function assertClean(w: World, what: string, keep: string[] = []): void {
  assert.deepEqual(connectedNbds(), [], `${what}: no nbd device connected`);
  assert.deepEqual(qemuNbdProcesses(), [], `${what}: no qemu-nbd running`);
  assert.deepEqual(
    filesIn(join(w.store, 'qcow')).filter((f) => !keep.includes(f)),
    [],
    `${what}: no overlay left`,
  );
  assert.deepEqual(filesIn(join(w.state, 'journal')), [], `${what}: no journal record left`);
  assert.deepEqual(filesIn(join(w.state, 'qcow')), [], `${what}: no pid file left`);
}
