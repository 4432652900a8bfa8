/**
 * `xen-blockhooks resize` of the drop-in `block` hook's file: disks, against real loop devices on
 * this machine: the image is extended and its loop re-read, the loop device grows, the data stays;
 * a smaller size, a read-only disk and a bad size are refused and change nothing.
 */
import t from 'tap';
import { execFileSync } from 'node:child_process';
import { statSync } from 'node:fs';
import { join } from 'node:path';
import { cliMain } from '../../src/cli/main.js';
import { harness } from '../lib/block-harness.js';
import { block, MiB, pread, pwrite } from '../lib/disk-io.js';

t.setTimeout(180_000);

const sizeOf = (dev: string) => Number(execFileSync('blockdev', ['--getsize64', dev], { encoding: 'utf8' }).trim());

t.test('file: grows online, keeps its data; smaller, read-only and bad sizes are refused', async (t) => {
  const h = await harness(t);
  const img = h.image('grow.img', 4);
  const env = { ...h.env('backend/vbd/5/51712'), XEN_BLOCKHOOKS_CONF: join(h.dir, 'no-such.conf') };
  const cli = async (...args: string[]) => {
    const out: string[] = [];
    const err: string[] = [];
    const code = await cliMain(args, env, { out: (s) => out.push(s), err: (s) => err.push(s) });
    return { code, out: out.join('\n'), err: err.join('\n') };
  };
  const be = await h.disk({ domid: 5, devid: 51712, params: img, mode: 'w', name: 'web' });
  t.equal((await h.run('add', be)).code, 0, 'add');
  const loop = (await h.read(`${be}/node`)) as string;
  pwrite(loop, 1 * MiB, block(1, 'guest'));

  const r = await cli('resize', 'web', 'xvda', '+4M');
  t.equal(r.code, 0, r.err);
  t.match(r.out, /resized web\/xvda: 4.0M → 8.0M, online/);
  t.equal(statSync(img).size, 8 * MiB, 'the image is extended');
  t.equal(sizeOf(loop), 8 * MiB, 'its loop device shows the new size');
  t.same(pread(loop, 1 * MiB, 4096), block(1, 'guest'), 'the data is unchanged');
  t.same(pread(loop, 6 * MiB, 4096), Buffer.alloc(4096), 'the new range reads zeros');

  const smaller = await cli('resize', 'web', 'xvda', '6M', '--shrink');
  t.equal(smaller.code, 1);
  t.match(smaller.err, /never shrinks a disk/);
  const noShrink = await cli('resize', 'web', 'xvda', '6M');
  t.equal(noShrink.code, 1);
  t.match(noShrink.err, /is smaller: give --shrink/);
  const bad = await cli('resize', 'web', 'xvda', 'lots');
  t.equal(bad.code, 2, 'a bad size is a usage error');
  t.equal(sizeOf(loop), 8 * MiB, 'the refusals changed nothing');
  t.equal((await h.run('remove', be)).code, 0, 'remove');

  const detached = await cli('resize', 'web', `vdev=xvda,access=w,target=${img}`, '12M');
  t.equal(detached.code, 0, detached.err);
  t.match(detached.out, /resized web's xvda \(not attached\): 8.0M → 12.0M/);
  t.equal(statSync(img).size, 12 * MiB, 'a file: image not attached is extended in place');
  const relative = await cli('resize', 'web', `vdev=xvda,access=w,target=${img}`, '+4M');
  t.equal(relative.code, 1);
  t.match(relative.err, /given its new total size \(no \+\)/);
  const badSpec = await cli('resize', 'web', 'vdev=xvda,access=q', '12M');
  t.equal(badSpec.code, 2, 'a bad disk spec is a usage error');

  const ro = h.image('ro.img', 4);
  const beRo = await h.disk({ domid: 6, devid: 51712, params: ro, mode: 'r', name: 'reader' });
  t.equal((await h.run('add', beRo)).code, 0, 'add read-only');
  const refused = await cli('resize', 'reader', 'xvda', '+4M');
  t.equal(refused.code, 1);
  t.match(refused.err, /read-only and may be shared by other domains/);
  t.equal(statSync(ro).size, 4 * MiB, 'the read-only image is untouched');
  t.equal((await h.run('remove', beRo)).code, 0, 'remove read-only');
  t.same(h.loopsOnImages(), [], 'no loop left');
});
