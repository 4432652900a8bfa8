/** block-cow on a real kernel: the hook SIGKILLed after each command of an add (as libxl's timeout does), then remove. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  addOk,
  closeBackend,
  destroyNodes,
  disk,
  explain,
  hook,
  leftovers,
  loopsOnBase,
  removeOk,
  writeBackendNodes,
  xs,
} from './cow-lib.js';

test('SIGKILL after each command of an add, then remove: nothing left', async () => {
  let finished = false;
  let killed = 0;
  for (let n = 1; n <= 40 && !finished; n++) {
    const d = disk(5, { domainName: 'killme' });
    // another disk keeps the base loop shared for odd n: both paths of the base-ref undo run
    const other = n % 2 === 1 ? disk(6) : undefined;
    if (other) await addOk(other);
    await writeBackendNodes(xs, d);
    const r = await hook('add', d, { XEN_BLOCKHOOKS_FAULT_KILL_AFTER: String(n) });
    if (r.code === 0) finished = true;
    else {
      assert.equal(r.signal, 'SIGKILL', `add killed after command ${n}: ${explain(r)}`);
      killed++;
    }
    await closeBackend(xs, d);
    const rm = await hook('remove', d);
    assert.equal(rm.code, 0, `remove after kill at ${n}: ${explain(rm)}`);
    await destroyNodes(xs, d);
    if (other) {
      assert.equal(loopsOnBase().length, 1, `kill at ${n}: the other disk's base loop survives`);
      await removeOk(other);
    }
    assert.deepEqual(leftovers(), [], `after kill at command ${n}`);
  }
  assert.ok(finished, 'the add eventually ran to completion');
  assert.ok(killed >= 5, `the add was killed at ${killed} points`);
  process.stdout.write(`# add killed at ${killed} points, each cleaned up by remove\n`);
});
