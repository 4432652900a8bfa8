/**
 * xen-blockhooks status, gc and grow on a real kernel: an orphaned record (the toolstack forgot the
 * domain without running remove) and a deliberately leaked dm device are found and removed; a live
 * store is grown online.
 */
import { before, test } from 'node:test';
import { spawnSync } from 'node:child_process';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { connectXenstore } from '../../src/xenstore/client.js';
import { base, cli, dmNames, env, loopsOn, sock, work } from './cli-lib.js';
import { startXenstored } from './cli-lib.js';

before(startXenstored);

test('status and gc: an orphaned record and a leaked dm device are found and removed', async () => {
  const xsEnv = { XENSTORED_PATH: sock };
  const add = cli(
    [
      'simulate',
      '--real-xenstore',
      '--keep',
      '--domid',
      '5',
      '--name',
      'mail',
      `vdev=xvda,access=w,script=block-cow,target=${base} 8`,
    ],
    xsEnv,
  );
  assert.equal(add.code, 0, add.all);
  const keep = cli(
    [
      'simulate',
      '--real-xenstore',
      '--keep',
      '--domid',
      '6',
      '--name',
      'dns',
      `vdev=xvda,access=w,script=block-cow,target=${base} 8`,
    ],
    xsEnv,
  );
  assert.equal(keep.code, 0, keep.all);
  let st = JSON.parse(cli(['status', '--json'], xsEnv).out);
  assert.deepEqual(st.devices.map((d: { domain: string; state: string }) => `${d.domain} ${d.state}`).sort(), [
    'dns active',
    'mail active',
  ]);
  assert.equal(cli(['gc'], xsEnv).code, 0, 'nothing to collect while both domains exist');

  // The toolstack forgets domain 5 without running remove; something leaks a device named like ours.
  const xs = await connectXenstore({ path: sock });
  await xs.rm('/local/domain/0/backend/vbd/5');
  await xs.rm('/local/domain/5');
  await xs.close();
  const leak = spawnSync('dmsetup', ['create', 'xbh-cow-leaked-xvdz-1', '--table', '0 2048 zero'], {
    encoding: 'utf8',
    env: { PATH: env.PATH, DM_DISABLE_UDEV: '1' },
  });
  assert.equal(leak.status, 0, leak.stderr);

  const table = cli(['status'], xsEnv);
  assert.equal(table.code, 0, table.all);
  assert.match(table.out, /^5\s+mail\s+xvda\s+block-cow\s+.*\sorphan$/m);
  assert.match(table.out, /^6\s+dns\s+xvda\s+block-cow\s+.*\s\d+\.\d%\s+active$/m);
  assert.match(table.out, /^-\s+-\s+-\s+-\s+xbh-cow-leaked-xvdz-1\s.*leaked$/m);
  assert.match(
    table.out,
    /^\s+\/dev\/mapper\/xbh-cow-leaked-xvdz-1: leaked: device-mapper device named like ours that no record mentions$/m,
  );

  const plan = cli(['gc'], xsEnv);
  assert.equal(plan.code, 3, plan.all);
  assert.match(plan.out, /undo block-cow record for backend\/vbd\/5\/51712/);
  assert.match(plan.out, /dmsetup remove xbh-cow-leaked-xvdz-1/);
  assert.doesNotMatch(plan.out, /vbd\/6\//, 'the live domain is not in the plan');
  assert.ok(dmNames().includes('xbh-cow-mail-xvda-51712'), 'the plan alone changes nothing');

  const done = cli(['gc', '--apply'], xsEnv);
  assert.equal(done.code, 0, done.all);
  assert.deepEqual(
    dmNames()
      .filter((n) => n.startsWith('xbh-'))
      .sort(),
    ['xbh-cow-dns-xvda-51712'],
    "only the live domain's device is left",
  );
  assert.equal(cli(['gc'], xsEnv).code, 0, 'nothing more to collect');
  st = JSON.parse(cli(['status', '--json'], xsEnv).out);
  assert.deepEqual(
    st.devices.map((d: { domain: string; state: string }) => `${d.domain} ${d.state}`),
    ['dns active'],
  );
  assert.match(
    readFileSync(env.XEN_BLOCKHOOKS_LOG_FILE as string, 'utf8'),
    /gc: removed leaked dm device \/dev\/mapper\/xbh-cow-leaked-xvdz-1/,
  );

  // grow the live one online, then take it down.
  const g = cli(['grow', 'dns', 'xvda', '+8M'], xsEnv);
  assert.equal(g.code, 0, g.all);
  assert.match(g.out, /8\.0M → 16\.0M, online/);
  // The snapshot sees the new store size at once (status: used/total sectors of the store).
  const dns = dmNames().find((n) => n.startsWith('xbh-cow-dns-'));
  assert.ok(dns, 'the dns disk is still there');
  assert.match(spawnSync('dmsetup', ['status', dns], { encoding: 'utf8' }).stdout, / snapshot \d+\/32768 /);
  const rm = cli(
    [
      'simulate',
      '--real-xenstore',
      '--action',
      'remove',
      '--domid',
      '6',
      '--name',
      'dns',
      `vdev=xvda,access=w,script=block-cow,target=${base} 8`,
    ],
    xsEnv,
  );
  assert.equal(rm.code, 0, rm.all);
  assert.deepEqual(
    dmNames().filter((n) => n.startsWith('xbh-')),
    [],
  );
  assert.deepEqual(loopsOn(work), []);
});
