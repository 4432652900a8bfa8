/**
 * The installer on a real kernel: install into /, run block-cow through the installed wrapper
 * (as libxl would, via xen-blockhooks simulate --script-dir; the wrapper starts it from the
 * startup snapshot the installer made), uninstall.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readdirSync } from 'node:fs';
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { base, cli, env, ROOT } from './cli-lib.js';

test('install into / and run a hook through the installed wrapper', () => {
  const inst = spawnSync('/bin/sh', [join(ROOT, 'install')], {
    encoding: 'utf8',
    env: { PATH: env.PATH, NODE: process.execPath },
  });
  try {
    assert.equal(inst.status, 0, `${inst.stdout}${inst.stderr}`);
    assert.ok(existsSync('/etc/xen/scripts/block-cow'));
    assert.ok(existsSync('/usr/sbin/xen-blockhooks'));
    assert.ok(
      existsSync('/usr/lib/xen-blockhooks/block-cow.snapshot'),
      `the installer made block-cow's startup snapshot\n${inst.stdout}${inst.stderr}`,
    );
    const v = spawnSync('/etc/xen/scripts/block-cow', ['--version'], { encoding: 'utf8', env: { PATH: env.PATH } });
    assert.match(
      v.stdout,
      /^block-cow \(xen-blockhooks\) \S+ \(startup snapshot\)$/m,
      `the wrapper starts from it: ${v.stdout}${v.stderr}`,
    );
    const r = cli(
      [
        'simulate',
        '--script-dir',
        '/etc/xen/scripts',
        '--domid',
        '7',
        '--name',
        'inst',
        `vdev=xvdc,access=w,script=block-cow,target=${base} 8`,
      ],
      { NODE_OPTIONS: '--require /nonexistent.js' },
      '/usr/sbin/xen-blockhooks',
      [],
    );
    assert.equal(r.code, 0, r.all);
    assert.match(r.out, /running: XENBUS_PATH=backend\/vbd\/7\/51744 \/etc\/xen\/scripts\/block-cow add/);
    assert.match(r.out, /device-mapper xbh-cow-inst-xvdc-51744/);
    assert.match(r.out, /nothing left/);
  } finally {
    const u = spawnSync('/bin/sh', [join(ROOT, 'install'), '--uninstall'], {
      encoding: 'utf8',
      env: { PATH: env.PATH },
    });
    assert.equal(u.status, 0, `${u.stdout}${u.stderr}`);
  }
  assert.ok(!existsSync('/etc/xen/scripts/block-cow'), 'uninstalled');
  assert.ok(!existsSync('/usr/lib/xen-blockhooks'), 'library directory gone');
  assert.ok(!readdirSync('/usr/sbin').includes('xen-blockhooks'));
});
