// The parts of the benchmark that run natively on this machine (loop devices, no device-mapper):
// our `block` against Debian's stock `block` for a file: disk (latency, with a breakdown of ours;
// 10 concurrent adds on different files), and start-up of the bundles against a bare `node -e 0`.
import { execFileSync, spawn } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { breakdown, log, rotation, timed } from './common.mjs';

const NODE = process.execPath;

/** Loop devices whose backing file lies under `dir` (cleanup and leak check). */
function loopsUnder(dir) {
  const text = execFileSync('losetup', ['--list', '--json', '--output', 'NAME,BACK-FILE'], { encoding: 'utf8' });
  if (!text.trim()) return [];
  return JSON.parse(text)
    .loopdevices.filter((d) => String(d['back-file'] ?? '').startsWith(dir))
    .map((d) => d.name);
}

/**
 * A world for file: disks: our xenstore server, images, our hook's environment and the stock
 * script's. Both use Xen's real lock (/var/run/xen-hotplug/block), as they would in a dom0.
 */
export async function nativeWorld(lib, { hooks, wrappers, runDir }) {
  const stockDir = await lib.stockScriptsDir();
  const missing = await lib.stockPrerequisites();
  if (missing.length) throw new Error(`the stock block script cannot run here: missing ${missing.join(', ')}`);
  const dir = mkdtempSync(join(tmpdir(), 'xbh-bench-'));
  const sock = join(dir, 'xenstored.sock');
  const server = await lib.startXenstoreServer({ socketPath: sock });
  const xs = await lib.connectXenstore({ path: sock });
  mkdirSync(join(dir, 'img'));
  mkdirSync(join(dir, 'probe'));
  const base = {
    PATH: process.env.PATH ?? '/usr/sbin:/usr/bin:/sbin:/bin',
    XENSTORED_PATH: sock,
    XENBUS_TYPE: 'vbd',
    XENBUS_BASE_PATH: 'backend',
  };
  const ours = {
    ...base,
    XEN_BLOCKHOOKS_CONF: join(dir, 'no-such.conf'),
    XEN_BLOCKHOOKS_STATE_DIR: join(dir, 'state'),
    XEN_BLOCKHOOKS_LOG_FILE: join(dir, 'hook.log'),
    XEN_BLOCKHOOKS_LOCK_TIMEOUT_MS: '60000',
  };
  let nextDomid = 1;
  const chan = join(dir, 'serve');
  let served;
  const w = {
    dir,
    sock,
    server,
    xs,
    stockBlock: join(stockDir, 'block'),
    hooks,
    wrappers,
    runDir,
    image(name, mib = 64) {
      const p = join(dir, 'img', name);
      writeFileSync(p, '');
      execFileSync('truncate', ['-s', `${mib}M`, '--', p]);
      return p;
    },
    /** One disk: nodes written as libxl writes them; returns { d, be }. */
    async disk(params, mode = 'w', script = '/etc/xen/scripts/block') {
      const domid = nextDomid++;
      const d = { domid, devid: 51712, params, mode, vdev: 'xvda', script, domainName: `bench${domid}` };
      const be = await lib.writeBackendNodes(xs, d);
      return { d, be };
    },
    /**
     * Run add or remove of `kind` ('ours' | 'stock') on backend `be`. Ours runs through the
     * wrapper the installer wrote (startup snapshot); with `probe` (a JSON file for the breakdown) it
     * runs as `node --import probe.mjs block.mjs`, the code-cache start, which the probe can see into.
     */
    /** The resident service (xen-blockhooks serve) on a channel of this run, started once. */
    async serve() {
      if (served) return;
      const child = spawn(NODE, [join(runDir, 'dist', 'xen-blockhooks.mjs'), 'serve', '--no-watch', '--dir', chan], {
        env: ours,
        stdio: 'ignore',
      });
      served = child;
      for (let i = 0; i < 400 && !existsSync(join(chan, 'pid')); i++) await new Promise((r) => setTimeout(r, 25));
      if (readFileSync(join(chan, 'pid'), 'utf8').trim() !== String(child.pid)) throw new Error('serve did not start');
    },
    run(kind, action, be, probe) {
      const cpuDir = probe ? undefined : join(dir, 'probe');
      if (kind === 'served')
        return timed(wrappers.block, [action], {
          env: { ...ours, XENBUS_PATH: be, script: '/etc/xen/scripts/block', XEN_BLOCKHOOKS_SERVE_DIR: chan },
          cpuDir,
        });
      if (kind === 'stock')
        return timed(w.stockBlock, [action], {
          env: { ...base, XENBUS_PATH: be, script: '/etc/xen/scripts/block' },
          cpuDir,
        });
      const env = { ...ours, XENBUS_PATH: be, script: '/etc/xen/scripts/block' };
      if (!probe) return timed(wrappers.block, [action], { env, cpuDir });
      env.XBH_BENCH_PROBE_OUT = probe;
      return timed(NODE, ['--import', pathToFileURL(join(runDir, 'probe.mjs')).href, hooks.block, action], {
        env,
        cpuDir,
      });
    },
    async check(kind, action, be, r) {
      if (r.code !== 0)
        throw new Error(
          `${kind} ${action} ${be} exited ${r.code ?? r.signal}: ${r.stderr.trim().split('\n').slice(-3).join(' | ')} ${(await xs.tryRead(`${be}/hotplug-error`)) ?? ''}`,
        );
      if (action === 'add') {
        const st = await xs.tryRead(`${be}/hotplug-status`);
        const pd = await xs.tryRead(`${be}/physical-device`);
        if (st !== 'connected' || !pd)
          throw new Error(`${kind} add ${be}: hotplug-status ${st}, physical-device ${pd}`);
      }
    },
    async close() {
      if (served) {
        const gone = new Promise((r) => served.once('exit', r));
        served.kill('SIGTERM');
        await gone;
      }
      const left = loopsUnder(dir);
      for (const l of left) execFileSync('losetup', ['--detach', l]);
      await xs.close().catch(() => {});
      await server.close().catch(() => {});
      rmSync(dir, { recursive: true, force: true });
      if (left.length) throw new Error(`loop devices left on the bench images: ${left.join(', ')}`);
    },
  };
  return w;
}

/** One add+remove cycle on a fresh backend; returns { add, remove } in ms. */
async function cycle(w, kind, image, probe, { keep = [] } = {}) {
  const { d, be } = await w.disk(image);
  const a = await w.run(kind, 'add', be, probe?.add);
  await w.check(kind, 'add', be, a);
  await w.lib.closeBackend(w.xs, d);
  const r = await w.run(kind, 'remove', be, probe?.remove);
  await w.check(kind, 'remove', be, r);
  await w.lib.destroyNodes(w.xs, d);
  const left = loopsUnder(w.dir).filter((l) => !keep.includes(l));
  if (left.length) throw new Error(`${kind} remove left ${left.join(', ')}`);
  return { add: a.ms, remove: r.ms, addCpu: a.cpuMs, removeCpu: r.cpuMs, addRun: a, removeRun: r };
}

/** Latency of our block vs the stock block (file: disk, add and remove) and bare node, interleaved. */
export async function nativeLatency(lib, w, { runs = 30, warmup = 3 } = {}) {
  w.lib = lib;
  const image = w.image('latency.img');
  const res = {
    ours: { add: [], remove: [], addCpu: [], removeCpu: [] },
    served: { add: [], remove: [], addCpu: [], removeCpu: [] },
    stock: { add: [], remove: [], addCpu: [], removeCpu: [] },
    node: [],
    nodeCpu: [],
    breakdown: { add: [], remove: [] },
  };
  await w.serve();
  const variants = ['ours', 'served', 'stock', 'node', 'probed'];
  log(`native latency: ${warmup} warm-up + ${runs} interleaved rounds of ${variants.join(', ')}`);
  for (let round = 0; round < warmup + runs; round++) {
    const keep = round >= warmup;
    for (const v of rotation(variants, round)) {
      if (v === 'node') {
        const r = await timed(NODE, ['-e', '0'], { cpuDir: join(w.dir, 'probe') });
        if (keep) {
          res.node.push(r.ms);
          if (r.cpuMs !== undefined) res.nodeCpu.push(r.cpuMs);
        }
      } else if (v === 'probed') {
        const probe = { add: join(w.dir, 'probe', `a${round}.json`), remove: join(w.dir, 'probe', `r${round}.json`) };
        const c = await cycle(w, 'ours', image, probe);
        if (keep) {
          res.breakdown.add.push(breakdown(c.addRun, probe.add));
          res.breakdown.remove.push(breakdown(c.removeRun, probe.remove));
        }
      } else {
        const c = await cycle(w, v, image);
        if (keep) {
          res[v].add.push(c.add);
          res[v].remove.push(c.remove);
          if (c.addCpu !== undefined) res[v].addCpu.push(c.addCpu);
          if (c.removeCpu !== undefined) res[v].removeCpu.push(c.removeCpu);
        }
      }
    }
  }
  return res;
}

/** `n` concurrent adds on n different files, then n concurrent removes: total wall, failures, slowest. */
async function concurrentOnce(w, kind, images) {
  const disks = [];
  for (const img of images) disks.push(await w.disk(img));
  const t0 = performance.now();
  const adds = await Promise.all(disks.map(({ be }) => w.run(kind, 'add', be)));
  const addWall = performance.now() - t0;
  let addFailures = 0;
  for (let i = 0; i < disks.length; i++) {
    try {
      await w.check(kind, 'add', disks[i].be, adds[i]);
    } catch (e) {
      addFailures++;
      log(String(e.message));
    }
  }
  const pds = await Promise.all(disks.map(({ be }) => w.xs.tryRead(`${be}/physical-device`)));
  const distinct = new Set(pds.filter(Boolean)).size;
  for (const { d } of disks) await w.lib.closeBackend(w.xs, d);
  const t1 = performance.now();
  const removes = await Promise.all(disks.map(({ be }) => w.run(kind, 'remove', be)));
  const removeWall = performance.now() - t1;
  const removeFailures = removes.filter((r) => r.code !== 0).length;
  for (const { d } of disks) await w.lib.destroyNodes(w.xs, d);
  const left = loopsUnder(w.dir);
  if (left.length) {
    for (const l of left) execFileSync('losetup', ['--detach', l]);
    throw new Error(`${kind}: ${images.length} concurrent removes left ${left.join(', ')}`);
  }
  return {
    addWall,
    removeWall,
    addFailures,
    removeFailures,
    distinctDevices: distinct,
    maxAdd: Math.max(...adds.map((r) => r.ms)),
    maxRemove: Math.max(...removes.map((r) => r.ms)),
  };
}

export async function nativeConcurrency(lib, w, { n = 10, trials = 20, warmup = 1 } = {}) {
  w.lib = lib;
  const images = Array.from({ length: n }, (_, i) => w.image(`conc${i}.img`, 16));
  const res = { n, ours: [], served: [], stock: [] };
  await w.serve();
  log(
    `native concurrency: ${warmup} warm-up + ${trials} alternating trials of ${n} concurrent adds/removes, ours and stock`,
  );
  for (let t = 0; t < warmup + trials; t++) {
    for (const kind of rotation(['ours', 'served', 'stock'], t)) {
      const r = await concurrentOnce(w, kind, images);
      if (t >= warmup) res[kind].push(r);
    }
  }
  return res;
}

/**
 * Start-up: `HOOK --version` of each hook through its wrapper (startup snapshot) and as
 * `node HOOK.mjs` (code cache), vs bare `node -e 0`, interleaved; bundle sizes.
 */
export async function startup(hooks, wrappers, { runs = 30, warmup = 3 } = {}) {
  const names = Object.keys(hooks);
  const variants = ['node -e 0', ...names.flatMap((n) => [`${n} --version`, `node ${n}.mjs --version`])];
  const res = Object.fromEntries(variants.map((v) => [v, []]));
  const cpu = Object.fromEntries(variants.map((v) => [v, []]));
  const cpuDir = mkdtempSync(join(tmpdir(), 'xbh-bench-cpu-'));
  log(`start-up: ${warmup} warm-up + ${runs} interleaved rounds of ${variants.length} commands`);
  for (let round = 0; round < warmup + runs; round++) {
    for (const v of rotation(variants, round)) {
      const [file, args] =
        v === 'node -e 0'
          ? [NODE, ['-e', '0']]
          : v.startsWith('node ')
            ? [NODE, [hooks[v.split(' ')[1].replace(/\.mjs$/, '')], '--version']]
            : [wrappers[v.split(' ')[0]], ['--version']];
      const r = await timed(file, args, { cpuDir });
      if (r.code !== 0) throw new Error(`${v} exited ${r.code}: ${r.stderr}`);
      if (round >= warmup) {
        res[v].push(r.ms);
        if (r.cpuMs !== undefined) cpu[v].push(r.cpuMs);
      }
    }
  }
  rmSync(cpuDir, { recursive: true, force: true });
  // The bundle beside each starter (dist/<name>.cjs; the .mjs only starts it through the code cache).
  const sizes = Object.fromEntries(names.map((n) => [n, statSync(hooks[n].replace(/\.mjs$/, '.cjs')).size]));
  return { times: res, cpu, sizes };
}

/**
 * How an add's cost grows with the disks already on the host: N other vbds in xenstore (each with
 * its physical-device, as connected disks have), for N in `counts`, then interleaved add+remove
 * cycles of stock, ours with the service down and ours with it up, on a phy: disk (a loop device
 * the bench attaches): for a block device the stock script's sharing check reads every other
 * vbd's physical-device with a xenstore-read each (for a file: disk not yet on a loop it skips the
 * walk).
 */
export async function nativeScaling(lib, w, { counts = [0, 50, 200], runs = 10, warmup = 2 } = {}) {
  w.lib = lib;
  await w.serve();
  const loop = execFileSync('losetup', ['--find', '--show', '--', w.image('scaling.img')], { encoding: 'utf8' }).trim();
  const res = { counts, device: 'phy:', ours: {}, served: {}, stock: {} };
  // The earlier parts' cycles leave an empty backend/vbd/<domid> each (libxl removes it with the
  // domain): the stock walk would list those too, so N counts from a clean start.
  await w.xs.rm('backend/vbd');
  try {
    let present = 0;
    for (const n of counts) {
      for (; present < n; present++) {
        const domid = 20000 + present;
        const be = await lib.writeBackendNodes(w.xs, {
          domid,
          devid: 51712,
          params: `/srv/xen/other-${present}.img`,
          mode: 'w',
          vdev: 'xvda',
          script: '/etc/xen/scripts/block',
          domainName: `other${present}`,
          state: 4,
        });
        await w.xs.write(`${be}/physical-device`, `7:${(200 + present).toString(16)}`);
        await w.xs.write(`${be}/physical-device-path`, `/dev/loop${200 + present}`);
        await w.xs.write(`${be}/hotplug-status`, 'connected');
      }
      log(
        `scaling: ${n} other vbds, ${warmup} warm-up + ${runs} interleaved cycles of stock, ours, ours with the service up`,
      );
      for (const k of ['ours', 'served', 'stock']) res[k][n] = { add: [], remove: [] };
      for (let round = 0; round < warmup + runs; round++) {
        for (const v of rotation(['ours', 'served', 'stock'], round)) {
          const c = await cycle(w, v, loop, undefined, { keep: [loop] });
          if (round >= warmup) {
            res[v][n].add.push(c.add);
            res[v][n].remove.push(c.remove);
          }
        }
      }
    }
  } finally {
    execFileSync('losetup', ['--detach', loop]);
  }
  return res;
}
