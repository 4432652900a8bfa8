/**
 * block-cow through the real runtime (runHook) with a recording runner that plays losetup and
 * dmsetup (and a fake sysfs): the add/remove command sequence, undo after a failure at every step
 * of an add, and the refusals that depend on what is already attached or claimed. The refusals of
 * bad params and bad base images are in cow-params.test.ts (the grammar) and hostile-cow.test.ts
 * (through the runtime: nothing run, nothing left).
 */
import t, { type Test } from 'tap';
import { mkdirSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { cowBackend } from '../../src/backends/cow.js';
import { devString } from '../../src/devices/sysfs.js';
import type { Config } from '../../src/config/config.js';
import type { RunOptions, RunResult } from '../../src/devices/runner.js';
import { runHook } from '../../src/hotplug/main.js';
import { memoryLogger } from '../../src/log/logger.js';
import { connectXenstore } from '../../src/xenstore/client.js';
import type { XenstoreClient } from '../../src/xenstore/types.js';
import { backendPath, writeBackendNodes, type DiskNodes } from '../lib/backend-nodes.js';
import { FakeDeviceRunner } from '../lib/fault-lib.js';
import { hookDir } from '../lib/hook-dir.js';

type TT = Test;

/**
 * The shared fake (test/lib/fault-lib.ts), with every device command kept as one line (temporary
 * folders shortened to …/) and `failAt` failing the n-th device command (flock is not one).
 */
class FakeDevices extends FakeDeviceRunner {
  log: string[] = [];
  failAt = -1;
  deviceCommands = 0;

  override async probe(file: string, args: readonly string[], opts?: RunOptions): Promise<RunResult> {
    if (file !== 'flock') {
      const cmd = [file, ...args].join(' ');
      this.log.push(cmd.replace(/\/tmp\/[^ ]*\//g, '…/'));
      if (this.deviceCommands++ === this.failAt) {
        this.calls.push({ file, args: [...args] });
        return {
          command: cmd,
          exitCode: 1,
          signal: undefined,
          stdout: '',
          stderr: `${file}: injected failure`,
          durationMs: 1,
          failed: true,
          timedOut: false,
        };
      }
    }
    return super.probe(file, args, opts);
  }
}

interface World {
  dir: string;
  config: Config;
  xs: XenstoreClient;
  fake: FakeDevices;
  images: string;
  base: string;
  hook(action: string, d: DiskNodes, fake?: FakeDevices): Promise<{ code: number; log: string[] }>;
  nothingLeft(t: TT, what: string, fake?: FakeDevices): void;
}

async function world(t: TT): Promise<World> {
  const h = await hookDir({ prefix: 'xbh-cow-', base: Buffer.alloc(1024 * 1024, 1) });
  t.teardown(() => h.close());
  const { dir, config, xs, images, base } = h;
  const sys = join(dir, 'sys');
  mkdirSync(sys);
  const fake = new FakeDevices(sys);
  const w: World = {
    dir,
    config,
    xs,
    fake,
    images,
    base,
    async hook(action, d, f = fake) {
      const logger = memoryLogger();
      const code = await runHook(
        cowBackend,
        [action],
        { XENBUS_PATH: backendPath(d) },
        { connect: () => connectXenstore({ path: h.sock }), run: f, config, logger, err: () => {} },
      );
      return { code, log: logger.lines.map((l) => `${l.level} ${l.msg}`) };
    },
    nothingLeft(t, what, f = fake) {
      t.same(f.loops, [], `${what}: no loops`);
      t.same(f.dms, [], `${what}: no dm devices`);
      const ls = (p: string) => {
        try {
          return readdirSync(p);
        } catch {
          return [];
        }
      };
      t.same(ls(config.storeDir), [], `${what}: no store files`);
      t.same(ls(join(config.stateDir, 'journal')), [], `${what}: no journal records`);
    },
  };
  return w;
}

function disk(domid: number, params: string, extra: Partial<DiskNodes> = {}): DiskNodes {
  return { domid, devid: 51712, params, mode: 'w', vdev: 'xvda', domainName: `g${domid}`, ...extra };
}

function statSafe(p: string): boolean {
  try {
    statSync(p);
    return true;
  } catch {
    return false;
  }
}

t.test('add then remove: the command sequence, the dm table, the shared base', async (t) => {
  const w = await world(t);
  const a = disk(1, `${w.base} 30 chunk=16K`);
  const b = disk(2, `${w.base} 8 persistent`);
  await writeBackendNodes(w.xs, a);
  await writeBackendNodes(w.xs, b);
  const ra = await w.hook('add', a);
  t.equal(ra.code, 0, ra.log.join('\n'));
  // Each dm device gets a dm uuid of its own (steps.ts addDm): random, so it is matched, then left out.
  t.match(
    w.fake.log.find((c) => c.startsWith('dmsetup create')) ?? '',
    /^dmsetup create --uuid XBH-[0-9a-f]{24} --table /,
  );
  t.same(
    w.fake.log.map((c) => c.replace(/--uuid XBH-[0-9a-f]{24} /, '')),
    [
      'losetup --list --json --output NAME,BACK-FILE,BACK-INO,BACK-MAJ:MIN,MAJ:MIN,RO,OFFSET,SIZELIMIT',
      `losetup --find --show --read-only -- ${w.base}`.replace(/\/tmp\/[^ ]*\//g, '…/'),
      `losetup --find --show -- ${join(w.config.storeDir, 'transient-1-51712.cow')}`.replace(/\/tmp\/[^ ]*\//g, '…/'),
      'dmsetup create --table 0 2048 snapshot 7:0 7:1 N 32 -- xbh-cow-g1-xvda-51712',
      'dmsetup info -c --noheadings --separator | -o name,major,minor,open,uuid -- xbh-cow-g1-xvda-51712',
    ],
  );
  t.equal(await w.xs.read(`${backendPath(a)}/physical-device`), 'fe:0');
  t.equal(await w.xs.read(`${backendPath(a)}/physical-device-path`), '/dev/mapper/xbh-cow-g1-xvda-51712');
  t.equal(await w.xs.read(`${backendPath(a)}/hotplug-status`), 'connected');
  const st = statSync(join(w.config.storeDir, 'transient-1-51712.cow'));
  t.equal(st.mode & 0o777, 0o600);
  t.equal(st.size, 30 * 1024 * 1024);
  t.equal(statSync(w.config.storeDir).mode & 0o777, 0o700);

  w.fake.log = [];
  const rb = await w.hook('add', b);
  t.equal(rb.code, 0, rb.log.join('\n'));
  t.equal(w.fake.loops.filter((l) => l.ro).length, 1, 'the second disk shares the base loop');
  t.match(w.fake.dms.find((d) => d.name === 'xbh-cow-g2-xvda-51712')?.table, /snapshot 7:0 7:2 P 128$/);
  t.notOk(
    w.fake.log.some((c) => c.includes('--read-only')),
    'no second base loop',
  );

  w.fake.log = [];
  t.equal((await w.hook('remove', a)).code, 0);
  // A transient disk's remove first asks whether the domain is being saved (lifecycle.ts); the fake has no xl.
  t.same(w.fake.log.slice(0, 2), ['xl list 1', 'dmsetup remove -- xbh-cow-g1-xvda-51712']);
  t.equal(w.fake.loops.filter((l) => l.ro).length, 1, 'the base loop stays while disk 2 uses it');
  t.notOk(statSafe(join(w.config.storeDir, 'transient-1-51712.cow')), 'transient store deleted');
  t.equal((await w.hook('remove', b)).code, 0);
  t.same(w.fake.loops, [], 'the base loop went with the last reference');
  t.same(readdirSync(w.config.storeDir), ['g2-xvda.cow'], 'the persistent store stays');
  t.equal((await w.hook('remove', b)).code, 0, 'remove twice');

  await w.xs.rm(backendPath(b));
  await writeBackendNodes(w.xs, b);
  const again = await w.hook('add', b);
  t.equal(again.code, 0, 'the persistent store is reattached');
  t.match(again.log.join('\n'), /reattaching persistent store/);
  t.equal((await w.hook('remove', b)).code, 0);
  rmSync(join(w.config.storeDir, 'g2-xvda.cow'));
  w.nothingLeft(t, 'the end');
});

t.test('mode r: a read-only linear device over the base, no store', async (t) => {
  const w = await world(t);
  const d = disk(3, `${w.base} 30`, { mode: 'r' });
  await writeBackendNodes(w.xs, d);
  t.equal((await w.hook('add', d)).code, 0);
  t.same(
    w.fake.dms.map((x) => [x.table, x.ro]),
    [['0 2048 linear 7:0 0', true]],
  );
  t.notOk(statSafe(w.config.storeDir));
  t.equal((await w.hook('remove', d)).code, 0);
  w.nothingLeft(t, 'mode r');
});

t.test('a failure at each device command of an add is undone completely', async (t) => {
  // Count the device commands of a full add first (with a second disk holding the base, so the
  // shared-base path is exercised too on odd rounds).
  const probe = await world(t);
  const d0 = disk(1, `${probe.base} 30 persistent`);
  await writeBackendNodes(probe.xs, d0);
  t.equal((await probe.hook('add', d0)).code, 0);
  const total = probe.fake.deviceCommands;
  t.ok(total >= 5, `an add runs ${total} device commands`);

  for (const shared of [false, true]) {
    let failed = 0;
    for (let n = 0; n < 20; n++) {
      const w = await world(t);
      const other = disk(9, `${w.base} 4`);
      if (shared) {
        await writeBackendNodes(w.xs, other);
        t.equal((await w.hook('add', other)).code, 0);
      }
      const d = disk(1, `${w.base} 30 persistent`);
      await writeBackendNodes(w.xs, d);
      w.fake.failAt = w.fake.deviceCommands + n;
      const r = await w.hook('add', d);
      if (r.code === 0 && w.fake.failAt >= w.fake.deviceCommands) {
        w.fake.failAt = -1;
        // n is past the last command: the add finished. Every earlier command was a failure point.
        t.ok(
          failed >= (shared ? total - 2 : total),
          `${shared ? 'shared' : 'own'} base: a failure at each of ${failed} commands was undone`,
        );
        t.equal((await w.hook('remove', d)).code, 0);
        if (shared) t.equal((await w.hook('remove', other)).code, 0);
        rmSync(join(w.config.storeDir, 'g1-xvda.cow'), { force: true });
        w.nothingLeft(t, 'after the finished add');
        break;
      }
      failed++;
      const what = `failure at command ${n}${shared ? ' (base shared)' : ''}`;
      t.equal(r.code, 1, `${what}: exit 1`);
      t.match(
        await w.xs.read(`${backendPath(d)}/hotplug-error`),
        /injected failure/,
        `${what}: the tool's words reach hotplug-error`,
      );
      t.equal(await w.xs.tryRead(`${backendPath(d)}/physical-device`), undefined);
      if (shared) {
        t.equal(w.fake.loops.length, 2, `${what}: the other disk keeps its base and store loops`);
        t.equal(w.fake.dms.length, 1);
        t.equal((await w.hook('remove', other)).code, 0);
      }
      w.nothingLeft(t, what);
    }
  }
});

t.test(
  "a migration's receiving end (NAME--incoming) is refused: the persistent store is the sender's, a transient one is not there",
  async (t) => {
    const w = await world(t);
    const sender = disk(1, `${w.base} 8 persistent`, { domainName: 'web' });
    const receiver = disk(2, `${w.base} 8 persistent`, { domainName: 'web--incoming' });
    await writeBackendNodes(w.xs, sender);
    await writeBackendNodes(w.xs, receiver);
    t.equal((await w.hook('add', sender)).code, 0);
    const before = JSON.stringify([w.fake.loops, w.fake.dms]);
    const r = await w.hook('add', receiver);
    t.equal(r.code, 1, 'the receiver is refused');
    t.equal(await w.xs.read(`${backendPath(receiver)}/hotplug-status`), 'busy');
    t.match(
      await w.xs.read(`${backendPath(receiver)}/hotplug-error`),
      /web-xvda\.cow is already in use by \/dev\/loop1 \(disk backend\/vbd\/1\/51712\)/,
      "it names the sender's store (the --incoming suffix is not part of the name)",
    );
    t.equal(JSON.stringify([w.fake.loops, w.fake.dms]), before, 'the sender keeps its devices');
    t.same(
      readdirSync(w.config.storeDir).sort(),
      ['web-xvda.cow', 'web-xvda.cow.owner'],
      "no second store; the sender's claim stays",
    );
    const transient = disk(3, `${w.base} 8`, { domainName: 'web--incoming', devid: 51728 });
    await writeBackendNodes(w.xs, transient);
    const rt = await w.hook('add', transient);
    t.equal(rt.code, 1);
    t.match(await w.xs.read(`${backendPath(transient)}/hotplug-error`), /receiving end of a live migration/);
    t.equal((await w.hook('remove', sender)).code, 0);
    t.same(readdirSync(w.config.storeDir), ['web-xvda.cow'], "the claim goes with the sender's remove");
    rmSync(join(w.config.storeDir, 'web-xvda.cow'));
    w.nothingLeft(t, 'the end');
  },
);

t.test('a persistent store held by another host (shared storage) is refused busy; nothing is built', async (t) => {
  const w = await world(t);
  mkdirSync(join(w.config.storeDir, 'web.cow.owner'), { recursive: true, mode: 0o700 });
  const other = {
    machine: 'another-machine',
    host: 'dom0-b',
    boot: 'x',
    backendPath: 'backend/vbd/9/51712',
    since: '2026-12-01T00:00:00.000Z',
  };
  writeFileSync(join(w.config.storeDir, 'web.cow.owner', 'owner.json'), JSON.stringify(other));
  const d = disk(1, `${w.base} 8 store=web.cow`);
  await writeBackendNodes(w.xs, d);
  const r = await w.hook('add', d);
  t.equal(r.code, 1);
  t.equal(await w.xs.read(`${backendPath(d)}/hotplug-status`), 'busy');
  t.match(
    await w.xs.read(`${backendPath(d)}/hotplug-error`),
    /web\.cow is held by host dom0-b \(since 2026-12-01T00:00:00\.000Z, disk backend\/vbd\/9\/51712\); a store serves one host at a time/,
  );
  t.same(w.fake.loops, [], 'no loop');
  t.same(w.fake.dms, [], 'no dm device');
  t.same(readdirSync(w.config.storeDir), ['web.cow.owner'], "no store made; the other host's claim untouched");
  t.same(JSON.parse(readFileSync(join(w.config.storeDir, 'web.cow.owner', 'owner.json'), 'utf8')), other);
});

t.test('a base attached writable elsewhere is refused busy before anything is built', async (t) => {
  const w = await world(t);
  const st = statSync(w.base, { bigint: true });
  w.fake.loops.push({
    name: '/dev/loop7',
    minor: 7,
    file: w.base,
    dev: devString(st.dev),
    ino: st.ino.toString(),
    ro: false,
  });
  const d = disk(1, `${w.base} 8`);
  await writeBackendNodes(w.xs, d);
  const r = await w.hook('add', d);
  t.equal(r.code, 1);
  t.equal(await w.xs.read(`${backendPath(d)}/hotplug-status`), 'busy');
  t.match(await w.xs.read(`${backendPath(d)}/hotplug-error`), /attached writable to \/dev\/loop7/);
  t.equal(w.fake.loops.length, 1, 'the writable loop is left alone');
  t.same(w.fake.dms, []);
  t.notOk(statSafe(w.config.storeDir));
});

t.test('a base given writable to another guest by the stock script, not yet attached, is refused busy', async (t) => {
  const w = await world(t);
  // xl's file: disk of domain 7, written but not yet hotplugged: no loop, no physical-device.
  await writeBackendNodes(w.xs, { ...disk(7, w.base), script: '/etc/xen/scripts/block', type: 'phy' });
  const d = disk(1, `${w.base} 8`);
  await writeBackendNodes(w.xs, d);
  const r = await w.hook('add', d);
  t.equal(r.code, 1);
  t.equal(await w.xs.read(`${backendPath(d)}/hotplug-status`), 'busy');
  t.equal(
    await w.xs.read(`${backendPath(d)}/hotplug-error`),
    `block-cow: the base image ${w.base} is given writable to backend/vbd/7/51712 (through ${w.base}); a base must not change under its copy-on-write disks: detach that disk or make it access=r first.`,
  );
  t.same(w.fake.loops, [], 'no loop');
  t.same(w.fake.dms, []);
  t.notOk(statSafe(w.config.storeDir));

  // block-qcow serving the file itself to domain 8 (no overlay), attached through an nbd device.
  await w.xs.rm(backendPath({ domid: 7, devid: 51712 }));
  const qcow = { ...disk(8, w.base), script: '/etc/xen/scripts/block-qcow' };
  await writeBackendNodes(w.xs, qcow);
  await w.xs.write(`${backendPath(qcow)}/physical-device`, '2b:0');
  const q = await w.hook('add', d);
  t.equal(q.code, 1);
  t.match(
    await w.xs.read(`${backendPath(d)}/hotplug-error`),
    /is given writable to backend\/vbd\/8\/51712 \(through .*\); a base must not change/,
  );
  await w.xs.rm(backendPath(qcow));
  await writeBackendNodes(w.xs, { ...disk(7, w.base), script: '/etc/xen/scripts/block' });

  // The same file given read-only, or named by another copy-on-write disk (which only reads it): no conflict.
  for (const other of [
    { ...disk(7, w.base), script: '/etc/xen/scripts/block', mode: 'r' as const },
    { ...disk(7, w.base), script: '/etc/xen/scripts/block-cow' },
    // xend writes no script node: its type is the disk's prefix.
    { ...disk(7, w.base), dialect: 'xend' as const, type: 'cow' },
  ]) {
    await w.xs.rm(backendPath(other));
    await writeBackendNodes(w.xs, other);
    const ok = await w.hook('add', d);
    t.equal(ok.code, 0, `${other.dialect ?? 'libxl'} ${other.script} type ${other.type} mode ${other.mode}: added`);
    t.equal(await w.hook('remove', d).then((x) => x.code), 0);
    await w.xs.rm(`${backendPath(d)}/hotplug-status`).catch(() => {});
    await w.xs.rm(`${backendPath(d)}/hotplug-error`).catch(() => {});
  }
  w.nothingLeft(t, 'after the adds that were allowed');
});

t.test('an add that fails at any command never takes the loop an open of the base holds', async (t) => {
  for (let n = 0; n < 20; n++) {
    const w = await world(t);
    // `xen-blockhooks open` of the base: its own read-only loop, named in its record.
    const st = statSync(w.base, { bigint: true });
    const id = { dev: devString(st.dev), ino: st.ino.toString() };
    w.fake.loops.push({ name: '/dev/loop7', minor: 7, file: w.base, ...id, ro: true });
    const journalDir = join(w.config.stateDir, 'journal');
    mkdirSync(journalDir, { recursive: true });
    const now = new Date().toISOString();
    const open = {
      version: 1,
      script: 'open',
      backendPath: 'open/image/x',
      phase: 'ready',
      pid: 1,
      created: now,
      updated: now,
      disk: { params: w.base, mode: 'r' },
      steps: [
        {
          kind: 'open-loop',
          data: { file: w.base, ...id, readOnly: true, before: [], loop: '/dev/loop7', major: 7, minor: 7 },
          done: true,
        },
      ],
    };
    writeFileSync(join(journalDir, 'open~image~x.json'), JSON.stringify(open));
    const d = disk(1, `${w.base} 30`);
    await writeBackendNodes(w.xs, d);
    w.fake.failAt = n;
    const r = await w.hook('add', d);
    const what = `failure at command ${n}`;
    t.ok(
      w.fake.loops.some((l) => l.name === '/dev/loop7'),
      `${what}: the open's loop is still there`,
    );
    if (r.code === 0) {
      t.ok(n > 3, `the add failed at each of its first ${n} commands first`);
      t.equal((await w.hook('remove', d)).code, 0);
      t.ok(
        w.fake.loops.some((l) => l.name === '/dev/loop7'),
        'and after the remove',
      );
      break;
    }
    t.same(
      w.fake.loops.map((l) => l.name),
      ['/dev/loop7'],
      `${what}: only the open's loop is left`,
    );
    t.same(readdirSync(journalDir), ['open~image~x.json'], `${what}: only the open's record is left`);
  }
});
