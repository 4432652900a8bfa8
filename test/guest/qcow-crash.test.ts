/**
 * block-qcow killed mid-add, on a real kernel with real nbd: the hook SIGKILLed after chosen
 * external commands (as libxl's timeout does), each followed by a remove that must leave nothing
 * behind: no nbd connection, no qemu-nbd, no overlay, no record.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { rmSync } from 'node:fs';
import { join } from 'node:path';
import {
  add,
  assertClean,
  connectedNbds,
  disk,
  makeWorld,
  patternedRaw,
  remove,
  sha256File,
  type World,
} from './qcow-lib.js';

let w: World;
before(async () => {
  w = await makeWorld('qcow-crash');
});
after(async () => {
  await w?.close();
});

// Kill points: the add's external commands in order are flock (backend path), qemu-img info,
// qemu-img info --backing-chain, flock per chain file (two here), [qemu-img create,] flock (nbd),
// qemu-nbd --connect. The last point of each list is "connected, not yet reported".
const KILL_POINTS: Record<string, number[]> = { transient: [3, 6, 7, 8], no: [5, 7] };
for (const overlay of ['transient', 'no']) {
  test(`SIGKILL mid-add (after the info, create, lock and connect commands) (overlay=${overlay}), then remove: nothing left`, async () => {
    const base = join(w.images, `kill-${overlay}.qcow2`);
    // direct mode writes into the image: give it its own qcow2; overlay mode reads it.
    patternedRaw(`${base}.raw`, 8, 'kill');
    sh2('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', `${base}.raw`, '-F', 'raw', base]);
    const rawSum = sha256File(`${base}.raw`);
    let killedWhileConnected = 0;
    let finished = false;
    for (const n of [...(KILL_POINTS[overlay] ?? []), 0]) {
      const d = disk(200 + n, `${base} overlay=${overlay}`);
      const a = await add(w, d, n === 0 ? {} : { XEN_BLOCKHOOKS_FAULT_KILL_AFTER: String(n) });
      if (n === 0) {
        assert.equal(a.run.code, 0, `add without a fault: ${a.run.stderr}`);
        finished = true;
      } else {
        assert.equal(a.run.signal, 'SIGKILL', `add #${n} was killed (${a.run.stderr})`);
        if (connectedNbds().length > 0) killedWhileConnected++;
      }
      const r = await remove(w, d);
      assert.equal(r.code, 0, `remove after kill #${n}: ${r.stderr}`);
      assertClean(w, `remove after the add was killed at command ${n}`);
    }
    assert.ok(finished, 'the add without a fault completes');
    assert.ok(killedWhileConnected >= 1, 'at least one kill left a connected nbd device for remove to take down');
    assert.equal(sha256File(`${base}.raw`), rawSum);
    rmSync(base);
    rmSync(`${base}.raw`);
  });
}

import { execFileSync } from 'node:child_process';
function sh2(file: string, args: string[]): void {
  execFileSync(file, args, { stdio: ['ignore', 'ignore', 'pipe'] });
}
