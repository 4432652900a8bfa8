/**
 * The rows of docs/lifecycle.md's table that each hook decides in its own code, run through the
 * real hook runtime (runHook, journal, locks, an in-process xenstore) with `xl list` played
 * (the hypervisor's answer to "is this domain being saved?"):
 *
 *   - `block` on a file: save + restore, a dom0 restart, a bootloader attach, on real loop
 *     devices: every add hands out the image itself, with what the guest wrote;
 *   - block-lvsnap, with LVM played (lvs/lvcreate/lvchange/lvremove as lvm 2.03.16 answers):
 *     a persistent snapshot through a save and a restart is the same LV, never a new one; a
 *     transient one is held at the save and refused after a restart, with nothing run;
 *   - block-thin, block-qcow (and block-rbd's transient clone): what is decided before a device
 *     is made (the refusal after a restart, the bootloader's refusal of a thing named after its domain, the persistent volume
 *     or overlay a restore's new domid finds, a migration's receiver refused busy), and
 *     block-qcow's reuse of a persistent overlay left by a save or a restart (nbd played absent:
 *     this host has no nbd module, so the add stops at the export, after the overlay step).
 *
 * Tier: host. block-cow's rows: test/host/lifecycle.test.ts, cow-steps.test.ts and the real-Xen
 * 80/83/85 scenarios; block-rbd's: rbd-hook.test.ts.
 */
import t, { type Test } from 'tap';
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import {
  closeSync,
  existsSync,
  fsyncSync,
  mkdirSync,
  mkdtempSync,
  openSync,
  readdirSync,
  readFileSync,
  readSync,
  rmSync,
  statSync,
  writeFileSync,
  writeSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { blockBackend } from '../../src/backends/block.js';
import { lvsnapBackend, planLvsnap, TAG_PERSISTENT, TAG_TRANSIENT } from '../../src/backends/lvsnap.js';
import { cloneName, parseRbdParams, rbdBackend } from '../../src/backends/rbd.js';
import { planQcow, qcowBackend } from '../../src/backends/qcow.js';
import { planThin, thinBackend } from '../../src/backends/thin.js';
import type { Backend } from '../../src/backends/types.js';
import { defaultConfig, type Config } from '../../src/config/config.js';
import { execRunner } from '../../src/devices/exec.js';
import type { RunOptions, RunResult, Runner } from '../../src/devices/runner.js';
import { devString } from '../../src/devices/sysfs.js';
import type { DiskSpec } from '../../src/disk/spec.js';
import { Journal } from '../../src/journal/journal.js';
import { markerPath, writeMarker } from '../../src/journal/saved.js';
import { thisHost } from '../../src/lock/store-owner.js';
import { runHook } from '../../src/hotplug/main.js';
import { memoryLogger } from '../../src/log/logger.js';
import { connectXenstore } from '../../src/xenstore/client.js';
import { closeBackend, destroyNodes, writeBackendNodes } from '../lib/backend-nodes.js';
import { startTestStore, writeDomain, type TestStore } from '../lib/block-harness.js';

t.setTimeout(180_000);

const MiB = 1024 * 1024;

/** `xl list DOMID` as xl_info.c's list_domains prints it. */
function xlList(name: string, domid: number, state: string): string {
  const head = 'Name                                        ID   Mem VCPUs\tState\tTime(s)';
  return `${head}\n${name.padEnd(40)} ${String(domid).padStart(5)} ${'256'.padStart(5)} ${'1'.padStart(5)}     ${state}  ${'12.3'.padStart(8)}\n`;
}

function result(command: string, exitCode: number, stdout = '', stderr = ''): RunResult {
  return {
    command,
    exitCode,
    signal: undefined,
    stdout,
    stderr,
    durationMs: 1,
    failed: exitCode !== 0,
    timedOut: false,
  };
}

/**
 * A runner that answers `xl list DOMID` from `xl`, hands `file`s in `fake` to their handler and
 * everything else to the real runner (flock, losetup, qemu-img); every command is recorded.
 */
function runner(
  xl: Map<number, string>,
  fake: Record<string, (args: readonly string[]) => RunResult> = {},
): Runner & { calls: string[] } {
  const real = execRunner(process.env);
  const calls: string[] = [];
  const answer = (file: string, args: readonly string[]): RunResult | undefined => {
    if (file === 'xl') {
      const id = Number(args[1]);
      const st = xl.get(id);
      return st === undefined
        ? result(`xl ${args.join(' ')}`, 1, '', `Invalid domain identifier: ${id}`)
        : result(`xl ${args.join(' ')}`, 0, xlList(`dom${id}`, id, st));
    }
    return fake[file]?.(args);
  };
  return {
    calls,
    async probe(file: string, args: readonly string[], o?: RunOptions) {
      calls.push([file, ...args].join(' '));
      return answer(file, args) ?? real.probe(file, args, o);
    },
    async run(file: string, args: readonly string[], o?: RunOptions) {
      calls.push([file, ...args].join(' '));
      const r = answer(file, args);
      if (!r) return real.run(file, args, o);
      if (r.failed) throw new Error(`${r.command}: ${r.stderr}`);
      return r;
    },
  };
}

/** Commands other than the locks' flock and the xl question. */
const deviceCalls = (calls: string[]) => calls.filter((c) => !c.startsWith('flock') && !c.startsWith('xl '));

interface World {
  dir: string;
  images: string;
  config: Config;
  store: TestStore;
  xl: Map<number, string>;
  hook(
    backend: Backend<never>,
    action: 'add' | 'remove',
    domid: number,
    run: Runner,
    devid?: number,
  ): Promise<{ code: number; error: string | undefined; status: string | undefined; log: string }>;
  journalKeys(): string[];
  /** What a dom0 restart does to /run: the journal and the locks are gone. */
  clearRun(): void;
}

async function world(t: Test): Promise<World> {
  const dir = mkdtempSync(join(tmpdir(), 'xbh-rows-'));
  const images = join(dir, 'images');
  mkdirSync(images);
  const config: Config = {
    ...defaultConfig(),
    storeDir: join(dir, 'store'),
    stateDir: join(dir, 'state'),
    imageDirs: [images],
    xenLockDir: join(dir, 'xl'),
    logFile: '',
    lockTimeoutMs: 5000,
    busyRetryMs: 200,
  };
  const store = await startTestStore('xbh-rows-xs-');
  t.teardown(async () => {
    await store.close();
    rmSync(dir, { recursive: true, force: true });
  });
  const w: World = {
    dir,
    images,
    config,
    store,
    xl: new Map(),
    async hook(backend, action, domid, run, devid = 51712) {
      const be = `backend/vbd/${domid}/${devid}`;
      const logger = memoryLogger();
      const code = await runHook(
        backend,
        [action],
        { XENBUS_PATH: be },
        {
          connect: () => connectXenstore({ path: store.socketPath }),
          run,
          config,
          logger,
          err: () => {},
          out: () => {},
        },
      );
      return {
        code,
        error: await store.xs.tryRead(`${be}/hotplug-error`),
        status: await store.xs.tryRead(`${be}/hotplug-status`),
        log: logger.lines.map((l) => `${l.level} ${l.msg}`).join('\n'),
      };
    },
    journalKeys() {
      const j = join(config.stateDir, 'journal');
      return existsSync(j) ? readdirSync(j).filter((n) => n.endsWith('.json')) : [];
    },
    clearRun() {
      rmSync(config.stateDir, { recursive: true, force: true });
    },
  };
  return w;
}

/** libxl's part around one domain: its home (name, vm with the uuid) and one disk's backend nodes. */
async function domain(
  w: World,
  domid: number,
  name: string,
  uuid: string | null,
  params: string,
  script: string,
  vdev = 'xvda',
): Promise<void> {
  if (domid !== 0) await writeDomain(w.store.xs, { domid, name, uuid });
  await writeBackendNodes(w.store.xs, { domid, devid: 51712, params, script, domainName: name, vdev });
}

/** libxl's part after a remove: the backend and the domain's home go. */
async function gone(w: World, domid: number): Promise<void> {
  await destroyNodes(w.store.xs, { domid, devid: 51712 });
  if (domid !== 0) await w.store.xs.rm(`/local/domain/${domid}`);
}

/** xl save: the domain is shut down for a suspend while its remove runs; then it is destroyed. */
async function save(w: World, backend: Backend<never>, domid: number, run: Runner) {
  w.xl.set(domid, '--pss-');
  await closeBackend(w.store.xs, { domid, devid: 51712 });
  const r = await w.hook(backend, 'remove', domid, run);
  await gone(w, domid);
  w.xl.delete(domid);
  return r;
}

/** A marker as the remove of a save leaves it, from an earlier boot of this host. */
function markerFromEarlierBoot(w: World, uuid: string, script: string, params: string, transient: string): string {
  const me = thisHost();
  writeMarker(w.config, {
    version: 1,
    machine: me.machine,
    host: me.host,
    key: uuid,
    name: 'web',
    vdev: 'xvda',
    devid: '51712',
    script,
    params,
    mode: 'w',
    transient,
    held: `held/${uuid}/51712`,
    from: 'backend/vbd/5/51712',
    bootId: 'an-earlier-boot',
    savedAt: '2026-12-04T10:00:00.000Z',
  });
  return markerPath(w.config, uuid, '51712');
}

function writeAt(dev: string, offset: number, text: string): void {
  const fd = openSync(dev, 'r+');
  try {
    const buf = Buffer.alloc(4096);
    buf.write(text);
    writeSync(fd, buf, 0, buf.length, offset);
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

function readAt(dev: string, offset: number, length: number): string {
  const fd = openSync(dev, 'r');
  try {
    const buf = Buffer.alloc(length);
    readSync(fd, buf, 0, length, offset);
    return buf.toString('utf8');
  } finally {
    closeSync(fd);
  }
}

function loopsOn(file: string): string[] {
  return execFileSync('losetup', ['-j', file], { encoding: 'utf8' })
    .split('\n')
    .filter(Boolean)
    .map((l) => l.split(':')[0] as string);
}

const sha = (file: string) => createHash('sha256').update(readFileSync(file)).digest('hex');

// ---------------------------------------------------------------------------------------------
// block: file:

t.test(
  'block file: save + restore, a dom0 restart, a bootloader attach: the image itself, with the guest data',
  async (t) => {
    const w = await world(t);
    const img = join(w.images, 'web.img');
    writeFileSync(img, Buffer.alloc(4 * MiB));
    t.teardown(() => {
      for (const l of loopsOn(img)) execFileSync('losetup', ['-d', l]);
    });
    const block = blockBackend as unknown as Backend<never>;
    const run = runner(w.xl);
    const script = '/etc/xen/scripts/block';
    const uuid = 'b1b1b1b1-2222-4333-8444-555555555555';
    const node = async (domid: number) => (await w.store.xs.read(`backend/vbd/${domid}/51712/node`)) as string;

    await domain(w, 5, 'web', uuid, img, script);
    t.equal((await w.hook(block, 'add', 5, run)).code, 0, 'xl create');
    writeAt(await node(5), MiB, 'written before the save');

    const saved = await save(w, block, 5, run);
    t.equal(saved.code, 0, "the save's remove");
    t.same(loopsOn(img), [], 'its loop goes: the data is in the image');
    t.notOk(existsSync(markerPath(w.config, uuid, '51712')), 'nothing is held for a disk whose data is the image');
    t.same(w.journalKeys(), []);

    await domain(w, 6, 'web', uuid, img, script);
    t.equal((await w.hook(block, 'add', 6, run)).code, 0, 'xl restore: a new domid, the same uuid');
    t.same(loopsOn(img), [await node(6)], 'a loop over the same image');
    t.match(readAt(await node(6), MiB, 64), /^written before the save/, 'the restored guest reads what it wrote');
    writeAt(await node(6), 2 * MiB, 'written before the restart');

    // The restart: every loop and /run go; the image stays.
    for (const l of loopsOn(img)) execFileSync('losetup', ['-d', l]);
    w.clearRun();
    await gone(w, 6);
    await domain(w, 7, 'web', uuid, img, script);
    t.equal((await w.hook(block, 'add', 7, run)).code, 0, 'restore after the restart');
    t.match(readAt(await node(7), 2 * MiB, 64), /^written before the restart/, 'and reads what it wrote');
    await closeBackend(w.store.xs, { domid: 7, devid: 51712 });
    t.equal((await w.hook(block, 'remove', 7, run)).code, 0, 'destroy');
    await gone(w, 7);

    // pygrub: libxl attaches the disk to dom0 (frontend 0) before the domain's own add.
    await domain(w, 0, 'Domain-0', null, img, script);
    t.equal((await w.hook(block, 'add', 0, run)).code, 0, 'bootloader attach');
    t.match(readAt(await node(0), MiB, 64), /^written before the save/, 'the bootloader sees the guest data');
    t.match(readAt(await node(0), 2 * MiB, 64), /^written before the restart/);
    await closeBackend(w.store.xs, { domid: 0, devid: 51712 });
    t.equal((await w.hook(block, 'remove', 0, run)).code, 0);
    t.same(loopsOn(img), [], 'nothing left');
    t.same(w.journalKeys(), []);
  },
);

// ---------------------------------------------------------------------------------------------
// block-lvsnap, with LVM played

interface FakeLv {
  vg: string;
  lv: string;
  origin?: string;
  tags: string[];
  active: boolean;
  minor: number;
  sizeBytes: number;
}

/** The volume group vg0 with the origin golden, as lvm 2.03.16 reports and changes it (major 240: no device of this host's). */
class Lvm {
  lvs = new Map<string, FakeLv>([
    ['vg0/golden', { vg: 'vg0', lv: 'golden', tags: [], active: true, minor: 0, sizeBytes: 16 * MiB }],
  ]);
  nextMinor = 1;

  row(l: FakeLv): Record<string, string> {
    const isOrigin = [...this.lvs.values()].some((s) => s.vg === l.vg && s.origin === l.lv);
    return {
      vg_name: l.vg,
      lv_name: l.lv,
      lv_attr: l.origin ? `swi-${l.active ? 'a' : '-'}-s---` : `${isOrigin ? 'o' : '-'}wi-a-${isOrigin ? 's' : '-'}---`,
      lv_size: String(l.sizeBytes),
      origin: l.origin ?? '',
      pool_lv: '',
      data_percent: l.origin ? '0.00' : '',
      metadata_percent: '',
      segtype: 'linear',
      lv_dm_path: `/dev/mapper/${l.vg}-${l.lv.replace(/-/g, '--')}`,
      lv_kernel_major: l.active ? '240' : '-1',
      lv_kernel_minor: l.active ? String(l.minor) : '-1',
      lv_tags: l.tags.join(','),
    };
  }

  handle(args: readonly string[]): RunResult {
    const cmd = `lvm ${args.join(' ')}`;
    const target = args[args.length - 1] as string;
    const report = (rows: FakeLv[]) =>
      result(cmd, 0, JSON.stringify({ report: [{ lv: rows.map((r) => this.row(r)) }] }));
    const missing = () => result(cmd, 5, '', `  Failed to find logical volume "${target}"\n`);
    switch (args[0]) {
      case 'lvs': {
        if (target.startsWith('@'))
          return report([...this.lvs.values()].filter((l) => l.tags.includes(target.slice(1))));
        const l = this.lvs.get(target);
        return l ? report([l]) : missing();
      }
      case 'lvcreate': {
        const name = args[args.indexOf('-n') + 1] as string;
        const [vg, origin] = target.split('/') as [string, string];
        if (this.lvs.has(`${vg}/${name}`))
          return result(cmd, 5, '', `  Logical Volume "${name}" already exists in volume group "${vg}"\n`);
        const size = args.includes('-L') ? Number.parseInt(args[args.indexOf('-L') + 1] as string, 10) * MiB : 0;
        const tag = args.includes('--addtag') ? [args[args.indexOf('--addtag') + 1] as string] : [];
        this.lvs.set(`${vg}/${name}`, {
          vg,
          lv: name,
          origin,
          tags: tag,
          active: true,
          minor: this.nextMinor++,
          sizeBytes: size,
        });
        return result(cmd, 0);
      }
      case 'lvchange': {
        const l = this.lvs.get(target);
        if (!l) return missing();
        if (!l.active) {
          l.active = true;
          l.minor = this.nextMinor++;
        }
        return result(cmd, 0);
      }
      case 'lvremove':
        return this.lvs.delete(target) ? result(cmd, 0) : missing();
      default:
        return result(cmd, 3, '', `unexpected ${cmd}`);
    }
  }

  /** A dom0 restart: LVs stay, inactive until something activates them. */
  reboot(): void {
    for (const l of this.lvs.values()) if (l.origin) l.active = false;
  }

  snapshots(): string[] {
    return [...this.lvs.values()].filter((l) => l.origin).map((l) => `${l.vg}/${l.lv} ${l.tags.join(',')}`);
  }
}

const lvsnap = lvsnapBackend as unknown as Backend<never>;
const LVSNAP = '/etc/xen/scripts/block-lvsnap';

t.test('block-lvsnap persistent: a save and a restart find the same snapshot LV, never a new one', async (t) => {
  const w = await world(t);
  const lvm = new Lvm();
  const run = runner(w.xl, { lvm: (a) => lvm.handle(a) });
  const uuid = 'c1c1c1c1-2222-4333-8444-555555555555';
  const params = 'vg0/golden 8M persistent';
  const pd = async (domid: number) => w.store.xs.read(`backend/vbd/${domid}/51712/physical-device-path`);
  const creates = () => run.calls.filter((c) => c.startsWith('lvm lvcreate')).length;

  await domain(w, 5, 'web', uuid, params, LVSNAP);
  const created = await w.hook(lvsnap, 'add', 5, run);
  t.equal(created.code, 0, created.error ?? 'xl create');
  t.same(lvm.snapshots(), [`vg0/xbh-web-xvda ${TAG_PERSISTENT}`], 'one persistent snapshot');
  t.equal(await pd(5), '/dev/mapper/vg0-xbh--web--xvda');
  t.equal(creates(), 1);

  const saved = await save(w, lvsnap, 5, run);
  t.equal(saved.code, 0, "the save's remove");
  t.same(lvm.snapshots(), [`vg0/xbh-web-xvda ${TAG_PERSISTENT}`], 'the snapshot stays: its data is in it');
  t.notOk(
    run.calls.some((c) => c.startsWith('lvm lvremove')),
    'nothing removed',
  );
  t.notOk(existsSync(markerPath(w.config, uuid, '51712')), 'nothing held: the LV outlives its devices');
  t.same(w.journalKeys(), []);

  await domain(w, 6, 'web', uuid, params, LVSNAP);
  const restored = await w.hook(lvsnap, 'add', 6, run);
  t.equal(restored.code, 0, 'xl restore: a new domid');
  t.equal(await pd(6), '/dev/mapper/vg0-xbh--web--xvda', 'the same LV');
  t.equal(creates(), 1, 'no new snapshot');
  t.match(restored.log, /reattaching persistent snapshot vg0\/xbh-web-xvda/);

  // The restart: the devices and /run go; the LV stays, inactive.
  lvm.reboot();
  w.clearRun();
  await gone(w, 6);
  await domain(w, 7, 'web', uuid, params, LVSNAP);
  run.calls.length = 0;
  const after = await w.hook(lvsnap, 'add', 7, run);
  t.equal(after.code, 0, after.error ?? 'restore after the restart');
  t.equal(await pd(7), '/dev/mapper/vg0-xbh--web--xvda', 'the same LV');
  t.ok(run.calls.includes('lvm lvchange -q -ay -K -- vg0/xbh-web-xvda'), 'activated');
  t.equal(creates(), 0, 'no new snapshot');
  t.same(lvm.snapshots(), [`vg0/xbh-web-xvda ${TAG_PERSISTENT}`]);
  await closeBackend(w.store.xs, { domid: 7, devid: 51712 });
  t.equal((await w.hook(lvsnap, 'remove', 7, run)).code, 0, 'destroy');
  t.same(lvm.snapshots(), [`vg0/xbh-web-xvda ${TAG_PERSISTENT}`], 'kept after its destroy too');
});

t.test(
  'block-lvsnap transient: held at the save; after a restart the restore is refused and runs nothing',
  async (t) => {
    const w = await world(t);
    const lvm = new Lvm();
    const run = runner(w.xl, { lvm: (a) => lvm.handle(a) });
    const uuid = 'c2c2c2c2-2222-4333-8444-555555555555';
    const params = 'vg0/golden 8M';
    await domain(w, 5, 'web', uuid, params, LVSNAP);
    const created = await w.hook(lvsnap, 'add', 5, run);
    t.equal(created.code, 0, created.error ?? 'xl create');
    const saved = await save(w, lvsnap, 5, run);
    t.equal(saved.code, 0);
    t.match(
      saved.log,
      /is being saved; keeping \/dev\/mapper\/vg0-xbh--web--xvda and transient snapshot vg0\/xbh-web-xvda/,
    );
    t.same(lvm.snapshots(), [`vg0/xbh-web-xvda ${TAG_TRANSIENT}`], 'held, not removed');
    const marker = markerPath(w.config, uuid, '51712');
    t.ok(existsSync(marker));

    // The restart: the marker (store_dir) stays, from another boot now; the LV stays, inactive.
    lvm.reboot();
    w.clearRun();
    writeFileSync(marker, readFileSync(marker, 'utf8').replace(/"bootId": "[^"]*"/, '"bootId": "an-earlier-boot"'));
    for (const attempt of [1, 2]) {
      await domain(w, 6, 'web', uuid, params, LVSNAP);
      run.calls.length = 0;
      const r = await w.hook(lvsnap, 'add', 6, run);
      t.equal(r.code, 1, `restore attempt ${attempt} is refused`);
      t.match(
        r.error,
        /block-lvsnap: the saved domain web's transient snapshot vg0\/xbh-web-xvda on xvda .* did not survive: dom0 has restarted since/,
      );
      t.same(deviceCalls(run.calls), [], 'no LVM command ran: nothing built, the old LV neither reused nor replaced');
      t.same(w.journalKeys(), []);
      t.ok(existsSync(marker), 'the marker stays');
      await gone(w, 6);
    }
  },
);

t.test(
  'bootloader attach (frontend 0): a persistent thing named after its domain is refused, nothing run',
  async (t) => {
    const w = await world(t);
    const base = join(w.images, 'base.img');
    writeFileSync(base, Buffer.alloc(4 * MiB));
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', join(w.images, 'disk.qcow2'), '16M']);
    const cases: [Backend<never>, string, string, RegExp][] = [
      [
        thinBackend as unknown as Backend<never>,
        '/etc/xen/scripts/block-thin',
        `${base} persistent`,
        /block-thin: this disk is being attached to dom0 .*persistent thin volume is named after the domain .*boot the domain with kernel= instead of a bootloader/,
      ],
      [
        lvsnap,
        LVSNAP,
        'vg0/golden 8M persistent',
        /block-lvsnap: this disk is being attached to dom0 .*persistent snapshot is named after the domain .*boot the domain with kernel=/,
      ],
      [
        qcowBackend as unknown as Backend<never>,
        '/etc/xen/scripts/block-qcow',
        `${join(w.images, 'disk.qcow2')} overlay=persistent`,
        /block-qcow: this disk is being attached to dom0 .*persistent overlay is named after the domain .*name it explicitly with name=NAME/,
      ],
    ];
    for (const [backend, script, params, re] of cases) {
      await domain(w, 0, 'Domain-0', null, params, script);
      const run = runner(w.xl);
      const r = await w.hook(backend, 'add', 0, run);
      t.equal(r.code, 1, `${script} ${params}: refused`);
      t.match(r.error, re);
      t.equal(r.status, 'error');
      t.same(deviceCalls(run.calls), [], `${script}: nothing run`);
      t.same(w.journalKeys(), []);
      await gone(w, 0);
    }
    t.notOk(existsSync(join(w.config.storeDir, 'qcow')), 'no overlay made');
    t.notOk(existsSync(join(w.config.storeDir, 'thin-pool.data')), 'no pool made');

    // Named explicitly, the bootloader and the guest name the same overlay; a transient thing is the bootloader's own.
    const disk = (domainName: string, frontendId: number, params: string): DiskSpec => ({
      params,
      mode: 'w',
      frontendId,
      vdev: 'xvda',
      type: 'phy',
      state: 2,
      domainName,
    });
    const named = `${join(w.images, 'disk.qcow2')} overlay=persistent name=web-root`;
    const forDom0 = planQcow(disk('Domain-0', 0, named), { config: w.config, xenbusPath: 'backend/vbd/0/51712' });
    const forGuest = planQcow(disk('web', 5, named), { config: w.config, xenbusPath: 'backend/vbd/5/51712' });
    t.equal(forDom0.overlayPath, join(w.config.storeDir, 'qcow', 'web-root.qcow2'));
    t.equal(forDom0.overlayPath, forGuest.overlayPath, 'name=NAME: the same overlay for both attaches');
    const dom0 = { config: w.config, xenbusPath: 'backend/vbd/0/51712' };
    t.equal(
      planThin(disk('Domain-0', 0, base), dom0).name,
      'xbh-thin-Domain-0-xvda-51712',
      "a transient thin volume: the bootloader's own",
    );
    t.match(
      planQcow(disk('Domain-0', 0, `${join(w.images, 'disk.qcow2')} overlay=transient`), dom0).overlayPath,
      /\/qcow\/transient-0-51712-[0-9a-f]{8}\.qcow2$/,
      "a transient overlay: the bootloader's own",
    );
    t.equal(
      planLvsnap(disk('Domain-0', 0, 'vg0/golden 8M'), dom0).snap.lv,
      'xbh-Domain-0-xvda',
      "a transient snapshot: the bootloader's own",
    );
    t.equal(
      cloneName(parseRbdParams('rbd/golden@base'), disk('Domain-0', 0, 'rbd/golden@base'), 'backend/vbd/0/51712'),
      'xbh-Domain-0-xvda',
      "a transient clone: the bootloader's own",
    );
  },
);

// ---------------------------------------------------------------------------------------------
// block-thin and block-qcow: decided before a device is made

t.test(
  'block-thin, block-qcow and block-rbd transient: after a restart the restore is refused and runs nothing',
  async (t) => {
    const w = await world(t);
    const base = join(w.images, 'base.img');
    writeFileSync(base, Buffer.alloc(4 * MiB));
    const cases: [Backend<never>, string, string, string][] = [
      [thinBackend as unknown as Backend<never>, 'block-thin', base, 'transient thin volume xbh-thin-web-xvda-51712'],
      [
        qcowBackend as unknown as Backend<never>,
        'block-qcow',
        `${base} overlay=transient`,
        `transient qcow2 overlay ${join(w.config.storeDir, 'qcow', 'transient-5-51712-0a1b2c3d.qcow2')}`,
      ],
      [rbdBackend as unknown as Backend<never>, 'block-rbd', 'rbd/golden@base', 'transient clone rbd/xbh-web-xvda'],
    ];
    let n = 0;
    for (const [backend, script, params, transient] of cases) {
      const uuid = `d${++n}d1d1d1-2222-4333-8444-555555555555`;
      const marker = markerFromEarlierBoot(w, uuid, script, params, transient);
      for (const attempt of [1, 2]) {
        await domain(w, 6, 'web', uuid, params, `/etc/xen/scripts/${script}`);
        const run = runner(w.xl);
        const r = await w.hook(backend, 'add', 6, run);
        t.equal(r.code, 1, `${script}: restore attempt ${attempt} is refused`);
        t.match(
          r.error,
          new RegExp(
            `${script}: the saved domain web's transient .* did not survive: dom0 has restarted since.*nothing was built`,
          ),
        );
        t.same(deviceCalls(run.calls), [], `${script}: nothing run`);
        t.same(w.journalKeys(), []);
        t.ok(existsSync(marker), 'the marker stays');
        await gone(w, 6);
      }
    }
    t.notOk(existsSync(join(w.config.storeDir, 'qcow')), 'no overlay made');
    t.notOk(existsSync(join(w.config.storeDir, 'thin-pool.data')), 'no pool made');
  },
);

t.test(
  'a restore (new domid, same domain) names the same persistent volume or overlay; only transient data is held',
  async (t) => {
    const w = await world(t);
    const base = join(w.images, 'base.img');
    writeFileSync(base, Buffer.alloc(4 * MiB));
    const disk = (frontendId: number, params: string): DiskSpec => ({
      params,
      mode: 'w',
      frontendId,
      vdev: 'xvda',
      type: 'phy',
      state: 2,
      domainName: 'web',
    });
    const thin = (id: number, p: string) =>
      planThin(disk(id, p), { config: w.config, xenbusPath: `backend/vbd/${id}/51712` });
    t.equal(thin(5, `${base} persistent`).key, 'web-xvda');
    t.equal(thin(9, `${base} persistent`).key, 'web-xvda', "the restore's add finds the pool's volume web-xvda");
    t.equal(thinBackend.transient?.(thin(5, `${base} persistent`)), undefined, 'a persistent volume is never held');
    t.equal(thinBackend.transient?.(thin(5, base)), 'transient thin volume xbh-thin-web-xvda-51712');
    const qcow = (id: number, p: string) =>
      planQcow(disk(id, p), { config: w.config, xenbusPath: `backend/vbd/${id}/51712` });
    const persistent = `${base} overlay=persistent`;
    t.equal(qcow(5, persistent).overlayPath, join(w.config.storeDir, 'qcow', 'web-xvda.qcow2'));
    t.equal(qcow(9, persistent).overlayPath, qcow(5, persistent).overlayPath, 'the same overlay file');
    t.equal(qcowBackend.transient?.(qcow(5, persistent)), undefined, 'a persistent overlay is never held');
    t.equal(qcow(5, base).overlayPath, undefined, 'overlay=no: the image itself');
    t.equal(qcowBackend.transient?.(qcow(5, base)), undefined, 'overlay=no is never held');
    t.match(qcowBackend.transient?.(qcow(5, `${base} overlay=transient`)), /^transient qcow2 overlay /);
  },
);

t.test(
  'block-qcow persistent: the add after a save or a restart takes the overlay there (checked to be over this image), never a new one',
  async (t) => {
    const w = await world(t);
    const base = join(w.images, 'base.raw');
    execFileSync('qemu-img', ['create', '-q', '-f', 'raw', base, '16M']);
    const qdir = join(w.config.storeDir, 'qcow');
    mkdirSync(qdir, { recursive: true, mode: 0o700 });
    const overlay = join(qdir, 'web-xvda.qcow2');
    // What the first add made and the guest wrote into: an overlay over this image, with data.
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'raw', overlay]);
    execFileSync('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x5a 1M 64k', overlay], { stdio: 'ignore' });
    const before = sha(overlay);
    // No nbd on this host: the module is played absent, so the add stops at the export.
    const run = runner(w.xl, {
      modprobe: (a) => result(`modprobe ${a.join(' ')}`, 1, '', 'modprobe: FATAL: Module nbd not found'),
    });
    const uuid = 'e1e1e1e1-2222-4333-8444-555555555555';
    await domain(w, 9, 'web', uuid, `${base} overlay=persistent`, '/etc/xen/scripts/block-qcow');
    const r = await w.hook(qcowBackend as unknown as Backend<never>, 'add', 9, run);
    t.equal(r.code, 1, 'stops at the export (no nbd here)');
    t.match(r.error, /nbd/);
    t.ok(
      run.calls.some((c) => c.startsWith('qemu-img info') && c.endsWith(overlay)),
      'the overlay there is read, to check it is over this image',
    );
    t.notOk(
      run.calls.some((c) => c.startsWith('qemu-img create')),
      'no new overlay is made',
    );
    t.ok(existsSync(overlay), 'the failed add keeps the overlay it did not make');
    t.equal(sha(overlay), before, 'untouched');
    t.notOk(existsSync(`${overlay}.owner`), 'its claim is released with the rest');
    t.same(w.journalKeys(), []);
  },
);

t.test(
  "block-qcow: a migration's receiver on one host is refused busy while the sender holds the image or overlay",
  async (t) => {
    const w = await world(t);
    const base = join(w.images, 'base.raw');
    execFileSync('qemu-img', ['create', '-q', '-f', 'raw', base, '16M']);
    const journal = new Journal(w.config.stateDir);
    const st = statSync(base, { bigint: true });
    const key = `${devString(st.dev)}:${st.ino}`;
    const overlay = join(w.config.storeDir, 'qcow', 'web-xvda.qcow2');
    for (const [params, claims, re] of [
      [
        base,
        [{ key, path: base, role: 'w' }],
        /block-qcow: .*base\.raw cannot be given writable: it is in use by backend\/vbd\/5\/51712 \(domain web\)/,
      ],
      [
        `${base} overlay=persistent`,
        [
          { key, path: base, role: 'r' },
          { key: `path:${overlay}`, path: overlay, role: 'w' },
        ],
        /block-qcow: .*web-xvda\.qcow2 cannot be given writable: it is in use by backend\/vbd\/5\/51712 \(domain web\)/,
      ],
    ] as const) {
      // The sender, suspended, still has its disk: its record claims what it writes.
      const sender = Journal.begin('block-qcow', 'backend/vbd/5/51712', {
        params,
        mode: 'w',
        frontendId: 5,
        vdev: 'xvda',
        domainName: 'web',
      });
      sender.steps.push({ kind: 'qcow-use', data: { claims: claims as never }, done: true });
      sender.phase = 'ready';
      journal.save(sender);
      await domain(
        w,
        8,
        'web--incoming',
        'f1f1f1f1-2222-4333-8444-555555555555',
        params,
        '/etc/xen/scripts/block-qcow',
      );
      const run = runner(w.xl);
      const r = await w.hook(qcowBackend as unknown as Backend<never>, 'add', 8, run);
      t.equal(r.code, 1, `${params}: refused`);
      t.equal(r.status, 'busy');
      t.match(r.error, re);
      t.notOk(
        run.calls.some((c) => /qemu-img create|qemu-nbd/.test(c)),
        'no overlay made, nothing exported',
      );
      t.same(w.journalKeys(), ['backend~vbd~5~51712.json'], "only the sender's record");
      t.notOk(existsSync(overlay), 'no overlay');
      journal.delete('backend/vbd/5/51712');
      await gone(w, 8);
    }
  },
);
