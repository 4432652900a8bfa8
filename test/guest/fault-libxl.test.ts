/**
 * block-cow on libxl's own failure paths (real kernel; protocol doc §1.7):
 * - the toolstack wipes the device's xenstore nodes without running remove: `gc --apply` finds
 *   the orphaned record and takes everything away;
 * - remove while something still has the device open: bounded EBUSY retries, then a clear
 *   hotplug-error and a record kept for the next try; once the device is closed, remove finishes;
 * - the base image is deleted between add and remove: remove still takes everything away.
 * The hook runs in this process (the runtime the bundle runs): child processes cost seconds of
 * node start-up under TCG, and none of these paths is about start-up.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { closeSync, openSync, renameSync } from 'node:fs';
import { census, cliInProcess, gcApply, hookInProcess, reportRow } from '../lib/fault-lib.js';
import { cowBackend } from '../../src/backends/cow.js';
import { Journal } from '../../src/journal/journal.js';
import type { DiskNodes } from '../lib/backend-nodes.js';
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

const dirs = { storeDir, stateDir, xenLockDir };

function inproc(
  action: 'add' | 'remove',
  d: DiskNodes,
  extra: NodeJS.ProcessEnv = {},
): Promise<{ code: number; text: string }> {
  return hookInProcess(cowBackend, action, backendPath(d), { ...env, ...extra });
}

async function added(d: DiskNodes): Promise<string> {
  await writeBackendNodes(xs, d);
  const r = await inproc('add', d);
  assert.equal(r.code, 0, `add ${backendPath(d)}: ${r.text}`);
  return xs.read(`${backendPath(d)}/physical-device-path`);
}

test('xenstore nodes wiped without remove: gc --apply takes everything away', async () => {
  const d = disk(21, { domainName: 'wiped' });
  await added(d);
  await destroyNodes(xs, d); // libxl's "backend already removed, cleanup frontend only": no script runs
  assert.equal(new Journal(stateDir).list().entries.length, 1, 'the record is all that knows the device now');
  const plan = await cliInProcess(['gc'], env);
  assert.equal(plan.code, 3, `gc without --apply finds something: ${plan.text}`);
  assert.match(plan.text, /vbd\/21\//, 'the plan names the orphaned disk');
  await gcApply(env);
  assert.deepEqual(census(dirs), [], 'nothing left after gc --apply');
  reportRow({
    hook: 'block-cow',
    fault: 'xenstore nodes wiped without remove',
    checked: 'gc lists the orphaned record (exit 3); gc --apply leaves no dm, loop, store, journal or lock',
    result: 'pass',
  });
});

test('remove while the device is still open: bounded retries, a clear error, and remove finishes once it is closed', async () => {
  const d = disk(22, { domainName: 'busy' });
  const dev = await added(d);
  const fd = openSync(dev, 'r'); // blkback, or anything else, still holding the device
  let first;
  const t0 = Date.now();
  try {
    await closeBackend(xs, d);
    first = await inproc('remove', d, { XEN_BLOCKHOOKS_BUSY_RETRY_MS: '1500' });
  } finally {
    closeSync(fd);
  }
  const took = Date.now() - t0;
  assert.equal(first.code, 1, 'remove of an open device fails');
  assert.ok(took < 60_000, `the retries are bounded (${took} ms)`);
  assert.match(
    await xs.read(`${backendPath(d)}/hotplug-error`),
    /busy|open/i,
    'hotplug-error says the device is still in use',
  );
  const kept = new Journal(stateDir).load(backendPath(d));
  assert.ok(kept && kept.steps.length > 0, 'the record stays, with what is left to undo');
  const second = await inproc('remove', d);
  assert.equal(second.code, 0, `remove after the device was closed: ${second.text}`);
  await destroyNodes(xs, d);
  assert.deepEqual(census(dirs), [], 'nothing left');
  reportRow({
    hook: 'block-cow',
    fault: 'remove while the device is still open',
    checked:
      'exit 1 within the retry bound, hotplug-error names the busy device, the record is kept; the next remove after close leaves nothing',
    result: 'pass',
  });
});

test('the base image deleted between add and remove: remove still takes everything away', async () => {
  const d = disk(23, { domainName: 'gone' });
  await added(d);
  const saved = `${base}.saved`;
  renameSync(base, saved); // as good as deleted for the hook: the path is gone, the loop holds the inode
  try {
    await closeBackend(xs, d);
    const r = await inproc('remove', d);
    assert.equal(r.code, 0, `remove with the base gone: ${r.text}`);
    await destroyNodes(xs, d);
    assert.deepEqual(census(dirs), [], 'no loop of the vanished base, no dm, store or record left');
  } finally {
    renameSync(saved, base);
  }
  assert.equal(sha256File(base), baseSum, 'the base checksum is unchanged');
  reportRow({
    hook: 'block-cow',
    fault: 'base image removed between add and remove',
    checked: 'remove exits 0 and leaves no loop, dm, store, journal or lock',
    result: 'pass',
  });
});
