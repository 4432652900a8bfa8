/**
 * block-cow, remove killed at every step (real kernel): the disk is added (in this process), its
 * remove is SIGKILLed right after its N-th external command, then remove runs again and
 * `xen-blockhooks gc --apply`: nothing may be left (same census as for killed adds), and the
 * next add of the same disk succeeds. The loop ends when a remove completes under the fault point.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { statSync } from 'node:fs';
import { census, gcApply, hookInProcess, reportRow } from '../lib/fault-lib.js';
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

const t0 = Date.now();
const progress = (m: string): void =>
  void process.stderr.write(`fault-kill-cow-remove ${((Date.now() - t0) / 1000).toFixed(1)}s: ${m}\n`);

test('block-cow: SIGKILL after every command of remove; remove + gc leave nothing; the next add succeeds', async () => {
  const mtime = statSync(base).mtimeMs;
  let done = false;
  let kills = 0;
  const d = disk(6, { domainName: 'killrm' });
  for (let n = 1; n <= 30 && !done; n++) {
    await writeBackendNodes(xs, d);
    assert.equal(
      await inproc('add', d),
      0,
      `the add before remove kill ${n} (after the previous kill, remove and gc) succeeds`,
    );
    await closeBackend(xs, d);
    progress(`remove killed after ${n}`);
    const r = await hook('remove', d, { XEN_BLOCKHOOKS_FAULT_KILL_AFTER: String(n) });
    progress(`  -> ${r.code ?? r.signal}`);
    if (r.code === 0) done = true;
    else {
      assert.equal(r.signal, 'SIGKILL', `remove killed after command ${n}: ${explain(r)}`);
      kills++;
    }
    progress('  remove again');
    assert.equal(await inproc('remove', d), 0, `remove again after the remove was killed at ${n}`);
    await destroyNodes(xs, d);
    await gcApply(env);
    assert.deepEqual(census(dirs), [], `remove killed after command ${n}, then remove and gc`);
  }
  assert.ok(done, 'a remove ran to completion under the fault point');
  assert.ok(kills >= 3, `killed ${kills} removes`);
  assert.equal(sha256File(base), baseSum, 'the base checksum is unchanged');
  assert.equal(statSync(base).mtimeMs, mtime, 'the base mtime is unchanged');
  process.stdout.write(`# remove killed at ${kills} points\n`);
  reportRow({
    hook: 'block-cow',
    fault: `SIGKILL after each of the ${kills} commands of remove`,
    checked:
      'remove again + gc --apply: no dm, loop, nbd, qemu-nbd, store, journal, lock file or held lock; the next add of the same disk succeeds; base sha256 and mtime unchanged',
    result: 'pass',
  });
});
