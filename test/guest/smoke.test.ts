/**
 * Guest-tier smoke test: real loop devices and a real dm-snapshot on the guest's kernel, and
 * the project's Runner working from a bundle run by a node child process inside the guest.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { closeSync, fsyncSync, openSync, rmSync, truncateSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { execRunner } from '../../src/devices/exec.js';
import { block, patternedImage, pread, sh, sha256File } from '../lib/disk-io.js';

const MiB = 1024 * 1024;
const CHILD_FLAG = 'XBH_SMOKE_RUNNER_CHILD';

/** Deterministic 4 KiB block for index i: sha256 chains, so content is known but not trivial. */

if (process.env[CHILD_FLAG] === '1') {
  // Child mode: run one real command through the production Runner and report it as JSON.
  const r = await execRunner().run('dmsetup', ['version']);
  process.stdout.write(JSON.stringify({ exitCode: r.exitCode, stdout: r.stdout, command: r.command }));
} else {
  const scratch = process.env.XEN_BLOCKHOOKS_SCRATCH;

  test('guest environment', () => {
    assert.ok(scratch, 'XEN_BLOCKHOOKS_SCRATCH is set');
    assert.equal(process.env.DM_DISABLE_UDEV, '1');
    assert.ok(sh('readlink', ['/dev/fd']).endsWith('/fd'), '/dev/fd is a symlink');
    assert.equal(sh('stat', ['-f', '-c', '%T', '/run']), 'tmpfs');
    assert.equal(sh('readlink', ['-f', '/var/run']), '/run');
  });

  test('dm snapshot (N, 16 KiB chunks) over a read-only loop keeps the base intact', async (t) => {
    assert.ok(scratch);
    const base = join(scratch, 'smoke-base.img');
    const cow = join(scratch, 'smoke-cow.img');
    const name = 'xbh-smoke-snap';
    const loops: string[] = [];
    let dmCreated = false;
    t.after(() => {
      // Best effort, so a failed assertion above does not also leak devices.
      if (dmCreated) spawnSync('dmsetup', ['remove', name]);
      for (const l of loops.reverse()) spawnSync('losetup', ['-d', l]);
      rmSync(base, { force: true });
      rmSync(cow, { force: true });
    });

    // 64 MiB sparse base with a known 4 KiB block at every MiB.
    const baseSum = patternedImage(base, 64, 'base');

    writeFileSync(cow, '');
    truncateSync(cow, 16 * MiB);
    const baseLoop = sh('losetup', ['--find', '--show', '--read-only', '--', base]);
    loops.push(baseLoop);
    const cowLoop = sh('losetup', ['--find', '--show', '--', cow]);
    loops.push(cowLoop);
    assert.match(baseLoop, /^\/dev\/loop\d+$/);
    assert.equal(sh('blockdev', ['--getro', baseLoop]), '1', 'base loop is read-only');

    const sectors = (64 * MiB) / 512;
    sh('dmsetup', ['create', name, '--table', `0 ${sectors} snapshot ${baseLoop} ${cowLoop} N 32`]);
    dmCreated = true;
    const dev = `/dev/mapper/${name}`;
    assert.equal(sh('blockdev', ['--getsz', dev]), String(sectors));

    // Reads pass through to the base; writes land in the CoW store only.
    assert.deepEqual(pread(dev, 7 * MiB, 4096), block(7, 'base'));
    const dfd = openSync(dev, 'r+');
    const written = Buffer.concat([block(0, 'new'), block(1, 'new')]);
    writeSync(dfd, written, 0, written.length, 5 * MiB + 8192);
    fsyncSync(dfd);
    closeSync(dfd);
    spawnSync('blockdev', ['--flushbufs', dev]);
    assert.deepEqual(pread(dev, 5 * MiB + 8192, written.length), written, 'read back what was written');
    assert.deepEqual(pread(dev, 5 * MiB, 4096), block(5, 'base'), 'the rest of the chunk still comes from the base');

    const status = sh('dmsetup', ['status', name]).split(/\s+/);
    assert.equal(status[2], 'snapshot');
    const [used] = (status[3] ?? '').split('/').map(Number);
    assert.ok(used !== undefined && used >= 32, `CoW store holds the written chunk (status ${status.join(' ')})`);

    assert.equal(sha256File(base), baseSum, 'base image unchanged');

    sh('dmsetup', ['remove', name]);
    dmCreated = false;
    for (const l of loops.splice(0).reverse()) sh('losetup', ['-d', l]);
    rmSync(base);
    rmSync(cow);
    assert.match(sh('dmsetup', ['ls']), /No devices found/);
    assert.equal(sh('losetup', ['-a']), '');
  });

  test('a bundle run by a node child uses the project Runner', () => {
    const child = spawnSync(process.execPath, [process.argv[1] ?? ''], {
      encoding: 'utf8',
      env: { ...process.env, [CHILD_FLAG]: '1' },
      timeout: 60_000,
    });
    assert.equal(child.status, 0, `child failed: ${child.stderr}`);
    const out = JSON.parse(child.stdout) as { exitCode: number; stdout: string; command: string };
    assert.equal(out.exitCode, 0);
    assert.equal(out.command, 'dmsetup version');
    assert.match(out.stdout, /Driver version:\s+4\.\d+/);
  });
}
