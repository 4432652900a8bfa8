/**
 * One bundled hook under test as Xen runs it: a child process (dist/<bundle>.mjs) against an
 * in-process xenstore server, with its own folder for images, stores, state, Xen's lock, the log
 * and the xenstore socket, and the environment that points the hook at them. Framework-neutral
 * (node:assert only): a file calls start() and stop() from its own before/after hooks.
 *
 *   const w = hookWorld({ name: 'thin', bundle: 'block-thin', env: { XEN_BLOCKHOOKS_THIN_DATA_SIZE: '8M' } });
 *   before(async () => { xs = await w.start(); });
 *   after(() => w.stop({ dmPrefixes: ['xbh-thin-', 'xbh-thinpool'] }));
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { connectXenstore } from '../../src/xenstore/client.js';
import { startXenstoreServer, type XenstoreServer } from '../../src/xenstore/server.js';
import type { XenstoreClient } from '../../src/xenstore/types.js';
import {
  backendPath,
  closeBackend,
  destroyNodes,
  runHookProcess,
  writeBackendNodes,
  type DiskNodes,
  type HookRun,
} from './backend-nodes.js';
import { listDir, sh } from './disk-io.js';
import { projectRoot } from './project-root.js';

export interface HookWorldOptions {
  /** The folder is <scratch>/<name>-<pid> (scratch: XEN_BLOCKHOOKS_SCRATCH, else /tmp). */
  name: string;
  /** The hook: dist/<bundle>.mjs of the project. */
  bundle: string;
  /** Another file to run as the hook (a private copy of the bundle). */
  hookPath?: string;
  /** XEN_BLOCKHOOKS_IMAGE_DIRS (default: <root>/images). */
  imageDirs?: string;
  /** More environment for every run, after the common part. */
  env?: NodeJS.ProcessEnv;
}

export interface HookWorld {
  hookPath: string;
  root: string;
  images: string;
  storeDir: string;
  stateDir: string;
  xenLockDir: string;
  logFile: string;
  sock: string;
  /** What every hook run gets. */
  env: NodeJS.ProcessEnv;
  /** The client start() connected. */
  readonly xs: XenstoreClient;
  /** A fresh folder (root, images), the xenstore server and a client; fails when the hook is not built. */
  start(): Promise<XenstoreClient>;
  /**
   * Closes the client and the server, removes the dm devices whose names start with one of
   * `dmPrefixes` (in that order), detaches the loops over files in the folder and deletes it.
   */
  stop(opts?: { dmPrefixes?: string[] }): Promise<void>;
  /** A run's exit, stderr and the tail of the hook's log, for an assertion's message. */
  explain(r: HookRun): string;
  /** Run the hook for a disk's backend path. */
  hook(action: string, d: Pick<DiskNodes, 'domid' | 'devid'>, extraEnv?: NodeJS.ProcessEnv): Promise<HookRun>;
  /**
   * Write the nodes and add (create for xend): exit 0, hotplug-status connected, a hex
   * major:minor in physical-device and physical-device-path naming that device.
   */
  addOk(d: DiskNodes): Promise<{ path: string; pd: string }>;
  /** Close the backend, remove (destroy for xend) with exit 0, delete the nodes. */
  removeOk(d: DiskNodes): Promise<void>;
  /**
   * What a hook could leave behind: dm devices, loops, store files (but `keepStores`), journal
   * records, lock files, Xen's lock files. Empty when nothing is.
   */
  leftovers(keepStores?: string[]): string[];
}

/** The folder of hookWorld({ name }): <scratch>/<name>-<pid>. */
export function worldRoot(name: string): string {
  return join(process.env.XEN_BLOCKHOOKS_SCRATCH ?? '/tmp', `${name}-${process.pid}`);
}

export function hookWorld(opts: HookWorldOptions): HookWorld {
  const hookPath = opts.hookPath ?? join(projectRoot(), 'dist', `${opts.bundle}.mjs`);
  const root = worldRoot(opts.name);
  const images = join(root, 'images');
  const storeDir = join(root, 'store');
  const stateDir = join(root, 'state');
  const xenLockDir = join(root, 'xen-hotplug');
  const logFile = join(root, 'hook.log');
  const sock = join(root, 'xenstored.sock');
  const env: NodeJS.ProcessEnv = {
    PATH: process.env.PATH,
    DM_DISABLE_UDEV: process.env.DM_DISABLE_UDEV ?? '1',
    XENSTORED_PATH: sock,
    XEN_BLOCKHOOKS_CONF: join(root, 'no-such.conf'),
    XEN_BLOCKHOOKS_STORE_DIR: storeDir,
    XEN_BLOCKHOOKS_STATE_DIR: stateDir,
    XEN_BLOCKHOOKS_IMAGE_DIRS: opts.imageDirs ?? images,
    XEN_BLOCKHOOKS_XEN_LOCK_DIR: xenLockDir,
    XEN_BLOCKHOOKS_LOG_FILE: logFile,
    XEN_BLOCKHOOKS_BUSY_RETRY_MS: '5000',
    ...opts.env,
  };
  let server: XenstoreServer | undefined;
  let client: XenstoreClient | undefined;
  const xsOf = (): XenstoreClient => {
    assert.ok(client, 'hookWorld: start() first');
    return client;
  };

  const explain = (r: HookRun): string => {
    const log = existsSync(logFile) ? readFileSync(logFile, 'utf8').split('\n').slice(-15).join('\n') : '';
    return `exit ${r.code} signal ${r.signal}\nstderr: ${r.stderr}\nlog tail:\n${log}`;
  };
  const hook = (action: string, d: Pick<DiskNodes, 'domid' | 'devid'>, extraEnv: NodeJS.ProcessEnv = {}) =>
    runHookProcess(hookPath, action, backendPath(d), { ...env, ...extraEnv });

  return {
    hookPath,
    root,
    images,
    storeDir,
    stateDir,
    xenLockDir,
    logFile,
    sock,
    env,
    get xs(): XenstoreClient {
      return xsOf();
    },
    async start() {
      assert.ok(existsSync(hookPath), `${hookPath} is missing: run npm run build first`);
      rmSync(root, { recursive: true, force: true });
      mkdirSync(images, { recursive: true });
      server = await startXenstoreServer({ socketPath: sock });
      client = await connectXenstore({ path: sock });
      return client;
    },
    async stop({ dmPrefixes = [] } = {}) {
      await client?.close().catch(() => {});
      await server?.close().catch(() => {});
      for (const prefix of dmPrefixes) {
        for (const l of sh('dmsetup', ['ls']).split('\n')) {
          const name = l.split(/\s+/)[0];
          if (name?.startsWith(prefix)) spawnSync('dmsetup', ['remove', name]);
        }
      }
      for (const l of sh('losetup', ['-a']).split('\n'))
        if (l.includes(root)) spawnSync('losetup', ['-d', l.split(':')[0] as string]);
      rmSync(root, { recursive: true, force: true });
    },
    explain,
    hook,
    async addOk(d) {
      const xs = xsOf();
      await writeBackendNodes(xs, d);
      const r = await hook(d.dialect === 'xend' ? 'create' : 'add', d);
      const be = backendPath(d);
      assert.equal(r.code, 0, `add ${be}: ${explain(r)}`);
      const pd = await xs.read(`${be}/physical-device`);
      const path = await xs.read(`${be}/physical-device-path`);
      assert.equal(await xs.read(`${be}/hotplug-status`), 'connected');
      assert.match(pd, /^[0-9a-f]+:[0-9a-f]+$/);
      assert.equal(
        sh('stat', ['-L', '-c', '%t:%T', path]),
        pd,
        'physical-device-path is the device physical-device names',
      );
      return { path, pd };
    },
    async removeOk(d) {
      const xs = xsOf();
      await closeBackend(xs, d);
      const r = await hook(d.dialect === 'xend' ? 'destroy' : 'remove', d);
      assert.equal(r.code, 0, `remove ${backendPath(d)}: ${explain(r)}`);
      await destroyNodes(xs, d);
    },
    leftovers(keepStores = []) {
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
    },
  };
}
