/**
 * Resources run out, on a real kernel (issue: faults, "resources run out"):
 * - no free loop device: every loop device node is bound and /dev/loop-control is gone (as in a
 *   container, or a dom0 without udev whose nodes ran out) → block-cow says so;
 * - no free nbd device: every /dev/nbdN is connected to a qemu-nbd → block-qcow says so;
 * - the volume group is full → block-lvsnap says so (lvcreate's own words).
 * (A full store filesystem is refused before anything is built: host test hostile-cow; a full
 * thin pool is in thin-hook.) Each refusal: exit 1, hotplug-status=error, a hotplug-error naming
 * what ran out, nothing left behind (census), the base unchanged; once the resource is back, the
 * same disk adds and removes cleanly. The hooks run in this process (fault-lib's hookInProcess):
 * none of this is about start-up, and under TCG a node start costs seconds.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import {
  existsSync,
  mkdirSync,
  readdirSync,
  readFileSync,
  renameSync,
  rmSync,
  truncateSync,
  writeFileSync,
} from 'node:fs';
import { join } from 'node:path';
import { census, hookInProcess, reportRow } from '../lib/fault-lib.js';
import { cowBackend } from '../../src/backends/cow.js';
import { lvsnapBackend } from '../../src/backends/lvsnap.js';
import { qcowBackend } from '../../src/backends/qcow.js';
import type { Backend } from '../../src/backends/types.js';
import type { DiskNodes } from '../lib/backend-nodes.js';
import {
  backendPath,
  base,
  baseSum,
  closeBackend,
  destroyNodes,
  disk,
  env,
  root,
  sha256File,
  stateDir,
  storeDir,
  writeBackendNodes,
  xenLockDir,
  xs,
} from './cow-lib.js';
import { sh } from '../lib/disk-io.js';

const dirs = { storeDir, stateDir, xenLockDir };

interface Keep {
  keepLoops?: string[];
  keepDms?: string[];
  vg?: string;
  /** Census lines that are the test's own doing (its qemu-nbd fillers). */
  own?: (line: string) => boolean;
}

async function refusedThenFine(
  backend: Backend,
  d: DiskNodes,
  re: RegExp,
  extraEnv: NodeJS.ProcessEnv,
  keep: Keep,
  restore: () => void,
): Promise<string> {
  await writeBackendNodes(xs, d);
  const be = backendPath(d);
  let refusedText = '';
  try {
    const r = await hookInProcess(backend, 'add', be, { ...env, ...extraEnv });
    refusedText = r.text;
    assert.equal(r.code, 1, `add must fail: ${r.text}`);
    assert.equal(await xs.tryRead(`${be}/hotplug-status`), 'error');
    const msg = (await xs.tryRead(`${be}/hotplug-error`)) ?? '';
    assert.match(msg, re, `hotplug-error says what ran out: ${msg}`);
    assert.doesNotMatch(msg, /failed unexpectedly|\n\s+at /, 'a sentence, not a stack');
    assert.equal(await xs.tryRead(`${be}/physical-device`), undefined, 'no physical-device');
    assert.deepEqual(
      census({ ...dirs, keepLoops: keep.keepLoops, keepDms: keep.keepDms, vg: keep.vg }).filter((l) => !keep.own?.(l)),
      [],
      'nothing left behind',
    );
    assert.equal(sha256File(base), baseSum, 'the base is unchanged');
  } finally {
    restore();
  }
  await destroyNodes(xs, d);
  await writeBackendNodes(xs, d);
  const ok = await hookInProcess(backend, 'add', be, { ...env, ...extraEnv });
  assert.equal(ok.code, 0, `with the resource back, the same disk adds: ${ok.text}`);
  await closeBackend(xs, d);
  const rm = await hookInProcess(backend, 'remove', be, { ...env, ...extraEnv });
  assert.equal(rm.code, 0, `and removes: ${rm.text}`);
  await destroyNodes(xs, d);
  assert.deepEqual(
    census({ ...dirs, keepLoops: keep.keepLoops, keepDms: keep.keepDms, vg: keep.vg }).filter((l) => !keep.own?.(l)),
    [],
    'nothing left after the good run',
  );
  return refusedText;
}

/** Loop device nodes that are not bound now. */
function freeLoopNodes(): string[] {
  return readdirSync('/dev')
    .filter((n) => /^loop\d+$/.test(n))
    .filter((n) => !existsSync(`/sys/block/${n}/loop/backing_file`))
    .map((n) => `/dev/${n}`);
}

test('no free loop device: block-cow says so, builds nothing, and works once one is free', async () => {
  assert.ok(existsSync('/dev/loop-control'), '/dev/loop-control exists in the guest');
  const filler = join(root, 'loop-filler.img');
  writeFileSync(filler, '');
  truncateSync(filler, 1024 * 1024);
  const taken: string[] = [];
  const hidden = '/dev/loop-control.xbh-hidden';
  let restored = false;
  const restore = () => {
    if (restored) return;
    restored = true;
    if (existsSync(hidden)) renameSync(hidden, '/dev/loop-control');
    for (const l of taken) spawnSync('losetup', ['-d', l]);
  };
  try {
    for (const n of freeLoopNodes()) {
      sh('losetup', ['--read-only', n, '--', filler]);
      taken.push(n);
    }
    renameSync('/dev/loop-control', hidden);
    assert.deepEqual(freeLoopNodes(), [], 'every loop node is bound');
    await refusedThenFine(cowBackend, disk(61), /loop device/i, {}, { keepLoops: taken }, restore);
  } finally {
    restore();
    rmSync(filler, { force: true });
  }
  reportRow({
    hook: 'block-cow',
    fault: 'no free loop device (all bound, no loop-control)',
    checked:
      'exit 1, hotplug-error names the loop shortage, nothing left, base unchanged; the same disk adds once a loop is free',
    result: 'pass',
  });
});

test('no free nbd device: block-qcow says so, builds nothing, and works once one is free', async () => {
  const nbds = readdirSync('/sys/block').filter((n) => /^nbd\d+$/.test(n));
  assert.ok(nbds.length > 0, 'the nbd module is loaded');
  const images = join(root, 'images');
  const qbase = join(images, 'q-base.qcow2');
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', qbase, '16M']);
  const filler = join(root, 'nbd-filler.img');
  writeFileSync(filler, '');
  truncateSync(filler, 1024 * 1024);
  const taken: string[] = [];
  const restore = () => {
    for (const n of taken.splice(0)) spawnSync('qemu-nbd', ['--disconnect', `/dev/${n}`], { stdio: 'ignore' });
  };
  const connected = (n: string) => {
    try {
      return readFileSync(`/sys/block/${n}/pid`, 'utf8').trim() !== '';
    } catch {
      return false;
    }
  };
  try {
    for (const n of nbds.filter((x) => !connected(x))) {
      sh('qemu-nbd', ['--read-only', '--format=raw', `--connect=/dev/${n}`, '--', filler]);
      taken.push(n);
    }
    // qemu-nbd --connect returns once the device is set up; the pid file appears with it.
    for (let i = 0; i < 100 && !nbds.every(connected); i++) await new Promise((r) => setTimeout(r, 100));
    assert.ok(nbds.every(connected), `every nbd device is connected (${nbds.length})`);
    const fillers = new Set(
      readdirSync('/proc')
        .filter((p) => /^\d+$/.test(p))
        .filter((p) => {
          try {
            return readFileSync(`/proc/${p}/comm`, 'utf8').trim() === 'qemu-nbd';
          } catch {
            return false;
          }
        })
        .map((p) => `qemu-nbd pid ${p}`),
    );
    const own = (l: string) => fillers.has(l) || taken.some((n) => l === `nbd ${n} connected`);
    const d = disk(62, { params: `${qbase}`, mode: 'r' });
    const before = sha256File(qbase);
    await refusedThenFine(
      qcowBackend,
      d,
      /every nbd device is in use/,
      { XEN_BLOCKHOOKS_IMAGE_DIRS: images },
      { own },
      () => {
        restore();
        for (let i = 0; i < 100 && nbds.some(connected); i++) execFileSync('sleep', ['0.1']);
      },
    );
    assert.equal(sha256File(qbase), before, 'the image is unchanged');
  } finally {
    restore();
    rmSync(filler, { force: true });
    rmSync(qbase, { force: true });
  }
  reportRow({
    hook: 'block-qcow',
    fault: `no free nbd device (all ${nbds.length} connected)`,
    checked:
      'exit 1, hotplug-error names the nbd shortage, no qemu-nbd of ours, nothing left; the same disk adds once one is free',
    result: 'pass',
  });
});

test("volume group full: block-lvsnap passes on lvcreate's reason, creates no LV, and works once there is room", async () => {
  const VG = 'xbhfullvg';
  const pvFile = join(root, 'pv-full.img');
  mkdirSync(root, { recursive: true });
  writeFileSync(pvFile, '');
  truncateSync(pvFile, 16 * 1024 * 1024);
  const pv = sh('losetup', ['--find', '--show', '--', pvFile]);
  try {
    sh('lvm', ['pvcreate', '-q', pv]);
    sh('lvm', ['vgcreate', '-q', '-s', '4M', VG, pv]);
    sh('lvm', ['lvcreate', '-q', '-y', '-n', 'golden', '-L', '4M', VG]);
    const free = Number(sh('lvm', ['vgs', '--noheadings', '-o', 'vg_free_count', VG]));
    // Fill the rest, leaving no extent for a snapshot.
    if (free > 0) sh('lvm', ['lvcreate', '-q', '-y', '-n', 'ballast', '-l', String(free), VG]);
    assert.equal(Number(sh('lvm', ['vgs', '--noheadings', '-o', 'vg_free_count', VG])), 0, 'the VG has no free extent');
    const d = disk(63, { params: `${VG}/golden 4M` });
    await refusedThenFine(
      lvsnapBackend,
      d,
      /insufficient free space|free space/i,
      {},
      { vg: VG, keepLoops: [pv], keepDms: [`${VG}-golden`, `${VG}-ballast`] },
      () => {
        sh('lvm', ['lvremove', '-q', '-y', `${VG}/ballast`]);
      },
    );
    const lvs = sh('lvm', ['lvs', '--noheadings', '-o', 'lv_name', VG])
      .split('\n')
      .map((s) => s.trim())
      .filter(Boolean);
    assert.deepEqual(lvs, ['golden'], 'only the origin is left');
  } finally {
    spawnSync('lvm', ['vgremove', '-q', '-f', VG], { stdio: 'ignore' });
    spawnSync('lvm', ['pvremove', '-q', '-f', pv], { stdio: 'ignore' });
    spawnSync('losetup', ['-d', pv]);
    rmSync(pvFile, { force: true });
  }
  reportRow({
    hook: 'block-lvsnap',
    fault: 'volume group full',
    checked:
      'exit 1, hotplug-error carries lvcreate\'s "insufficient free space", no LV created, nothing left; the same disk adds once extents are free',
    result: 'pass',
  });
});
