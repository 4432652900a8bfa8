/**
 * xen-blockhooks open and close killed on a real kernel: a record whose steps were only intended
 * is undone by gc exactly (not another loop on the image), and an open or close SIGKILLed after
 * each of its commands leaves nothing once gc --apply (or, for a close killed before it changed
 * anything, close) has run.
 */
import { before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { cli, env, images, loopsOn, startXenstored } from './cli-lib.js';
import { census } from '../lib/fault-lib.js';
import { assertNothingLeft, image, journalDir, openRecords, partMaps, paths, sh, xsEnv } from './open-lib.js';

before(startXenstored);

test('a killed open (its steps only intended) is undone by gc: exactly its maps and loop, not another loop on the image', () => {
  const img = image('crash.img', 16, 'label: dos\nstart=2048, size=4096, type=83\nstart=8192, type=83\n');
  const theirs = sh('losetup', ['--find', '--show', '--read-only', '--', img]).trim();
  try {
    const o = cli(['open', img], xsEnv);
    assert.equal(o.code, 0, o.all);
    assert.equal(partMaps().length, 2);
    // As if the open was SIGKILLed after kpartx and losetup ran but before either result was written.
    const [rec] = openRecords();
    assert.ok(rec, 'the open has a record');
    const file = join(journalDir(), rec);
    const entry = JSON.parse(readFileSync(file, 'utf8'));
    const dead = spawnSync('true');
    entry.phase = 'adding';
    entry.pid = dead.pid;
    for (const s of entry.steps) {
      s.done = false;
      delete s.data.maps;
      delete s.data.loop;
      delete s.data.major;
      delete s.data.minor;
    }
    writeFileSync(file, JSON.stringify(entry));
    const st = cli(['status'], xsEnv);
    assert.match(st.out, /open: stopped half-way|orphan/, st.out);
    const plan = cli(['gc'], xsEnv);
    assert.equal(plan.code, 3, plan.all);
    assert.match(plan.out, /undo open record open\/image\/.*: open by process \d+ stopped half-way/);
    const done = cli(['gc', '--apply'], xsEnv);
    assert.equal(done.code, 0, done.all);
    assert.deepEqual(partMaps(), [], 'the maps are gone');
    assert.deepEqual(openRecords(), [], 'the record is gone');
    assert.equal(loopsOn(images).length, 1, 'their loop is still there');
    assert.ok(
      spawnSync('losetup', [theirs], { encoding: 'utf8' }).stdout.includes(img),
      `${theirs} still on the image`,
    );
  } finally {
    sh('losetup', ['-d', theirs]);
  }
  assertNothingLeft('after gc');
});

test('open and close SIGKILLed after each of their commands: gc --apply leaves nothing, the next open works', () => {
  const img = image('kill.img', 16, 'label: gpt\nstart=2048, size=4096\nstart=8192\n');
  const dirs = {
    storeDir: env.XEN_BLOCKHOOKS_STORE_DIR as string,
    stateDir: env.XEN_BLOCKHOOKS_STATE_DIR as string,
    xenLockDir: env.XEN_BLOCKHOOKS_XEN_LOCK_DIR as string,
  };
  const gcAll = (what: string) => {
    const g = cli(['gc', '--apply'], xsEnv);
    assert.equal(g.code, 0, `${what}: gc --apply: ${g.all}`);
    assert.deepEqual(census(dirs), [], `${what}: nothing is left after gc --apply`);
  };
  let completed = false;
  for (let n = 1; n <= 20 && !completed; n++) {
    const r = cli(['open', img], { ...xsEnv, XEN_BLOCKHOOKS_FAULT_KILL_AFTER: String(n) });
    if (r.code === 0) {
      completed = true;
      // flock twice, losetup --list and --find, kpartx: killed after each of them first.
      assert.ok(n > 5, `the open was killed after each of its commands before it ran to the end at ${n}`);
      assert.equal(paths(r.out).length, 2, r.out);
      assert.equal(cli(['close', img], xsEnv).code, 0);
      break;
    }
    assert.equal(r.code, null, `open killed after command ${n}: ${r.all}`);
    gcAll(`open killed after command ${n}`);
  }
  assert.ok(completed, 'an open finished within 20 commands');
  completed = false;
  for (let n = 1; n <= 20 && !completed; n++) {
    const o = cli(['open', img], xsEnv);
    assert.equal(o.code, 0, o.all);
    const r = cli(['close', img], { ...xsEnv, XEN_BLOCKHOOKS_FAULT_KILL_AFTER: String(n) });
    if (r.code === 0) {
      completed = true;
      // flock, dmsetup info and remove for each map, losetup --list, --detach, --list, flock.
      assert.ok(n > 8, `the close was killed after each of its commands before it ran to the end at ${n}`);
      break;
    }
    assert.equal(r.code, null, `close killed after command ${n}: ${r.all}`);
    // Killed before it changed anything (it had only taken its lock), the open still stands and
    // gc leaves it alone; close finishes the job. Killed later, gc finishes it.
    const st = JSON.parse(cli(['status', '--json'], xsEnv).out) as { devices: { hook: string; state: string }[] };
    const g = cli(['gc', '--apply'], xsEnv);
    assert.equal(g.code, 0, g.all);
    if (st.devices.some((d) => d.hook === 'open' && d.state === 'open')) {
      assert.equal(partMaps().length, 2, `close killed after command ${n}: the open still stands`);
      const again = cli(['close', img], xsEnv);
      assert.equal(again.code, 0, again.all);
    } else {
      assert.deepEqual(
        st.devices.map((d) => `${d.hook} ${d.state}`),
        ['open orphan'],
        `close killed after command ${n}`,
      );
    }
    assert.deepEqual(census(dirs), [], `close killed after command ${n}: nothing is left`);
  }
  assert.ok(completed, 'a close finished within 20 commands');
  assert.deepEqual(census(dirs), []);
});
