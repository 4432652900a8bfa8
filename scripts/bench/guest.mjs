// Runs inside the QEMU guest (real 6.1 kernel: dm, loop, nbd; no udev), one PART per call:
//   node guest.mjs latency|concurrency|datapath|space --runs N --stock /path/to/stock/block
// The hooks are the copies in ./dist of the run folder; the xenstore server is ours, in this
// process; Debian's stock `block` talks to it through xenstore-utils (XENSTORED_PATH). Images
// live on ext4 inside a loop on the scratch tmpfs (tmpfs has no O_DIRECT). Prints one line
// `XBH-BENCH-RESULT <json>`; progress goes to stderr. Everything made is removed before exit.
import { execFileSync, spawnSync } from 'node:child_process';
import {
  closeSync,
  fsyncSync,
  mkdirSync,
  openSync,
  readdirSync,
  rmSync,
  statSync,
  writeFileSync,
  writeSync,
} from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { randomBytes } from 'node:crypto';
import { breakdown, log, probeArgs, rotation, summary, timed } from './common.mjs';

const HERE = dirname(fileURLToPath(import.meta.url));
const NODE = process.execPath;
const MiB = 1024 * 1024;
let lib; // the run's bundle of project helpers, from --lib
const HOOKS = { cow: 'block-cow', qcow: 'block-qcow', thin: 'block-thin' };

function sh(file, args) {
  return execFileSync(file, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] }).trim();
}

function args(argv) {
  const o = { part: argv[0], runs: 20, stock: '' };
  for (let i = 1; i < argv.length; i++) {
    if (argv[i] === '--runs') o.runs = Number(argv[++i]);
    else if (argv[i] === '--stock') o.stock = argv[++i];
    else if (argv[i] === '--lib') o.lib = argv[++i];
  }
  return o;
}

/** ext4 in a loop on the scratch tmpfs, mounted; images, stores and state below it. */
async function world(o, { ext4MiB = 900, baseMiB = 64 } = {}) {
  const scratch = process.env.XEN_BLOCKHOOKS_SCRATCH ?? '/tmp';
  const fsImg = join(scratch, 'bench-ext4.img');
  const mnt = join(scratch, 'mnt');
  writeFileSync(fsImg, '');
  sh('truncate', ['-s', `${ext4MiB}M`, '--', fsImg]);
  const fsLoop = sh('losetup', ['--find', '--show', '--', fsImg]);
  sh('mkfs.ext4', ['-q', '-F', '-E', 'lazy_itable_init=0,lazy_journal_init=0', fsLoop]);
  mkdirSync(mnt, { recursive: true });
  sh('mount', ['-t', 'ext4', fsLoop, mnt]);
  const root = join(mnt, 'bench');
  const images = join(root, 'images');
  mkdirSync(images, { recursive: true });
  mkdirSync('/var/log/xen', { recursive: true });
  const sock = join(scratch, 'xenstored.sock');
  const server = await lib.startXenstoreServer({ socketPath: sock });
  const xs = await lib.connectXenstore({ path: sock });
  const base = join(images, 'base.img');
  // Random content, written once: every chunk of the base holds data, as a real root image does.
  const fd = openSync(base, 'w');
  for (let i = 0; i < baseMiB; i++) writeSync(fd, randomBytes(MiB));
  fsyncSync(fd);
  closeSync(fd);
  const env = {
    PATH: process.env.PATH,
    DM_DISABLE_UDEV: '1',
    XENSTORED_PATH: sock,
    XENBUS_TYPE: 'vbd',
    XENBUS_BASE_PATH: 'backend',
  };
  const ours = {
    ...env,
    XEN_BLOCKHOOKS_CONF: join(root, 'no-such.conf'),
    XEN_BLOCKHOOKS_STORE_DIR: join(root, 'store'),
    XEN_BLOCKHOOKS_STATE_DIR: join(root, 'state'),
    XEN_BLOCKHOOKS_IMAGE_DIRS: images,
    XEN_BLOCKHOOKS_LOG_FILE: join(root, 'hook.log'),
    XEN_BLOCKHOOKS_BUSY_RETRY_MS: '10000',
    XEN_BLOCKHOOKS_LOCK_TIMEOUT_MS: '600000',
    XEN_BLOCKHOOKS_THIN_DATA_SIZE: '512M',
    XEN_BLOCKHOOKS_THIN_METADATA_SIZE: '16M',
  };
  let nextDomid = 1;
  const w = {
    root,
    images,
    base,
    baseMiB,
    xs,
    ours,
    async disk(params, { mode = 'w', script = '/etc/xen/scripts/block', devid = 51712 } = {}) {
      const domid = nextDomid++;
      const d = { domid, devid, params, mode, vdev: 'xvda', script, domainName: `bench${domid}` };
      return { d, be: await lib.writeBackendNodes(xs, d) };
    },
    run(kind, action, be, probe) {
      if (kind === 'stock')
        return timed(o.stock, [action], { env: { ...env, XENBUS_PATH: be, script: '/etc/xen/scripts/block' } });
      const hook = join(HERE, 'dist', `${HOOKS[kind]}.mjs`);
      const e = { ...ours, XENBUS_PATH: be, script: `/etc/xen/scripts/${HOOKS[kind]}` };
      if (probe) e.XBH_BENCH_PROBE_OUT = probe;
      return timed(NODE, [...(probe ? probeArgs() : []), hook, action], { env: e });
    },
    async expectOk(kind, action, be, r) {
      if (r.code !== 0)
        throw new Error(
          `${kind} ${action} ${be} exited ${r.code ?? r.signal}: ${(await xs.tryRead(`${be}/hotplug-error`)) ?? ''} ${r.stderr.trim().split('\n').slice(-3).join(' | ')}`,
        );
      if (action === 'add' && (await xs.tryRead(`${be}/hotplug-status`)) !== 'connected')
        throw new Error(`${kind} add ${be}: not connected`);
    },
    async add(kind, params, opts = {}, probe) {
      const disk = await w.disk(params, {
        script: kind === 'stock' ? '/etc/xen/scripts/block' : `/etc/xen/scripts/${HOOKS[kind]}`,
        ...opts,
      });
      const r = await w.run(kind, 'add', disk.be, probe);
      await w.expectOk(kind, 'add', disk.be, r);
      return {
        ...disk,
        add: r,
        path: await xs.read(`${disk.be}/physical-device-path`).catch(() => xs.read(`${disk.be}/node`)),
      };
    },
    async remove(kind, disk, probe) {
      await lib.closeBackend(xs, disk.d);
      const r = await w.run(kind, 'remove', disk.be, probe);
      await w.expectOk(kind, 'remove', disk.be, r);
      await lib.destroyNodes(xs, disk.d);
      return r;
    },
    async close() {
      await xs.close().catch(() => {});
      await server.close().catch(() => {});
      for (const line of sh('dmsetup', ['ls']).split('\n')) {
        const name = line.split(/\s+/)[0];
        if (name && !/No devices found/.test(line)) spawnSync('dmsetup', ['remove', '-f', name]);
      }
      for (const line of sh('losetup', ['-a']).split('\n').filter(Boolean)) {
        const dev = line.split(':')[0];
        if (dev !== fsLoop) spawnSync('losetup', ['-d', dev]);
      }
      spawnSync('umount', [mnt]);
      spawnSync('losetup', ['-d', fsLoop]);
      rmSync(fsImg, { force: true });
    },
  };
  return w;
}

function paramsFor(kind, w, extra = '') {
  if (kind === 'stock') return w.base;
  if (kind === 'qcow') return `${w.base} overlay=transient`;
  if (kind === 'thin') return w.base; // a thin disk as big as its base
  return `${w.base} 256M${extra ? ` ${extra}` : ''}`;
}

/** add/remove latency of each hook vs stock block file: and bare node, interleaved rounds. */
async function latency(w, o) {
  const only = (process.env.XBH_BENCH_GUEST_HOOKS ?? 'stock,cow,qcow,thin').split(',');
  const kinds = ['stock', 'cow', 'qcow', 'thin'].filter((k) => k === 'stock' || only.includes(k));
  const variants = [...kinds, 'node'];
  const res = Object.fromEntries(kinds.map((k) => [k, { add: [], remove: [] }]));
  res.node = [];
  const warmup = 1;
  for (let round = 0; round < warmup + o.runs; round++) {
    log(`latency round ${round + 1}/${warmup + o.runs}`);
    for (const v of rotation(variants, round)) {
      if (v === 'node') {
        const r = await timed(NODE, ['-e', '0']);
        if (round >= warmup) res.node.push(r.ms);
        continue;
      }
      const disk = await w.add(v, paramsFor(v, w));
      const r = await w.remove(v, disk);
      if (round >= warmup) {
        res[v].add.push(disk.add.ms);
        res[v].remove.push(r.ms);
      }
    }
  }
  // Where our hooks' time goes: a few probed cycles per hook after the timed rounds.
  res.breakdown = {};
  const probes = Number(process.env.XBH_BENCH_GUEST_PROBES ?? 2);
  for (let i = 0; i < probes; i++) {
    for (const k of kinds.filter((x) => x !== 'stock')) {
      const pa = join(w.root, `probe-${k}-a${i}.json`);
      const pr = join(w.root, `probe-${k}-r${i}.json`);
      const disk = await w.add(k, paramsFor(k, w), {}, pa);
      const r = await w.remove(k, disk, pr);
      const b = (res.breakdown[k] ??= { add: [], remove: [] });
      b.add.push(breakdown(disk.add, pa));
      b.remove.push(breakdown(r, pr));
    }
  }
  return res;
}

/** 40 concurrent adds on one base then 40 concurrent removes: block-cow, and stock file: (mode r). */
async function concurrency(w) {
  const n = Number(process.env.XBH_BENCH_GUEST_CONCURRENCY ?? 40);
  const res = { n };
  for (const kind of ['cow', 'stock']) {
    const single = [];
    for (let i = 0; i < 3; i++) {
      const disk = await w.add(kind, paramsFor(kind, w, 'chunk=64K'), kind === 'stock' ? { mode: 'r' } : {});
      single.push(disk.add.ms);
      await w.remove(kind, disk);
    }
    const disks = [];
    for (let i = 0; i < n; i++)
      disks.push(
        await w.disk(kind === 'cow' ? `${w.base} 16M` : w.base, {
          mode: kind === 'stock' ? 'r' : 'w',
          script: kind === 'stock' ? '/etc/xen/scripts/block' : '/etc/xen/scripts/block-cow',
        }),
      );
    log(`${kind}: ${n} concurrent adds`);
    const t0 = performance.now();
    const adds = await Promise.all(disks.map(({ be }) => w.run(kind, 'add', be)));
    const addWall = performance.now() - t0;
    let addFailures = 0;
    for (let i = 0; i < n; i++) {
      try {
        await w.expectOk(kind, 'add', disks[i].be, adds[i]);
      } catch (e) {
        addFailures++;
        log(e.message);
      }
    }
    const pds = new Set(
      (await Promise.all(disks.map(({ be }) => w.xs.tryRead(`${be}/physical-device`)))).filter(Boolean),
    );
    for (const { d } of disks) await lib.closeBackend(w.xs, d);
    log(`${kind}: ${n} concurrent removes`);
    const t1 = performance.now();
    const removes = await Promise.all(disks.map(({ be }) => w.run(kind, 'remove', be)));
    const removeWall = performance.now() - t1;
    const removeFailures = removes.filter((r) => r.code !== 0).length;
    for (const { d } of disks) await lib.destroyNodes(w.xs, d);
    const dm = sh('dmsetup', ['ls']);
    const loops = sh('losetup', ['-a'])
      .split('\n')
      .filter((l) => l.includes(w.images));
    res[kind] = {
      single,
      addWall,
      removeWall,
      addFailures,
      removeFailures,
      distinctDevices: pds.size,
      maxAdd: Math.max(...adds.map((r) => r.ms)),
      maxRemove: Math.max(...removes.map((r) => r.ms)),
      medianAdd: summary(adds.map((r) => r.ms)).p50,
      leftAfter: [...(/No devices found/.test(dm) ? [] : dm.split('\n')), ...loops],
    };
  }
  return res;
}

function fio(dev, name, extra, seconds) {
  const out = sh('fio', [
    `--name=${name}`,
    `--filename=${dev}`,
    '--direct=1',
    '--ioengine=psync',
    '--iodepth=1',
    '--numjobs=1',
    `--runtime=${seconds}`,
    '--output-format=json',
    '--randseed=4242',
    ...extra,
  ]);
  const job = JSON.parse(out.slice(out.indexOf('{'))).jobs[0];
  const side = job.write.io_bytes > 0 ? job.write : job.read;
  return { iops: side.iops, mibs: side.bw_bytes / MiB, ios: side.total_ios, err: job.error };
}

/** fio on each device kind vs a raw loop of the same base, two rounds in rotated order. */
async function datapath(w) {
  const raw = join(w.images, 'raw-copy.img');
  sh('cp', ['--', w.base, raw]);
  const devices = [
    ['raw loop', null],
    ['cow N 4K', 'chunk=4K'],
    ['cow N 16K', 'chunk=16K'],
    ['cow N 64K (default)', 'chunk=64K'],
    ['cow P 4K', 'persistent chunk=4K'],
    ['cow P 16K', 'persistent chunk=16K'],
    ['cow P 64K', 'persistent chunk=64K'],
    ['cow P 128K (Qubes default)', 'persistent chunk=128K'],
    ['qcow overlay', 'qcow'],
    ['thin', 'thin'],
  ];
  const secs = Number(process.env.XBH_BENCH_FIO_SECONDS ?? 2);
  const rounds = Number(process.env.XBH_BENCH_FIO_ROUNDS ?? 2);
  const chunks = w.baseMiB * 16; // 64 KiB chunks in the base
  const res = {};
  for (let round = 0; round < rounds; round++) {
    for (const [label, how] of rotation(devices, round * 3)) {
      log(`datapath round ${round + 1}/${rounds}: ${label}`);
      let dev;
      let disk;
      let kind;
      if (how === null) {
        dev = sh('losetup', ['--find', '--show', '--', raw]);
      } else {
        kind = how === 'qcow' ? 'qcow' : how === 'thin' ? 'thin' : 'cow';
        disk = await w.add(kind, paramsFor(kind, w, kind === 'cow' ? how : ''));
        dev = disk.path;
      }
      try {
        const r = {
          seqRead: fio(dev, 'seqread', ['--rw=read', '--bs=1M', '--time_based'], secs),
          // One 4 KiB write into each of distinct 64 KiB-aligned places: a chunk nobody wrote yet
          // for every chunk size measured here; the same seed again is the overwrite.
          firstWrite: fio(
            dev,
            'firstwrite',
            ['--rw=randwrite', '--bs=4k', '--blockalign=64k', `--number_ios=${Math.floor(chunks / 2)}`],
            secs,
          ),
          overwrite: fio(
            dev,
            'overwrite',
            ['--rw=randwrite', '--bs=4k', '--blockalign=64k', `--number_ios=${Math.floor(chunks / 2)}`],
            secs,
          ),
          randRead: fio(dev, 'randread', ['--rw=randread', '--bs=4k', '--time_based'], secs),
        };
        (res[label] ??= []).push(r);
      } finally {
        if (disk) await w.remove(kind, disk);
        else sh('losetup', ['-d', dev]);
      }
      if (how === null) sh('cp', ['--', w.base, raw]); // the raw reference starts each round unwritten too
    }
  }
  return { seconds: secs, rounds, baseMiB: w.baseMiB, results: res };
}

function allocated(path) {
  const st = statSync(path);
  if (st.isDirectory()) return readdirSync(path).reduce((s, f) => s + allocated(join(path, f)), 0);
  return st.blocks * 512;
}

/** 100 block-cow disks on one base, each writing 1 MiB: bytes allocated vs base + writes. */
async function space(w) {
  const n = Number(process.env.XBH_BENCH_SPACE_DOMAINS ?? 100);
  const store = w.ours.XEN_BLOCKHOOKS_STORE_DIR;
  const disks = [];
  const t0 = performance.now();
  const addMs = [];
  for (let i = 0; i < n; i++) {
    if (i % 10 === 0) log(`space: add ${i + 1}/${n}`);
    const disk = await w.add('cow', `${w.base} 64M`);
    addMs.push(disk.add.ms);
    const fd = openSync(disk.path, 'r+');
    const buf = randomBytes(MiB);
    writeSync(fd, buf, 0, MiB, (i % (w.baseMiB - 1)) * MiB);
    fsyncSync(fd);
    closeSync(fd);
    disks.push(disk);
  }
  const addAllMs = performance.now() - t0;
  sh('sync', []);
  const baseBytes = allocated(w.base);
  const storeBytes = allocated(store);
  const storeFiles = readdirSync(store).length;
  const snap = sh('dmsetup', ['status'])
    .split('\n')
    .filter((l) => / snapshot /.test(l))
    .slice(0, 3);
  const removeMs = [];
  for (let i = 0; i < disks.length; i++) {
    if (i % 10 === 0) log(`space: remove ${i + 1}/${n}`);
    removeMs.push((await w.remove('cow', disks[i])).ms);
  }
  return {
    n,
    writeBytesEach: MiB,
    baseBytes,
    baseApparent: statSync(w.base).size,
    storeBytes,
    storeFiles,
    expected: baseBytes + n * MiB,
    overheadBytes: baseBytes + storeBytes - (baseBytes + n * MiB),
    addAllMs,
    add: summary(addMs),
    remove: summary(removeMs),
    sampleStatus: snap,
  };
}

/**
 * Origin writes with N snapshots of one LV: classic LVM snapshots (what block-lvsnap makes with
 * `lvcreate -s -L`; the origin becomes a dm snapshot-origin, and a write to a chunk no snapshot
 * has copied yet is copied into each of the N snapshots first) against thin snapshots of a thin
 * LV (one shared pool: the first write to a shared block breaks sharing once, whatever N is).
 * fio: 4 KiB random first writes, each into its own 64 KiB-aligned place, on the origin itself.
 */
async function origin(w) {
  const counts = (process.env.XBH_BENCH_ORIGIN_SNAPSHOTS ?? '0,1,4,16').split(',').map(Number);
  const secs = Number(process.env.XBH_BENCH_FIO_SECONDS ?? 2);
  const rounds = Number(process.env.XBH_BENCH_FIO_ROUNDS ?? 2);
  const originMiB = 64;
  const VG = 'xbhbenchvg';
  const pvFile = join(w.root, 'origin-pv.img');
  writeFileSync(pvFile, '');
  sh('truncate', ['-s', `${originMiB * 2 + 16 * 16 + 160}M`, '--', pvFile]);
  const pv = sh('losetup', ['--find', '--show', '--', pvFile]);
  const lvm = (...a) => sh('lvm', a);
  const res = {};
  try {
    lvm('pvcreate', '-q', pv);
    lvm('vgcreate', '-q', '-s', '4M', VG, pv);
    lvm('lvcreate', '-q', '-y', '-n', 'origin', '-L', `${originMiB}M`, VG);
    lvm(
      'lvcreate',
      '-q',
      '-y',
      '--type',
      'thin-pool',
      '-n',
      'tpool',
      '-L',
      `${originMiB + 64}M`,
      '--chunksize',
      '64k',
      VG,
    );
    lvm('lvcreate', '-q', '-y', '--type', 'thin', '-n', 'torigin', '-V', `${originMiB}M`, '--thinpool', 'tpool', VG);
    const fill = (lv) =>
      sh('dd', [
        `if=${w.base}`,
        `of=/dev/mapper/${VG}-${lv}`,
        'bs=1M',
        `count=${originMiB}`,
        'oflag=direct',
        'status=none',
      ]);
    const chunks = originMiB * 16;
    for (let round = 0; round < rounds; round++) {
      for (const n of rotation(counts, round)) {
        for (const kind of round % 2 ? ['thin', 'classic'] : ['classic', 'thin']) {
          const lv = kind === 'thin' ? 'torigin' : 'origin';
          fill(lv);
          const snaps = [];
          for (let i = 0; i < n; i++) {
            const name = `s${i}`;
            if (kind === 'thin') lvm('lvcreate', '-q', '-y', '-s', '-K', '-n', name, `${VG}/${lv}`);
            else lvm('lvcreate', '-q', '-y', '-s', '-L', '16M', '-n', name, `${VG}/${lv}`);
            snaps.push(name);
          }
          log(`origin round ${round + 1}/${rounds}: ${kind}, ${n} snapshot(s)`);
          const r = fio(
            `/dev/mapper/${VG}-${lv}`,
            'originwrite',
            ['--rw=randwrite', '--bs=4k', '--blockalign=64k', `--number_ios=${Math.floor(chunks / 2)}`],
            secs,
          );
          (res[`${kind} ${n}`] ??= []).push(r);
          for (const name of snaps) lvm('lvremove', '-q', '-f', `${VG}/${name}`);
        }
      }
    }
  } finally {
    spawnSync('lvm', ['vgremove', '-q', '-f', VG]);
    spawnSync('lvm', ['pvremove', '-q', '-f', pv]);
    spawnSync('losetup', ['-d', pv]);
    rmSync(pvFile, { force: true });
  }
  return { seconds: secs, rounds, originMiB, counts, results: res };
}

async function main() {
  const o = args(process.argv.slice(2));
  const parts = { latency, concurrency, datapath, space, origin };
  if (!parts[o.part]) throw new Error(`unknown part ${o.part}`);
  lib = await import(pathToFileURL(o.lib).href);
  const w = await world(o, o.part === 'datapath' ? { ext4MiB: 900, baseMiB: 128 } : {});
  const t0 = performance.now();
  try {
    const result = await parts[o.part](w, o);
    process.stdout.write(`XBH-BENCH-RESULT ${JSON.stringify({ ...result, partMs: performance.now() - t0 })}\n`);
  } finally {
    await w.close();
  }
}

await main().catch((e) => {
  process.stderr.write(`guest bench: ${e instanceof Error ? e.stack : e}\n`);
  process.exitCode = 1;
});
