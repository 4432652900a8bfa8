/**
 * block-thin, add killed at every step (real kernel, real dm-thin): for N = 1, 2, … the bundled
 * hook is SIGKILLed right after its N-th external command (XEN_BLOCKHOOKS_FAULT_KILL_AFTER, as
 * libxl's timeout kills a hook), then remove and `xen-blockhooks gc --apply` run: no thin pool,
 * thin volume, dm device, loop, pool file, journal record or lock may be left, and the base is
 * unchanged. The loop ends when an add completes under the fault point.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { census, gcApply, hookInProcess, reportRow } from '../lib/fault-lib.js';
import { runHookProcess, type DiskNodes } from '../lib/backend-nodes.js';
import { thinBackend } from '../../src/backends/thin.js';
import {
  backendPath,
  base,
  baseSum,
  closeBackend,
  destroyNodes,
  disk,
  env,
  sha256File,
  stateDir,
  storeDir,
  writeBackendNodes,
  xenLockDir,
  xs,
} from './cow-lib.js';

const HOOK = join(process.cwd(), 'dist', 'block-thin.mjs');
const dirs = { storeDir, stateDir, xenLockDir };
// A small pool: the test is about what is left behind, not about space.
const thinEnv = { ...env, XEN_BLOCKHOOKS_THIN_DATA_SIZE: '64M', XEN_BLOCKHOOKS_THIN_METADATA_SIZE: '4M' };

async function inprocRemove(d: DiskNodes): Promise<void> {
  const r = await hookInProcess(thinBackend, 'remove', backendPath(d), thinEnv);
  assert.equal(r.code, 0, `remove ${backendPath(d)}: ${r.text}`);
}

test('block-thin: SIGKILL after every command of add; remove + gc leave nothing; the next add succeeds', async () => {
  let done = false;
  let kills = 0;
  const d = disk(31, { domainName: 'thinkill' });
  for (let n = 1; n <= 40 && !done; n++) {
    await writeBackendNodes(xs, d);
    const r = await runHookProcess(HOOK, 'add', backendPath(d), {
      ...thinEnv,
      XEN_BLOCKHOOKS_FAULT_KILL_AFTER: String(n),
    });
    if (r.code === 0) {
      done = true;
      assert.match(await xs.read(`${backendPath(d)}/physical-device`), /^[0-9a-f]+:[0-9a-f]+$/, 'connected');
    } else {
      assert.equal(r.signal, 'SIGKILL', `add killed after command ${n}: exit ${r.code} ${r.stderr}`);
      kills++;
    }
    await closeBackend(xs, d);
    await inprocRemove(d);
    await destroyNodes(xs, d);
    await gcApply(thinEnv);
    assert.deepEqual(census(dirs), [], `add killed after command ${n}, then remove and gc`);
  }
  assert.ok(done, 'an add ran to completion under the fault point');
  assert.ok(kills >= 5, `killed ${kills} adds`);
  assert.equal(sha256File(base), baseSum, 'the base checksum is unchanged');
  process.stdout.write(`# add killed at ${kills} points\n`);
  reportRow({
    hook: 'block-thin',
    fault: `SIGKILL after each of the ${kills} commands of add`,
    checked:
      'remove + gc --apply: no pool, thin volume, dm, loop, pool file, journal, lock file or held lock; the next add succeeds; base sha256 unchanged',
    result: 'pass',
  });
});
