/**
 * The boot cleanup on a real kernel (what xen-blockhooks-boot.service runs: `gc --apply`): a
 * transient and a persistent block-cow disk are built, then a crash is played (every device gone,
 * the journal in /run gone, time passing). gc finds the transient store and deletes it, never the
 * persistent one (only this host's stale claim on it), and the persistent disk comes back with the
 * data written before the crash.
 */
import { before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { closeSync, existsSync, fsyncSync, openSync, readSync, rmSync, utimesSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { connectXenstore } from '../../src/xenstore/client.js';
import { base, cli, dmNames, env, loopsOn, sock, startXenstored, work } from './cli-lib.js';

before(startXenstored);

const xsEnv = { XENSTORED_PATH: sock };
const storeDir = env.XEN_BLOCKHOOKS_STORE_DIR as string;
const spec = (tail: string) => `vdev=xvda,access=w,script=block-cow,target=${base} ${tail}`;

function devOf(name: string): string {
  const r = spawnSync('dmsetup', ['info', '-c', '--noheadings', '-o', 'major,minor', name], { encoding: 'utf8' });
  assert.equal(r.status, 0, r.stderr);
  const [maj, min] = r.stdout.trim().split(':');
  return `/sys/dev/block/${maj}:${min}`;
}

function writeAt(dm: string, offset: number, text: string): void {
  // The dm device node is made by dmsetup itself here (no udev): /dev/mapper/NAME.
  const fd = openSync(`/dev/mapper/${dm}`, 'r+');
  try {
    writeSync(fd, Buffer.from(text.padEnd(512, '\0')), 0, 512, offset);
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

function readAt(dm: string, offset: number, length: number): string {
  const fd = openSync(`/dev/mapper/${dm}`, 'r');
  try {
    const b = Buffer.alloc(length);
    readSync(fd, b, 0, length, offset);
    return b.toString('latin1');
  } finally {
    closeSync(fd);
  }
}

/** What a crash does to the hooks' world: every device gone, /run's journal gone, time passes. */
function crash(): void {
  for (const n of dmNames().filter((d) => d.startsWith('xbh-')))
    assert.equal(spawnSync('dmsetup', ['remove', n]).status, 0, `dmsetup remove ${n}`);
  spawnSync('losetup', ['-D']);
  assert.deepEqual(loopsOn(work), [], 'no loop after the crash');
  rmSync(env.XEN_BLOCKHOOKS_STATE_DIR as string, { recursive: true, force: true });
  const old = Date.now() / 1000 - 600;
  for (const f of ['transient-5-51712.cow', 'web-xvda.cow']) utimesSync(join(storeDir, f), old, old);
}

test("boot cleanup: a crash's transient store is deleted, a persistent one kept with its data", async () => {
  const t5 = cli(['simulate', '--real-xenstore', '--keep', '--domid', '5', '--name', 'lab', spec('8')], xsEnv);
  assert.equal(t5.code, 0, t5.all);
  const p6 = cli(
    ['simulate', '--real-xenstore', '--keep', '--domid', '6', '--name', 'web', spec('8 persistent')],
    xsEnv,
  );
  assert.equal(p6.code, 0, p6.all);
  assert.ok(existsSync(devOf('xbh-cow-web-xvda-51712')));
  writeAt('xbh-cow-web-xvda-51712', 1024 * 1024, 'WRITTEN-BEFORE-THE-CRASH');
  assert.ok(existsSync(join(storeDir, 'transient-5-51712.cow')));
  assert.ok(existsSync(join(storeDir, 'web-xvda.cow')));

  crash();
  assert.deepEqual(
    dmNames().filter((d) => d.startsWith('xbh-')),
    [],
    'no device after the crash',
  );

  const plan = cli(['gc'], xsEnv);
  assert.equal(plan.code, 3, `something to collect: ${plan.all}`);
  assert.match(plan.out, /rm .*\/transient-5-51712\.cow: transient store file that no record, loop or nbd server uses/);
  assert.doesNotMatch(plan.out, /rm .*web-xvda\.cow/, 'the persistent store is not in the plan');
  assert.match(
    plan.out,
    /release .*\/web-xvda\.cow\.owner: this host's claim on .*web-xvda\.cow \(for backend\/vbd\/6\/51712, which no record knows\)/,
    'its claim is, since no record holds it after the crash',
  );
  assert.ok(existsSync(join(storeDir, 'transient-5-51712.cow')), 'the plan alone changes nothing');

  const done = cli(['gc', '--apply'], xsEnv);
  assert.equal(done.code, 0, done.all);
  assert.ok(!existsSync(join(storeDir, 'transient-5-51712.cow')), 'the transient store is deleted');
  assert.ok(existsSync(join(storeDir, 'web-xvda.cow')), 'the persistent store is kept');
  assert.ok(!existsSync(join(storeDir, 'web-xvda.cow.owner')), 'its stale claim is released');
  assert.equal(cli(['gc'], xsEnv).code, 0, 'a second run finds nothing');

  // The domain is started again after the reboot: its persistent disk has what it wrote.
  const xs = await connectXenstore({ path: sock });
  await xs.rm('/local/domain/0/backend/vbd/6');
  await xs.rm('/local/domain/0/backend/vbd/5');
  await xs.close();
  const again = cli(
    ['simulate', '--real-xenstore', '--keep', '--domid', '7', '--name', 'web', spec('8 persistent')],
    xsEnv,
  );
  assert.equal(again.code, 0, again.all);
  assert.equal(readAt('xbh-cow-web-xvda-51712', 1024 * 1024, 25), 'WRITTEN-BEFORE-THE-CRASH\0');
  const rm = cli(
    ['simulate', '--real-xenstore', '--action', 'remove', '--domid', '7', '--name', 'web', spec('8 persistent')],
    xsEnv,
  );
  assert.equal(rm.code, 0, rm.all);
  assert.deepEqual(
    dmNames().filter((d) => d.startsWith('xbh-')),
    [],
  );
  assert.deepEqual(loopsOn(work), []);
  assert.ok(!existsSync(join(storeDir, 'web-xvda.cow.owner')), 'the remove released the claim it made');
  rmSync(join(storeDir, 'web-xvda.cow'));
});
