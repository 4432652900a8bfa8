/**
 * xen-blockhooks simulate on a real kernel: block-cow end to end in xl and xm syntax, and a failing hook.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { base, cli, dmNames, loopsOn, work } from './cli-lib.js';

test('simulate, xl syntax: block-cow add builds a snapshot, remove leaves nothing', () => {
  const r = cli(['simulate', '--domid', '3', '--name', 'web', `vdev=xvda,access=w,script=block-cow,target=${base} 8`]);
  assert.equal(r.code, 0, r.all);
  assert.match(r.out, /wrote as libxl does:/);
  assert.match(r.out, /\/local\/domain\/0\/backend\/vbd\/3\/51712\/type = "phy"/);
  assert.match(r.out, /\/local\/domain\/0\/backend\/vbd\/3\/51712\/params = ".*base\.img 8"/);
  assert.match(r.out, /block-cow add: exit 0/);
  assert.match(r.out, /physical-device = "fe:\d+"|physical-device = "[0-9a-f]+:[0-9a-f]+"/);
  assert.match(r.out, /device-mapper xbh-cow-web-xvda-51712 \(\d+:\d+\):/);
  assert.match(r.out, /table: {2}0 \d+ snapshot \d+:\d+ \d+:\d+ N \d+/);
  assert.match(r.out, /on .*base\.img \(read-only\)/, 'the base loop is read-only');
  assert.match(r.out, /block-cow remove: exit 0/);
  assert.match(r.out, /nothing left/);
  assert.deepEqual(
    dmNames().filter((n) => n.startsWith('xbh-')),
    [],
  );
  assert.deepEqual(loopsOn(work), []);
});

test('simulate, xm syntax: type=cow, sda1 → devid 2049', () => {
  const r = cli(['simulate', '--domid', '4', '--name', 'db', `cow:${base} 8,sda1,w`]);
  assert.equal(r.code, 0, r.all);
  assert.match(r.out, /xm disk: vdev sda1 → devid 2049/);
  assert.match(r.out, /backend\/vbd\/4\/2049\/type = "cow"/);
  assert.match(r.out, /device-mapper xbh-cow-db-sda1-2049/);
  assert.match(r.out, /nothing left/);
});

test('simulate reports a hook failure in one sentence and exits 1', () => {
  const r = cli(['simulate', `vdev=xvdb,access=w,script=block-cow,target=/etc/passwd 8`]);
  assert.equal(r.code, 1);
  assert.match(
    r.err,
    /^xen-blockhooks simulate: block-cow add failed: The base image \/etc\/passwd lies outside the allowed image directories/m,
  );
  assert.deepEqual(loopsOn('/etc/passwd'), []);
});
