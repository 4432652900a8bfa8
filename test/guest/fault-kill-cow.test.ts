/**
 * block-cow, add killed at every step (real kernel): for N = 1, 2, … the add is SIGKILLed right
 * after its N-th external command (XEN_BLOCKHOOKS_FAULT_KILL_AFTER, as libxl's timeout kills a
 * hook), then remove runs, then `xen-blockhooks gc --apply`: no dm device, loop, nbd, qemu-nbd,
 * store, journal record, lock file or held lock may be left, and the base is unchanged. Each
 * next add of the same disk starts from that state; the loop ends when an add completes under
 * the fault point (that add must then be connected over a read-only base loop).
 * Kills during remove: fault-kill-cow-remove.test.ts.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { statSync } from 'node:fs';
import { census, gcApply, hookInProcess, reportRow, sh } from '../lib/fault-lib.js';
import { cowBackend } from '../../src/backends/cow.js';
import type { DiskNodes } from '../lib/backend-nodes.js';
import {
  backendPath,
  base,
  baseSum,
  closeBackend,
  destroyNodes,
  disk,
  env,
  explain,
  hook,
  loopsOnBase,
  sha256File,
  stateDir,
  storeDir,
  writeBackendNodes,
  xenLockDir,
  xs,
} from './cow-lib.js';

const dirs = { storeDir, stateDir, xenLockDir };

async function inproc(action: 'add' | 'remove', d: DiskNodes): Promise<number> {
  const r = await hookInProcess(cowBackend, action, backendPath(d), env);
  if (r.code !== 0)
    process.stderr.write(`${action} ${backendPath(d)}: exit ${r.code}: ${r.text}
`);
  return r.code;
}

test('block-cow: SIGKILL after every command of add; remove + gc leave nothing; the next add succeeds', async () => {
  const mtime = statSync(base).mtimeMs;
  let done = false;
  let kills = 0;
  const d = disk(5, { domainName: 'killme' });
  for (let n = 1; n <= 30 && !done; n++) {
    await writeBackendNodes(xs, d);
    const r = await hook('add', d, { XEN_BLOCKHOOKS_FAULT_KILL_AFTER: String(n) });
    if (r.code === 0) {
      done = true;
      const loops = loopsOnBase();
      assert.equal(loops.length, 1, 'one base loop');
      assert.equal(sh('blockdev', ['--getro', loops[0] as string]), '1', 'the base loop is read-only');
      assert.match(await xs.read(`${backendPath(d)}/physical-device`), /^[0-9a-f]+:[0-9a-f]+$/, 'connected');
    } else {
      assert.equal(r.signal, 'SIGKILL', `add killed after command ${n}: ${explain(r)}`);
      kills++;
    }
    await closeBackend(xs, d);
    assert.equal(await inproc('remove', d), 0, `remove after the add was killed at ${n}`);
    await destroyNodes(xs, d);
    await gcApply(env);
    assert.deepEqual(census(dirs), [], `add killed after command ${n}, then remove and gc`);
  }
  assert.ok(done, 'an add ran to completion under the fault point');
  assert.ok(kills >= 5, `killed ${kills} adds`);
  assert.equal(sha256File(base), baseSum, 'the base checksum is unchanged');
  assert.equal(statSync(base).mtimeMs, mtime, 'the base mtime is unchanged');
  process.stdout.write(`# add killed at ${kills} points\n`);
  reportRow({
    hook: 'block-cow',
    fault: `SIGKILL after each of the ${kills} commands of add`,
    checked:
      'remove + gc --apply: no dm, loop, nbd, qemu-nbd, store, journal, lock file or held lock; the next add of the same disk succeeds over a read-only base loop; base sha256 and mtime unchanged',
    result: 'pass',
  });
});
