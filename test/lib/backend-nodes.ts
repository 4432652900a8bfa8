/**
 * Test helpers that play the toolstack's part around a block hook: write the backend and frontend
 * nodes the way libxl does before it runs a script (xen-hotplug-protocol.md §1.2), or the way
 * xend did (`type` = the disk prefix), take the backend to Closed as libxl does before `remove`,
 * delete the nodes afterwards, and run a bundled hook as a child process.
 */
import { spawn } from 'node:child_process';
import type { XenstoreClient, XsOps } from '../../src/xenstore/types.js';

export interface DiskNodes {
  /** The guest's domid (frontend). */
  domid: number;
  /** The device id (e.g. 51712 for xvda, 2049 for sda1). */
  devid: number;
  /** The disk target verbatim (`params`). */
  params: string;
  mode?: 'r' | 'w';
  /** `dev` node, e.g. xvda. */
  vdev?: string;
  /** Absolute script path (libxl writes it; xend did not). */
  script?: string;
  /** libxl: `phy` for script disks (default); xend: the disk prefix, e.g. `cow`. */
  type?: string;
  /** Written to /local/domain/<domid>/name when given. */
  domainName?: string;
  /** Backend state when the hook runs: 2 (InitWait) as blkback leaves it by then. */
  state?: number;
  dialect?: 'libxl' | 'xend';
}

/** `backend/vbd/<domid>/<devid>`: relative, as libxl passes XENBUS_PATH. */
export function backendPath(d: Pick<DiskNodes, 'domid' | 'devid'>): string {
  return `backend/vbd/${d.domid}/${d.devid}`;
}

export function frontendPath(d: Pick<DiskNodes, 'domid' | 'devid'>): string {
  return `/local/domain/${d.domid}/device/vbd/${d.devid}`;
}

/** Write the nodes in one transaction, as libxl's device_disk_add() does. Returns the backend path. */
export async function writeBackendNodes(xs: XenstoreClient, d: DiskNodes): Promise<string> {
  const be = backendPath(d);
  const fe = frontendPath(d);
  const xend = d.dialect === 'xend';
  await xs.transaction(async (tx: XsOps) => {
    const kv: [string, string][] = [
      ['params', d.params],
      ['frontend', fe],
      ['frontend-id', String(d.domid)],
      ['online', '1'],
      ['removable', '0'],
      ['bootable', '1'],
      ['state', String(d.state ?? 2)],
      ['dev', d.vdev ?? 'xvda'],
      ['type', d.type ?? (xend ? 'cow' : 'phy')],
      ['mode', d.mode ?? 'w'],
      ['device-type', 'disk'],
    ];
    if (!xend) {
      kv.push(['script', d.script ?? '/etc/xen/scripts/block-cow'], ['discard-enable', '0'], ['specification', 'xen']);
    }
    for (const [k, v] of kv) await tx.write(`${be}/${k}`, v);
    for (const [k, v] of [
      ['backend-id', '0'],
      ['backend', `/local/domain/0/${be}`],
      ['state', '1'],
      ['virtual-device', String(d.devid)],
      ['device-type', 'disk'],
    ]) {
      await tx.write(`${fe}/${k}`, v as string);
    }
    if (d.domainName !== undefined) await tx.write(`/local/domain/${d.domid}/name`, d.domainName);
  });
  return be;
}

/** What libxl does before running `remove`: online=0, state=6 (Closed) once the frontend let go. */
export async function closeBackend(xs: XenstoreClient, d: Pick<DiskNodes, 'domid' | 'devid'>): Promise<void> {
  const be = backendPath(d);
  await xs.transaction(async (tx: XsOps) => {
    await tx.write(`${be}/online`, '0');
    await tx.write(`${be}/state`, '6');
  });
}

/** What libxl does after `remove`: the backend and frontend directories go. */
export async function destroyNodes(xs: XenstoreClient, d: Pick<DiskNodes, 'domid' | 'devid'>): Promise<void> {
  await xs.rm(backendPath(d));
  await xs.rm(frontendPath(d));
}

export interface HookRun {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  ms: number;
}

/** Run a bundled hook (`node HOOK action`) with XENBUS_PATH set, the way libxl execs a script. */
export function runHookProcess(
  hook: string,
  action: string,
  xenbusPath: string,
  env: NodeJS.ProcessEnv,
  node = process.execPath,
): Promise<HookRun> {
  const t0 = performance.now();
  return new Promise((resolve, reject) => {
    const child = spawn(node, [hook, action], {
      env: { ...env, XENBUS_PATH: xenbusPath, XENBUS_TYPE: 'vbd', XENBUS_BASE_PATH: 'backend', script: hook },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (s: string) => (stdout += s));
    child.stderr.setEncoding('utf8').on('data', (s: string) => (stderr += s));
    child.on('error', reject);
    child.on('close', (code, signal) =>
      resolve({ code, signal, stdout, stderr, ms: Math.round(performance.now() - t0) }),
    );
  });
}
