/**
 * The runtime through a domain's lifecycle (src/hotplug/lifecycle.ts), on this machine's real loop
 * devices: a test hook whose device is a loop over a file, xenstore served in-process, and `xl`
 * played by the runner (the hypervisor's answer to "is this domain being saved?"). Tier: host,
 * real loop devices, xl played. The same path on real xl save/restore: test/xen/80-save-restore.sh.
 */
import t, { type Test } from 'tap';
import { execFileSync, spawn } from 'node:child_process';
import {
  existsSync,
  mkdirSync,
  mkdtempSync,
  symlinkSync,
  readdirSync,
  readFileSync,
  rmSync,
  statSync,
  utimesSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseCowParams } from '../../src/backends/cow-params.js';
import { storeName } from '../../src/backends/cow.js';
import type { Backend } from '../../src/backends/types.js';
import { addStoreOwner, undoStoreOwner } from '../../src/backends/steps.js';
import { gcPlan, applyGc } from '../../src/cli/gc.js';
import { takeInventory } from '../../src/cli/inventory.js';
import { defaultConfig, type Config } from '../../src/config/config.js';
import { execRunner } from '../../src/devices/exec.js';
import type { RunOptions, RunResult, Runner } from '../../src/devices/runner.js';
import { decodeDev, fileIdOf } from '../../src/devices/sysfs.js';
import {
  deviceIsTheRecords,
  stateIsSuspended,
  xlDomainOf,
  xlParentCommand,
  xlStateOf,
} from '../../src/hotplug/lifecycle.js';
import { markerPath } from '../../src/journal/saved.js';
import { Journal, type StepRecord } from '../../src/journal/journal.js';
import { runHook } from '../../src/hotplug/main.js';
import { memoryLogger } from '../../src/log/logger.js';
import { backendPath, closeBackend, writeBackendNodes } from '../lib/backend-nodes.js';
import { startTestStore, writeDomain, type TestStore } from '../lib/block-harness.js';
import { connectXenstore } from '../../src/xenstore/client.js';

/** `xl list DOMID` as xl_info.c's list_domains prints it. */
function xlList(name: string, domid: number, state: string, cpu = 12.3): string {
  const head = 'Name                                        ID   Mem VCPUs\tState\tTime(s)';
  return `${head}\n${name.padEnd(40)} ${String(domid).padStart(5)} ${'256'.padStart(5)} ${'1'.padStart(5)}     ${state}  ${cpu.toFixed(1).padStart(8)}\n`;
}

t.test('xl list: the state letters, and which mean "being saved"', async (t) => {
  t.equal(xlStateOf(xlList('web', 7, '--pss-'), 7), '--pss-');
  t.same(xlDomainOf(xlList('web', 7, '--p---', 0), 7), { state: '--p---', cpuSeconds: 0 }, 'and the CPU time');
  t.equal(xlStateOf(xlList('a name with spaces', 12, '-b----'), 12), '-b----');
  t.equal(xlStateOf(xlList('web', 7, '--pss-'), 8), undefined, 'another domid is not this one');
  t.ok(stateIsSuspended('--pss-'), 'shut down, reason suspend');
  t.ok(stateIsSuspended('---ss-'));
  t.notOk(stateIsSuspended('---s--'), 'shut down for poweroff (reason letter -)');
  t.notOk(stateIsSuspended('---sc-'), 'crashed');
  t.notOk(stateIsSuspended('---sr-'), 'rebooting');
  t.notOk(stateIsSuspended('r-----'), 'running');
});

t.test('the xl command that ran the hook, from /proc: no process started for a destroy', async (t) => {
  const proc = mkdtempSync(join(tmpdir(), 'xbh-proc-'));
  t.teardown(() => rmSync(proc, { recursive: true, force: true }));
  const parent = (pid: number, argv: string[]) => {
    mkdirSync(join(proc, String(pid)));
    writeFileSync(join(proc, String(pid), 'cmdline'), `${argv.join('\0')}\0`);
  };
  parent(10, ['/usr/lib/xen-4.17/bin/xl', 'save', 'web', '/var/lib/xen/save/web']);
  parent(11, ['xl', '-v', 'destroy', 'web']);
  parent(12, ['/usr/sbin/libvirtd', '--daemon']);
  t.equal(xlParentCommand(proc, 10), 'save');
  t.equal(xlParentCommand(proc, 11), 'destroy', 'options before the subcommand are skipped');
  t.equal(xlParentCommand(proc, 12), undefined, 'another toolstack: unknown, so xl is asked');
  t.equal(xlParentCommand(proc, 13), undefined, 'no such process');
});

t.test('a persistent store named after its domain is refused for a dom0 attach (pygrub), not when named', async (t) => {
  const dom0 = { domainName: 'Domain-0', frontendId: 0, vdev: 'xvda' };
  t.throws(
    () => storeName(parseCowParams('/srv/xen/a.img 30 persistent'), dom0, 'backend/vbd/0/51712'),
    /attached to dom0.*store=NAME/,
  );
  t.equal(storeName(parseCowParams('/srv/xen/a.img 30 store=web1.cow'), dom0, 'backend/vbd/0/51712'), 'web1.cow');
  t.equal(
    storeName(parseCowParams('/srv/xen/a.img 30'), dom0, 'backend/vbd/0/51712'),
    'transient-0-51712.cow',
    "a transient store is the bootloader's own, as the guest's is",
  );
  t.equal(
    storeName(
      parseCowParams('/srv/xen/a.img 30 persistent'),
      { domainName: 'web1', frontendId: 4, vdev: 'xvda' },
      'backend/vbd/4/51712',
    ),
    'web1-xvda.cow',
  );
});

interface World {
  dir: string;
  file: string;
  config: Config;
  store: TestStore;
  xl: Map<number, string>;
  /** CPU seconds xl reports per domain (default 12.3). */
  xlCpu: Map<number, number>;
  xlCalls: string[];
  hook(
    action: 'add' | 'remove',
    domid: number,
    devid?: number,
    parentPid?: number,
  ): Promise<{ code: number; log: string[] }>;
  loopsOnFile(): string[];
}

/**
 * A hook whose device is a loop over the world's file; `transient` unless the params say
 * persistent; with `claim` it claims the file for this host first, as a persistent store is.
 */
function loopHook(file: string): Backend<{ transient: boolean; claim: boolean }> {
  return {
    script: 'block-test',
    summary: 'a loop over a file, for lifecycle tests',
    usage: '',
    plan: (disk) => ({ transient: !disk.params.includes('persistent'), claim: disk.params.includes('claim') }),
    transient: (p) => (p.transient ? `transient test store ${file}` : undefined),
    async add(ctx, plan) {
      if (plan.claim)
        await addStoreOwner(
          { build: ctx.build, run: ctx.run, config: ctx.config, log: ctx.log, journal: ctx.journal },
          'block-test',
          file,
        );
      const dev = await ctx.build.step(
        'block-loop',
        { file, ...fileIdOf(file), readOnly: false, before: [] },
        async () => execFileSync('losetup', ['--find', '--show', '--', file], { encoding: 'utf8' }).trim(),
        (d) => ({ device: d }),
      );
      const { major, minor } = decodeDev(statSync(dev).rdev);
      return { path: dev, major, minor };
    },
    undo: {
      'block-loop': async (step) => {
        if (step.data.device !== undefined) execFileSync('losetup', ['-d', step.data.device]);
      },
      'store-owner': undoStoreOwner,
    },
  };
}

/** `inStore`: the loop's file lives in store_dir, where gc looks for persistent stores' claims. */
async function world(t: Test, inStore = false): Promise<World> {
  const dir = mkdtempSync(join(tmpdir(), 'xbh-life-'));
  if (inStore) mkdirSync(join(dir, 'store'), { mode: 0o700 });
  const file = join(dir, ...(inStore ? ['store'] : []), 'disk.img');
  writeFileSync(file, Buffer.alloc(1024 * 1024));
  const config: Config = {
    ...defaultConfig(),
    storeDir: join(dir, 'store'),
    stateDir: join(dir, 'state'),
    imageDirs: [dir],
    xenLockDir: join(dir, 'xl'),
    logFile: '',
  };
  const store = await startTestStore('xbh-life-xs-');
  const w: World = {
    dir,
    file,
    config,
    store,
    xl: new Map(),
    xlCpu: new Map(),
    xlCalls: [],
    async hook(action, domid, devid = 51712, parentPid) {
      const logger = memoryLogger();
      // The runtime closes the client it is given: each run gets its own, as a hook process would.
      const code = await runHook(
        loopHook(file),
        [action],
        { XENBUS_PATH: backendPath({ domid, devid }) },
        {
          connect: () => connectXenstore({ path: store.socketPath }),
          run: runOf(w),
          config,
          logger,
          err: () => {},
          ...(parentPid !== undefined ? { parentPid } : {}),
        },
      );
      return { code, log: logger.lines.map((l) => `${l.level} ${l.msg}`) };
    },
    loopsOnFile() {
      return execFileSync('losetup', ['-j', file], { encoding: 'utf8' })
        .split('\n')
        .filter(Boolean)
        .map((l) => l.split(':')[0] as string);
    },
  };
  t.teardown(async () => {
    for (const l of w.loopsOnFile()) execFileSync('losetup', ['-d', l]);
    await store.close();
    rmSync(dir, { recursive: true, force: true });
  });
  return w;
}

/** The real runner, with `xl list DOMID` answered from w.xl (the hypervisor's view of each domain). */
function runOf(w: World): Runner {
  const real = execRunner(process.env);
  return {
    async probe(f: string, args: readonly string[], o?: RunOptions): Promise<RunResult> {
      if (f !== 'xl') return real.probe(f, args, o);
      const cmd = `xl ${args.join(' ')}`;
      w.xlCalls.push(cmd);
      const id = Number(args[1]);
      const st = w.xl.get(id);
      const ok = st !== undefined;
      return {
        command: cmd,
        exitCode: ok ? 0 : 1,
        signal: undefined,
        stdout: ok ? xlList(`dom${id}`, id, st, w.xlCpu.get(id)) : '',
        stderr: ok ? '' : `Invalid domain identifier: ${id}`,
        durationMs: 1,
        failed: !ok,
        timedOut: false,
      };
    },
    run: (f, args, o) => real.run(f, args, o),
  };
}

const U1 = '4a3c1e5f-0b7d-4c2e-9f10-aabbccddeeff';

/** libxl's part around one domain: its home (name, vm) and one disk's backend nodes. */
async function domain(w: World, domid: number, name: string, uuid: string, params = 'disk.img'): Promise<string> {
  await writeDomain(w.store.xs, { domid, name, uuid });
  return writeBackendNodes(w.store.xs, {
    domid,
    devid: 51712,
    params,
    script: '/etc/xen/scripts/block-test',
    domainName: name,
  });
}

/** libxl's part after a remove: the backend and the domain's home go. */
async function destroyNodes(w: World, domid: number): Promise<void> {
  await w.store.xs.rm(`backend/vbd/${domid}`);
  await w.store.xs.rm(`/local/domain/${domid}`);
}

function journalKeys(w: World): string[] {
  try {
    return readdirSync(join(w.config.stateDir, 'journal'))
      .filter((n) => n.endsWith('.json'))
      .sort();
  } catch {
    return [];
  }
}

t.test('save, restore, a failed restore and a destroy: the same device all along, then nothing', async (t) => {
  const w = await world(t);
  await domain(w, 5, 'web', U1);
  t.equal((await w.hook('add', 5)).code, 0, 'add for domain 5');
  const pd = await w.store.xs.read('backend/vbd/5/51712/physical-device');
  const loop = w.loopsOnFile();
  t.equal(loop.length, 1, 'one loop');

  // xl save: the domain is shut down for a suspend when its remove runs.
  w.xl.set(5, '--pss-');
  await closeBackend(w.store.xs, { domid: 5, devid: 51712 });
  const saved = await w.hook('remove', 5);
  t.equal(saved.code, 0, "the save's remove exits 0");
  t.same(w.loopsOnFile(), loop, 'the device stays for the restore');
  const marker = markerPath(w.config, U1, '51712');
  t.ok(existsSync(marker), `marker ${marker}`);
  t.same(journalKeys(w), [`held~${U1}~51712.json`], "the record is held under the domain's uuid, not the backend path");
  t.match(saved.log.join('\n'), /domain 5 \(web\) is being saved; keeping/);
  await destroyNodes(w, 5);
  w.xl.delete(5);

  // xl restore: a new domid, the same uuid and name.
  await domain(w, 6, 'web', U1);
  const restored = await w.hook('add', 6);
  t.equal(restored.code, 0, "the restore's add exits 0");
  t.equal(await w.store.xs.read('backend/vbd/6/51712/physical-device'), pd, 'the same device as before the save');
  t.same(w.loopsOnFile(), loop, 'no new loop');
  t.notOk(existsSync(marker), 'the marker is used up');
  t.same(journalKeys(w), ['backend~vbd~6~51712.json'], 'the record moved to the new backend path');

  // The restore fails after its disks were added (its guest never connected: no `sectors`).
  await closeBackend(w.store.xs, { domid: 6, devid: 51712 });
  const failed = await w.hook('remove', 6);
  t.equal(failed.code, 0);
  t.same(w.loopsOnFile(), loop, 'a failed restore does not undo what the saved guest needs');
  t.ok(existsSync(marker), 'the marker is back for the next attempt');
  t.match(failed.log.join('\n'), /ended before its guest ran/);
  await destroyNodes(w, 6);

  // The next restore works, the guest connects (blkback writes sectors), and a destroy undoes it all.
  await domain(w, 7, 'web', U1);
  t.equal((await w.hook('add', 7)).code, 0);
  t.equal(await w.store.xs.read('backend/vbd/7/51712/physical-device'), pd, 'still the same device');
  await w.store.xs.write('backend/vbd/7/51712/sectors', '2048');
  w.xl.set(7, '--p---');
  await closeBackend(w.store.xs, { domid: 7, devid: 51712 });
  t.equal((await w.hook('remove', 7)).code, 0, 'destroy');
  t.same(w.loopsOnFile(), [], 'the loop is gone');
  t.same(journalKeys(w), [], 'no record');
  t.notOk(existsSync(marker), 'no marker');
  t.same(w.xlCalls, ['xl list 5', 'xl list 6', 'xl list 7'], 'xl asked once per remove that could hold');
});

t.test(
  "runHook's parentPid (what the service passes: its wrapper's parent): xl destroy is not asked, xl save is",
  async (t) => {
    const w = await world(t);
    // Two living processes whose command lines read "xl destroy" and "xl save" (node running a
    // script of that name, started as xl), the parents a service is told its wrappers had.
    const fake = (sub: string) => {
      writeFileSync(join(w.dir, sub), 'setTimeout(() => {}, 60_000);\n');
      const p = spawn(process.execPath, [sub], { cwd: w.dir, argv0: 'xl', stdio: 'ignore' });
      t.teardown(() => p.kill());
      return p.pid as number;
    };
    const destroy = fake('destroy');
    const save = fake('save');
    await new Promise((r) => setTimeout(r, 200));
    t.equal(xlParentCommand('/proc', destroy), 'destroy');
    t.equal(xlParentCommand('/proc', save), 'save');

    // Suspended as for a save, but the remove comes from xl destroy: undone, xl not asked.
    await domain(w, 8, 'web', U1);
    t.equal((await w.hook('add', 8)).code, 0);
    w.xl.set(8, '--pss-');
    await closeBackend(w.store.xs, { domid: 8, devid: 51712 });
    t.equal((await w.hook('remove', 8, 51712, destroy)).code, 0);
    t.same(w.loopsOnFile(), [], 'undone');
    t.same(w.xlCalls, [], 'xl destroy ran it: xl was not asked');
    await destroyNodes(w, 8);
    w.xl.delete(8);

    // From xl save: xl is asked, and the device is held for the restore.
    await domain(w, 9, 'web', U1);
    t.equal((await w.hook('add', 9)).code, 0);
    w.xl.set(9, '--pss-');
    await closeBackend(w.store.xs, { domid: 9, devid: 51712 });
    const saved = await w.hook('remove', 9, 51712, save);
    t.equal(saved.code, 0);
    t.same(w.xlCalls, ['xl list 9'], 'xl save ran it: xl was asked');
    t.equal(w.loopsOnFile().length, 1, 'held for the restore');
    t.match(saved.log.join('\n'), /is being saved; keeping/);
  },
);

async function holdOne(t: Test, w: World, domid: number, uuid: string): Promise<void> {
  await domain(w, domid, 'db', uuid);
  t.equal((await w.hook('add', domid)).code, 0, `add ${domid}`);
  w.xl.set(domid, '--pss-');
  await closeBackend(w.store.xs, { domid, devid: 51712 });
  t.equal((await w.hook('remove', domid)).code, 0, `save ${domid}`);
  await destroyNodes(w, domid);
  w.xl.delete(domid);
}

t.test('a restore after dom0 restarted is refused, builds nothing, and keeps refusing', async (t) => {
  const w = await world(t);
  const uuid = '11111111-2222-4333-8444-555555555555';
  await holdOne(t, w, 8, uuid);
  // The restart: the devices and /run go; the marker (in store_dir) stays, from another boot.
  for (const l of w.loopsOnFile()) execFileSync('losetup', ['-d', l]);
  rmSync(w.config.stateDir, { recursive: true, force: true });
  const m = markerPath(w.config, uuid, '51712');
  writeFileSync(m, readFileSync(m, 'utf8').replace(/"bootId": "[^"]*"/, '"bootId": "an-earlier-boot"'));
  for (const attempt of [1, 2]) {
    await domain(w, 9, 'db', uuid);
    const r = await w.hook('add', 9);
    t.equal(r.code, 1, `restore attempt ${attempt} is refused`);
    const err = await w.store.xs.read('backend/vbd/9/51712/hotplug-error');
    t.match(
      err,
      /the saved domain db's transient test store .* did not survive: dom0 has restarted since.*nothing was built.*persistent.*delete .*\.json first/,
    );
    t.same(w.loopsOnFile(), [], 'no device built');
    t.same(journalKeys(w), [], 'no record');
    t.ok(existsSync(m), 'the marker stays');
    await destroyNodes(w, 9);
  }
  // As the message says: the marker deleted, the same uuid starts afresh.
  rmSync(m);
  await domain(w, 10, 'db', uuid);
  t.equal((await w.hook('add', 10)).code, 0, 'a fresh start once the marker is deleted');
  w.xl.set(10, '-b----');
  t.equal((await w.hook('remove', 10)).code, 0);
  t.same(w.loopsOnFile(), []);
});

t.test('a restore with another disk spec is refused and leaves the held device alone', async (t) => {
  const w = await world(t);
  const uuid = '22222222-2222-4333-8444-555555555555';
  await holdOne(t, w, 11, uuid);
  const held = w.loopsOnFile();
  await domain(w, 12, 'db', uuid, 'other.img');
  t.equal((await w.hook('add', 12)).code, 1);
  t.match(
    await w.store.xs.read('backend/vbd/12/51712/hotplug-error'),
    /was saved on .* as "block-test disk.img" \(mode w\), and this restore asks for "block-test other.img"/,
  );
  t.same(w.loopsOnFile(), held, 'the held device is untouched');
  // Giving a saved domain up: delete its marker, then gc undoes the held record.
  rmSync(markerPath(w.config, uuid, '51712'));
  const inv = await takeInventory({ config: w.config, run: execRunner(process.env), xs: w.store.xs });
  const plan = gcPlan(inv, { withoutXenstore: false }).filter((i) => i.row.kind === 'record');
  t.equal(plan.length, 1, 'gc plans the held record once its marker is gone');
  const results = await applyGc(plan, {
    config: w.config,
    run: execRunner(process.env),
    log: memoryLogger(),
    xs: w.store.xs,
    hooks: () => loopHook(w.file),
  });
  t.ok(
    results.every((r) => r.ok),
    'gc undid it',
  );
  t.same(w.loopsOnFile(), []);
});

t.test('status shows a held disk as held, and gc leaves it', async (t) => {
  const w = await world(t);
  const uuid = '33333333-2222-4333-8444-555555555555';
  await holdOne(t, w, 13, uuid);
  const inv = await takeInventory({ config: w.config, run: execRunner(process.env), xs: w.store.xs });
  const row = inv.rows.find((r) => r.kind === 'record');
  t.equal(row?.state, 'held');
  t.match(row?.why ?? '', /kept for saved domain db .* its restore reattaches it/);
  t.same(
    gcPlan(inv, { withoutXenstore: false }).filter((i) => i.row.kind === 'record'),
    [],
    'gc does not collect it',
  );
});

t.test("a migration's receiving end is refused a transient disk; a persistent one is built", async (t) => {
  const w = await world(t);
  await domain(w, 14, 'web--incoming', U1);
  const r = await w.hook('add', 14);
  t.equal(r.code, 1, 'refused');
  t.match(
    await w.store.xs.read('backend/vbd/14/51712/hotplug-error'),
    /web--incoming is the receiving end of a live migration.*transient test store lives only in the sending domain's devices.*the sending domain resumes/,
  );
  t.same(w.loopsOnFile(), [], 'nothing built');
  t.same(journalKeys(w), []);
  await destroyNodes(w, 14);
  await domain(w, 15, 'web--incoming', U1, 'disk.img persistent');
  t.equal((await w.hook('add', 15)).code, 0, 'a disk whose writes outlive its devices goes with the domain');
  t.equal((await w.hook('remove', 15)).code, 0);
  t.same(w.xlCalls, [], 'nothing to hold, so xl is not asked');
});

t.test('the sender of a completed migration and a dom0 attach are undone, never held', async (t) => {
  const w = await world(t);
  await domain(w, 16, 'web', U1);
  t.equal((await w.hook('add', 16)).code, 0);
  await w.store.xs.write('/local/domain/16/name', 'web--migratedaway');
  w.xl.set(16, '--pss-');
  await closeBackend(w.store.xs, { domid: 16, devid: 51712 });
  t.equal((await w.hook('remove', 16)).code, 0);
  t.same(w.loopsOnFile(), [], "the sender's devices go");
  t.notOk(existsSync(markerPath(w.config, U1, '51712')), 'no marker');

  await writeBackendNodes(w.store.xs, {
    domid: 0,
    devid: 51712,
    params: 'disk.img',
    script: '/etc/xen/scripts/block-test',
    domainName: 'Domain-0',
  });
  t.equal((await w.hook('add', 0)).code, 0, 'bootloader attach');
  w.xl.set(0, '--pss-');
  t.equal((await w.hook('remove', 0)).code, 0);
  t.same(w.loopsOnFile(), [], 'a dom0 attach is undone');
  t.same(w.xlCalls, [], 'neither asks xl: a migrated-away sender is known by its name, dom0 is never saved');
});

t.test("gc finds a transient store file nothing uses (a crash's leftover), and only that", async (t) => {
  const w = await world(t);
  mkdirSync(join(w.config.storeDir, 'qcow'), { recursive: true });
  const old = Date.now() / 1000 - 3600;
  const files = {
    leftover: join(w.config.storeDir, 'transient-3-51712.cow'),
    young: join(w.config.storeDir, 'transient-4-51712.cow'),
    persistent: join(w.config.storeDir, 'web1-xvda.cow'),
    overlay: join(w.config.storeDir, 'qcow', 'transient-5-51712-0a1b2c3d.qcow2'),
    attached: join(w.config.storeDir, 'transient-6-51712.cow'),
  };
  for (const f of Object.values(files)) writeFileSync(f, Buffer.alloc(4096));
  for (const k of ['leftover', 'persistent', 'overlay', 'attached'] as const) utimesSync(files[k], old, old);
  const l = execFileSync('losetup', ['--find', '--show', '--', files.attached], { encoding: 'utf8' }).trim();
  t.teardown(() => execFileSync('losetup', ['-d', l]));
  const inv = await takeInventory({ config: w.config, run: execRunner(process.env), xs: w.store.xs });
  const stores = inv.rows
    .filter((r) => r.kind === 'store')
    .map((r) => r.store)
    .sort();
  t.same(stores, [files.leftover, files.overlay].sort(), 'old, unnamed by any record, unattached, transient by name');
  const plan = gcPlan(inv, { withoutXenstore: false }).filter((i) => i.row.kind === 'store');
  t.match(plan.map((p) => p.action).join('\n'), /rm .*transient-3-51712\.cow: transient store file/);
  const results = await applyGc(plan, {
    config: w.config,
    run: execRunner(process.env),
    log: memoryLogger(),
    xs: w.store.xs,
  });
  t.ok(results.every((r) => r.ok));
  t.notOk(existsSync(files.leftover), 'leftover deleted');
  t.notOk(existsSync(files.overlay), 'leftover overlay deleted');
  for (const k of ['young', 'persistent', 'attached'] as const) t.ok(existsSync(files[k]), `${k} kept`);
});

t.test('a restored domain that ran and never connected (no PV drivers) is destroyed, not held', async (t) => {
  const w = await world(t);
  const uuid = '44444444-2222-4333-8444-555555555555';
  await holdOne(t, w, 20, uuid);
  await domain(w, 21, 'db', uuid);
  t.equal((await w.hook('add', 21)).code, 0, 'restored');
  w.xl.set(21, '-b----');
  // The emulated disk served it; blkback never saw a PV frontend, so there is no `sectors`.
  w.xlCpu.set(21, 41.7);
  await closeBackend(w.store.xs, { domid: 21, devid: 51712 });
  t.equal((await w.hook('remove', 21)).code, 0);
  t.same(w.loopsOnFile(), [], 'undone: the guest ran, so this is a destroy');
  t.notOk(existsSync(markerPath(w.config, uuid, '51712')), 'no marker');
});

t.test('a held device replaced by another at the same number is not adopted', async (t) => {
  const w = await world(t);
  const uuid = '55555555-2222-4333-8444-555555555555';
  await holdOne(t, w, 22, uuid);
  const [loop] = w.loopsOnFile();
  const other = join(w.dir, 'other.img');
  writeFileSync(other, Buffer.alloc(1024 * 1024));
  execFileSync('losetup', ['-d', loop as string]);
  execFileSync('losetup', ['--', loop as string, other]);
  t.teardown(() => {
    try {
      execFileSync('losetup', ['-d', loop as string]);
    } catch {
      // already gone
    }
  });
  await domain(w, 23, 'db', uuid);
  t.equal((await w.hook('add', 23)).code, 1, 'refused');
  t.match(await w.store.xs.read('backend/vbd/23/51712/hotplug-error'), /did not survive: its device .* is gone/);
  t.equal(
    execFileSync('losetup', ['-n', '-O', 'BACK-FILE', loop as string], { encoding: 'utf8' }).trim(),
    other,
    "the other file's loop is untouched",
  );
});

t.test("a saved disk's marker from another host is refused, naming that host", async (t) => {
  const w = await world(t);
  const uuid = '66666666-2222-4333-8444-555555555555';
  await holdOne(t, w, 24, uuid);
  const m = markerPath(w.config, uuid, '51712');
  writeFileSync(m, readFileSync(m, 'utf8').replace(/"host": "[^"]*"/, '"host": "dom0-elsewhere"'));
  await domain(w, 25, 'db', uuid);
  t.equal((await w.hook('add', 25)).code, 1);
  t.match(
    await w.store.xs.read('backend/vbd/25/51712/hotplug-error'),
    /is held by host dom0-elsewhere, which saved it/,
  );
  t.equal(w.loopsOnFile().length, 1, 'the held device stays');
});

t.test('a second save of a disk whose earlier hold was given up (marker deleted) replaces it', async (t) => {
  const w = await world(t);
  const uuid = '77777777-2222-4333-8444-555555555555';
  await holdOne(t, w, 26, uuid);
  const [first] = w.loopsOnFile();
  rmSync(markerPath(w.config, uuid, '51712'));
  await holdOne(t, w, 27, uuid);
  const now = w.loopsOnFile();
  t.equal(now.length, 1, 'one device held: the given-up one was taken down');
  t.ok(existsSync(markerPath(w.config, uuid, '51712')), 'the new save has its marker');
  t.ok(first !== undefined);
});

t.test('gc deletes, without undoing, a record copy a crash left while the record moved', async (t) => {
  const w = await world(t);
  const uuid = '88888888-2222-4333-8444-555555555555';
  await holdOne(t, w, 28, uuid);
  const journal = join(w.config.stateDir, 'journal');
  const held = JSON.parse(readFileSync(join(journal, `held~${uuid}~51712.json`), 'utf8'));
  // The copy a crash inside the move leaves: the same record, still under its backend path.
  writeFileSync(
    join(journal, 'backend~vbd~28~51712.json'),
    JSON.stringify({ ...held, backendPath: 'backend/vbd/28/51712', phase: 'ready', held: undefined }),
  );
  const inv = await takeInventory({ config: w.config, run: execRunner(process.env), xs: w.store.xs });
  const plan = gcPlan(inv, { withoutXenstore: false }).filter((i) => i.row.kind === 'record');
  t.equal(plan.length, 1, 'the copy is an orphan');
  const results = await applyGc(plan, {
    config: w.config,
    run: execRunner(process.env),
    log: memoryLogger(),
    xs: w.store.xs,
    hooks: () => loopHook(w.file),
  });
  t.ok(results.every((r) => r.ok));
  t.equal(w.loopsOnFile().length, 1, 'the held device is untouched');
  t.same(journalKeys(w), [`held~${uuid}~51712.json`], 'only the copy went');
});

t.test(
  "the held device is the record's: by dm name, by its /dev/mapper path (an LV), by a loop's file, by the node",
  async (t) => {
    const sys = mkdtempSync(join(tmpdir(), 'xbh-sys-'));
    t.teardown(() => rmSync(sys, { recursive: true, force: true }));
    const dev = (mm: string, kname: string, files: Record<string, string>) => {
      const target = join(sys, 'devices', kname);
      for (const [f, v] of Object.entries(files)) {
        mkdirSync(join(target, f, '..'), { recursive: true });
        writeFileSync(join(target, f), `${v}\n`);
      }
      mkdirSync(join(target), { recursive: true });
      mkdirSync(join(sys, 'dev', 'block'), { recursive: true });
      symlinkSync(target, join(sys, 'dev', 'block', mm));
    };
    dev('254:3', 'dm-3', { 'dm/name': 'xbhvg-xbh--web--xvda' });
    dev('254:4', 'dm-4', { 'dm/name': 'xbh-cow-web-xvda-51712' });
    dev('7:2', 'loop2', { 'loop/backing_file': '/var/lib/xen-blockhooks/transient-5-51712.cow' });
    dev('43:0', 'nbd0', {});
    const rec = (device: { path: string; major: number; minor: number }, step: StepRecord) => ({
      ...Journal.begin('block-x', 'held/u/51712', {
        params: 'p',
        mode: 'w' as const,
        frontendId: 5,
        vdev: 'xvda',
        domainName: 'web',
      }),
      device,
      steps: [step],
    });
    const dmStep = (name: string): StepRecord => ({
      kind: 'dm',
      data: { name, table: '0 8192 snapshot 7:1 7:2 N 8', readOnly: false },
      done: true,
    });
    const storeStep = (path: string): StepRecord => ({
      kind: 'store-file',
      data: { path, persistent: false },
      done: true,
    });
    const nbdStep: StepRecord = {
      kind: 'nbd',
      data: { pidFile: '/run/xen-blockhooks/qcow/web.pid', image: '/srv/web.qcow2', format: 'qcow2', readOnly: false },
      done: true,
    };
    t.ok(
      deviceIsTheRecords(
        rec(
          { path: '/dev/mapper/xbhvg-xbh--web--xvda', major: 254, minor: 3 },
          {
            kind: 'lv-snapshot',
            data: { vg: 'xbhvg', lv: 'xbh-web-xvda', origin: 'golden', persistent: false, existed: false, thin: true },
            done: true,
          },
        ),
        sys,
      ),
      'an LV, by its /dev/mapper path',
    );
    t.ok(
      deviceIsTheRecords(rec({ path: '/dev/dm-4', major: 254, minor: 4 }, dmStep('xbh-cow-web-xvda-51712')), sys),
      'a dm device, by its name',
    );
    t.notOk(
      deviceIsTheRecords(rec({ path: '/dev/dm-4', major: 254, minor: 4 }, dmStep('xbh-cow-other-xvda-51712')), sys),
      'another dm device at the same number',
    );
    t.ok(
      deviceIsTheRecords(
        rec({ path: '/dev/loop2', major: 7, minor: 2 }, storeStep('/var/lib/xen-blockhooks/transient-5-51712.cow')),
        sys,
      ),
      'a loop, by its file',
    );
    t.notOk(
      deviceIsTheRecords(
        rec({ path: '/dev/loop2', major: 7, minor: 2 }, storeStep('/var/lib/xen-blockhooks/other.cow')),
        sys,
      ),
      'a loop on another file',
    );
    t.ok(deviceIsTheRecords(rec({ path: '/dev/nbd0', major: 43, minor: 0 }, nbdStep), sys), 'an nbd, by its node');
    t.notOk(
      deviceIsTheRecords(rec({ path: '/dev/nbd0', major: 43, minor: 16 }, nbdStep), sys),
      'a number that is not there',
    );
  },
);

t.test(
  'a save whose devices cannot be held marks the disk lost: its restore is refused, never given a fresh disk',
  async (t) => {
    const w = await world(t);
    const uuid = '99999999-2222-4333-8444-555555555555';
    await holdOne(t, w, 30, uuid);
    // That hold given up (marker deleted), and its undo made to fail: the next save cannot take its place.
    rmSync(markerPath(w.config, uuid, '51712'));
    const heldFile = join(w.config.stateDir, 'journal', `held~${uuid}~51712.json`);
    const [stuckLoop] = w.loopsOnFile();
    const rec = JSON.parse(readFileSync(heldFile, 'utf8'));
    rec.steps[0].data.device = '/dev/no-such-loop';
    writeFileSync(heldFile, JSON.stringify(rec));
    t.teardown(() => {
      try {
        execFileSync('losetup', ['-d', stuckLoop as string]);
      } catch {
        // gone
      }
    });
    await domain(w, 31, 'db', uuid);
    t.equal((await w.hook('add', 31)).code, 0, 'a fresh disk (the hold was given up)');
    w.xl.set(31, '--pss-');
    await closeBackend(w.store.xs, { domid: 31, devid: 51712 });
    const saved = await w.hook('remove', 31);
    t.equal(saved.code, 0, "the save's remove still exits 0");
    t.match(saved.log.join('\n'), /could not be kept [^]*its restore will be refused, taking them down/);
    const m = JSON.parse(readFileSync(markerPath(w.config, uuid, '51712'), 'utf8'));
    t.equal(m.held, '', 'a marker that names no held record');
    t.same(
      w.loopsOnFile(),
      [stuckLoop],
      "the unheld disk's devices are taken down (only the stuck one of the given-up hold is left)",
    );
    await destroyNodes(w, 31);
    w.xl.delete(31);
    await domain(w, 32, 'db', uuid);
    t.equal((await w.hook('add', 32)).code, 1, 'the restore is refused');
    t.match(
      await w.store.xs.read('backend/vbd/32/51712/hotplug-error'),
      /did not survive: they could not be kept at the save/,
    );
    const inv = await takeInventory({ config: w.config, run: execRunner(process.env), xs: w.store.xs });
    t.ok(
      inv.rows.some((r) => r.kind === 'saved' && r.state === 'lost'),
      'status shows it lost',
    );
  },
);

t.test(
  'a persistent disk through a save: its devices go, its claim stays for the restore, no other disk takes the store meanwhile',
  async (t) => {
    const w = await world(t);
    const uuid = '77777777-2222-4333-8444-555555555555';
    const owner = join(`${w.file}.owner`, 'owner.json');
    const params = 'disk.img persistent claim';
    await domain(w, 40, 'db', uuid, params);
    t.equal((await w.hook('add', 40)).code, 0, 'add');
    t.match(JSON.parse(readFileSync(owner, 'utf8')), { backendPath: 'backend/vbd/40/51712' }, 'claimed for the disk');

    // xl save
    w.xl.set(40, '--pss-');
    await closeBackend(w.store.xs, { domid: 40, devid: 51712 });
    const saved = await w.hook('remove', 40);
    t.equal(saved.code, 0, "the save's remove exits 0");
    t.same(w.loopsOnFile(), [], 'the devices go: the data is in the store');
    t.same(journalKeys(w), [], 'no record is held');
    t.ok(existsSync(owner), 'the claim stays');
    const marker = markerPath(w.config, uuid, '51712');
    t.match(
      JSON.parse(readFileSync(marker, 'utf8')),
      { held: '', claims: [w.file], from: 'backend/vbd/40/51712' },
      'a marker names the kept claim',
    );
    t.match(saved.log.join('\n'), /being saved; keeping this host's claim on .*disk\.img for the restore/);
    await destroyNodes(w, 40);
    w.xl.delete(40);

    // status and gc: held for the saved domain, not a stale claim.
    const inv = await takeInventory({ config: w.config, run: execRunner(process.env), xs: w.store.xs });
    t.match(
      inv.rows.find((r) => r.kind === 'saved'),
      { state: 'held', why: /claim on .*disk\.img is kept for saved domain db/ },
    );
    t.same(gcPlan(inv, { withoutXenstore: false }), [], 'gc has nothing to collect');

    // Another domain (another uuid) asking for the store meanwhile is refused, nothing built.
    await domain(w, 41, 'other', '88888888-2222-4333-8444-555555555555', params);
    t.equal((await w.hook('add', 41)).code, 1);
    t.match(
      await w.store.xs.read('backend/vbd/41/51712/hotplug-error'),
      /the persistent store .*disk\.img belongs to the saved domain db .* Restore that domain \(xl restore\), or give it up by deleting .*\.json/,
    );
    t.equal(await w.store.xs.read('backend/vbd/41/51712/hotplug-status'), 'busy');
    t.same(w.loopsOnFile(), []);
    t.ok(existsSync(owner), 'the claim is untouched');
    await destroyNodes(w, 41);

    // xl restore: the claim passes to the restored disk, the marker is used up.
    await domain(w, 42, 'db', uuid, params);
    const restored = await w.hook('add', 42);
    t.equal(restored.code, 0, "the restore's add exits 0");
    t.match(restored.log.join('\n'), /claim on .*disk\.img, kept since the save .* is this disk's again/);
    t.match(JSON.parse(readFileSync(owner, 'utf8')), { backendPath: 'backend/vbd/42/51712' });
    t.notOk(existsSync(marker), 'the marker is used up');
    // A destroy releases the claim with the rest.
    await w.store.xs.write('backend/vbd/42/51712/sectors', '2048');
    w.xl.set(42, '-b----');
    await closeBackend(w.store.xs, { domid: 42, devid: 51712 });
    t.equal((await w.hook('remove', 42)).code, 0);
    t.notOk(existsSync(`${w.file}.owner`), 'released');
    t.same(w.loopsOnFile(), []);
  },
);

t.test('a kept claim given up (marker deleted) is released by gc', async (t) => {
  const w = await world(t, true);
  const uuid = '99999999-2222-4333-8444-555555555555';
  const params = 'disk.img persistent claim';
  await domain(w, 43, 'db', uuid, params);
  t.equal((await w.hook('add', 43)).code, 0);
  w.xl.set(43, '--pss-');
  await closeBackend(w.store.xs, { domid: 43, devid: 51712 });
  t.equal((await w.hook('remove', 43)).code, 0);
  await destroyNodes(w, 43);
  const kept = await takeInventory({ config: w.config, run: execRunner(process.env), xs: w.store.xs });
  t.same(gcPlan(kept, { withoutXenstore: false }), [], 'while the marker stands, the claim is not stale');
  rmSync(markerPath(w.config, uuid, '51712'));
  const inv = await takeInventory({ config: w.config, run: execRunner(process.env), xs: w.store.xs });
  const plan = gcPlan(inv, { withoutXenstore: false });
  t.same(
    plan.map((i) => i.row.kind),
    ['claim'],
    'a stale claim of this host now',
  );
  const results = await applyGc(plan, {
    config: w.config,
    run: execRunner(process.env),
    log: memoryLogger(),
    xs: w.store.xs,
  });
  t.same(
    results.map((r) => r.ok),
    [true],
  );
  t.notOk(existsSync(`${w.file}.owner`));
});
