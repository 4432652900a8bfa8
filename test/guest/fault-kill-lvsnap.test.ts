/**
 * block-lvsnap, add killed at every step (real kernel, real LVM on loop devices): for N = 1, 2, …
 * the bundled hook is SIGKILLed right after its N-th external command (as libxl's timeout kills a
 * hook), then remove and `xen-blockhooks gc --apply` run: no snapshot LV, journal record or lock
 * may be left, and the origin is unchanged. The loop ends when an add completes.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdirSync, readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { census, gcApply, hookInProcess, reportRow } from '../lib/fault-lib.js';
import {
  backendPath,
  closeBackend,
  destroyNodes,
  runHookProcess,
  writeBackendNodes,
  type DiskNodes,
} from '../lib/backend-nodes.js';
import { lvsnapBackend } from '../../src/backends/lvsnap.js';
import { connectXenstore } from '../../src/xenstore/client.js';
import { startXenstoreServer, type XenstoreServer } from '../../src/xenstore/server.js';
import type { XenstoreClient } from '../../src/xenstore/types.js';

const HOOK = join(process.cwd(), 'dist', 'block-lvsnap.mjs');
const root = join(process.env.XEN_BLOCKHOOKS_SCRATCH ?? '/tmp', `lvkill-${process.pid}`);
const dirs = {
  storeDir: join(root, 'store'),
  stateDir: join(root, 'state'),
  xenLockDir: join(root, 'xen-hotplug'),
  vg: 'xbhkillvg',
};
const VG = dirs.vg;
const sock = join(root, 'xenstored.sock');
const pvs: string[] = [];
let server: XenstoreServer;
let xs: XenstoreClient;

const env: NodeJS.ProcessEnv = {
  PATH: process.env.PATH,
  DM_DISABLE_UDEV: process.env.DM_DISABLE_UDEV ?? '1',
  XENSTORED_PATH: sock,
  XEN_BLOCKHOOKS_CONF: join(root, 'no-such.conf'),
  XEN_BLOCKHOOKS_STORE_DIR: dirs.storeDir,
  XEN_BLOCKHOOKS_STATE_DIR: dirs.stateDir,
  XEN_BLOCKHOOKS_IMAGE_DIRS: root,
  XEN_BLOCKHOOKS_XEN_LOCK_DIR: dirs.xenLockDir,
  XEN_BLOCKHOOKS_LOG_FILE: join(root, 'hook.log'),
  XEN_BLOCKHOOKS_BUSY_RETRY_MS: '5000',
};

const sh = (file: string, args: string[]) =>
  execFileSync(file, args, {
    encoding: 'utf8',
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, LVM_SUPPRESS_FD_WARNINGS: '1' },
  }).trim();
const origin = `/dev/${VG}/golden`;
const sha = () => createHash('sha256').update(readFileSync(origin)).digest('hex');

before(async () => {
  rmSync(root, { recursive: true, force: true });
  mkdirSync(root, { recursive: true });
  const f = join(root, 'pv.img');
  sh('truncate', ['-s', '64M', f]);
  pvs.push(sh('losetup', ['--find', '--show', '--', f]));
  sh('lvm', ['pvcreate', '-q', ...pvs]);
  sh('lvm', ['vgcreate', '-q', VG, ...pvs]);
  sh('lvm', ['lvcreate', '-q', '-y', '-n', 'golden', '-L', '8M', VG]);
  server = await startXenstoreServer({ socketPath: sock });
  xs = await connectXenstore({ path: sock });
});

after(async () => {
  await xs?.close().catch(() => {});
  await server?.close().catch(() => {});
  spawnSync('lvm', ['vgremove', '-q', '-f', VG]);
  spawnSync('lvm', ['pvremove', '-q', ...pvs]);
  for (const p of pvs) spawnSync('losetup', ['-d', p]);
  rmSync(root, { recursive: true, force: true });
});

test('block-lvsnap: SIGKILL after every command of add; remove + gc leave nothing; the next add succeeds', async () => {
  const before = sha();
  const d: DiskNodes = {
    domid: 41,
    devid: 51712,
    params: `${VG}/golden 4M`,
    mode: 'w',
    vdev: 'xvda',
    domainName: 'lvkill',
    script: '/etc/xen/scripts/block-lvsnap',
  };
  let done = false;
  let kills = 0;
  for (let n = 1; n <= 30 && !done; n++) {
    await writeBackendNodes(xs, d);
    const r = await runHookProcess(HOOK, 'add', backendPath(d), { ...env, XEN_BLOCKHOOKS_FAULT_KILL_AFTER: String(n) });
    if (r.code === 0) done = true;
    else {
      assert.equal(r.signal, 'SIGKILL', `add killed after command ${n}: exit ${r.code} ${r.stderr}`);
      kills++;
    }
    await closeBackend(xs, d);
    const rm = await hookInProcess(lvsnapBackend, 'remove', backendPath(d), env);
    assert.equal(rm.code, 0, `remove after the add was killed at ${n}: ${rm.text}`);
    await destroyNodes(xs, d);
    await gcApply(env);
    assert.deepEqual(
      census({ ...dirs, keepLoops: pvs, keepDms: [`${VG}-golden`] }),
      [],
      `add killed after command ${n}, then remove and gc`,
    );
  }
  assert.ok(done, 'an add ran to completion under the fault point');
  assert.ok(kills >= 2, `killed ${kills} adds`);
  assert.equal(sha(), before, 'the origin is unchanged');
  process.stdout.write(`# add killed at ${kills} points\n`);
  reportRow({
    hook: 'block-lvsnap',
    fault: `SIGKILL after each of the ${kills} commands of add`,
    checked:
      'remove + gc --apply: no snapshot LV, journal, lock file or held lock; the next add succeeds; origin sha256 unchanged',
    result: 'pass',
  });
});
