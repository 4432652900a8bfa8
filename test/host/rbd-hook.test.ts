/**
 * block-rbd through the real hook runtime (runHook, journal, locks, in-process xenstore) with the
 * `rbd` command replaced by a small simulated cluster (images, snapshots, watchers, mappings)
 * that answers with the exit codes and stderr of real rbd 16.2.15. The real-cluster, real-kernel
 * proof is test/guest/rbd-hook.test.ts; this covers the decisions and the failure paths: which
 * commands run in which order, refusals (busy, wrong parent, missing objects), rollback after a
 * failed or interrupted map, and the migration handover.
 */
import t from 'tap';
import {
  mkdirSync,
  mkdtempSync,
  readdirSync,
  existsSync,
  readFileSync,
  rmSync,
  utimesSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { defaultConfig, type Config } from '../../src/config/config.js';
import { execRunner } from '../../src/devices/exec.js';
import type { RunResult, Runner } from '../../src/devices/runner.js';
import { runHook } from '../../src/hotplug/main.js';
import { memoryLogger } from '../../src/log/logger.js';
import { connectXenstore } from '../../src/xenstore/client.js';
import { startXenstoreServer } from '../../src/xenstore/server.js';
import { cloneMarkerPath, rbdBackend, rbdHost } from '../../src/backends/rbd.js';
import { applyGc, gcPlan } from '../../src/cli/gc.js';
import { takeInventory } from '../../src/cli/inventory.js';
import { Journal } from '../../src/journal/journal.js';
import { closeBackend, destroyNodes, writeBackendNodes, type DiskNodes } from '../lib/backend-nodes.js';

interface Img {
  parent?: string;
  snaps: Map<string, boolean>;
}

/** A cluster as rbd sees it. Watchers are client ids; a mapping on "this host" is one watcher. */
class Sim {
  pools = new Set(['rbd']);
  images = new Map<string, Img>([['rbd/golden', { snaps: new Map([['base', false]]) }]]);
  watchers = new Map<string, number[]>();
  mapped: { spec: string; device: string }[] = [];
  calls: string[] = [];
  nextClient = 4100;
  /** Per subcommand: a failure to inject once. */
  fail = new Map<string, { code: number; stderr: string; thenDo?: () => void }>();
  /** `xl list DOMID`: the state letters of each domain the hypervisor knows (none: xl says it does not exist). */
  xl = new Map<number, string>();

  freeDevice(): string {
    for (let i = 0; ; i++) if (!this.mapped.some((m) => m.device === `/dev/rbd${i}`)) return `/dev/rbd${i}`;
  }

  handle(args: string[]): Partial<RunResult> {
    const words = args.filter(
      (a, i) =>
        !a.startsWith('--') &&
        !(i > 0 && /^--(conf|id|keyring|client_mount_timeout|format|image-feature)$/.test(args[i - 1] as string)) &&
        a !== '-o' &&
        args[args.indexOf(a) - 1] !== '-o',
    );
    const sub = words[0] === 'snap' ? `snap ${words[1]}` : (words[0] as string);
    const target = words[words.length - 1] as string;
    this.calls.push(`${sub} ${sub === 'showmapped' ? '' : target}`.trim());
    const inj = this.fail.get(sub);
    if (inj) {
      this.fail.delete(sub);
      inj.thenDo?.();
      return { exitCode: inj.code, failed: true, stderr: inj.stderr };
    }
    const [spec, snap] = target.split('@') as [string, string | undefined];
    const pool = spec.split('/')[0] as string;
    const enoent = (what: string) => ({ exitCode: 2, failed: true, stderr: what });
    const needImage = () => {
      if (!this.pools.has(pool)) return enoent(`rbd: error opening pool '${pool}': (2) No such file or directory\n`);
      if (!this.images.has(spec))
        return enoent(`rbd: error opening image ${spec.split('/')[1]}: (2) No such file or directory\n`);
      if (snap !== undefined && !this.images.get(spec)?.snaps.has(snap))
        return enoent('error setting snapshot context: (2) No such file or directory\n');
      return undefined;
    };
    const ok = (stdout = '') => ({ exitCode: 0, failed: false, stdout });
    switch (sub) {
      case 'info': {
        const miss = needImage();
        if (miss) return miss;
        const im = this.images.get(spec) as Img;
        const o: Record<string, unknown> = {
          name: spec.split('/')[1],
          id: 'abc',
          size: 16777216,
          features: ['layering'],
        };
        if (im.parent) {
          const [pp, ps] = im.parent.split('@') as [string, string];
          o.parent = {
            pool: pp.split('/')[0],
            pool_namespace: '',
            image: pp.split('/')[1],
            id: 'x',
            snapshot: ps,
            trash: false,
            overlap: 16777216,
          };
        }
        if (snap !== undefined) o.protected = im.snaps.get(snap) ? 'true' : 'false';
        return ok(JSON.stringify(o));
      }
      case 'snap protect': {
        const miss = needImage();
        if (miss) return miss;
        const im = this.images.get(spec) as Img;
        if (im.snaps.get(snap as string))
          return { exitCode: 16, failed: true, stderr: 'rbd: snap is already protected\n' };
        im.snaps.set(snap as string, true);
        return ok();
      }
      case 'clone': {
        const child = target;
        const parent = words[words.length - 2] as string;
        if (this.images.has(child))
          return { exitCode: 17, failed: true, stderr: 'rbd: clone error: (17) File exists\n' };
        this.images.set(child, { parent, snaps: new Map() });
        return ok();
      }
      case 'status': {
        const miss = needImage();
        if (miss) return miss;
        const ws = this.watchers.get(spec) ?? [];
        return ok(
          JSON.stringify({ watchers: ws.map((c) => ({ address: `127.0.0.1:0/${c * 7}`, client: c, cookie: 1 })) }),
        );
      }
      case 'map': {
        const miss = needImage();
        if (miss) return miss;
        const device = this.freeDevice();
        this.mapped.push({ spec: target, device });
        this.watchers.set(spec, [...(this.watchers.get(spec) ?? []), this.nextClient++]);
        return ok(`${device}\n`);
      }
      case 'showmapped':
        return ok(
          JSON.stringify(
            this.mapped.map((m, i) => {
              const [s, sn] = m.spec.split('@') as [string, string | undefined];
              return {
                id: String(i),
                pool: s.split('/')[0],
                namespace: '',
                name: s.split('/')[1],
                snap: sn ?? '-',
                device: m.device,
              };
            }),
          ),
        );
      case 'unmap': {
        const m = this.mapped.find((x) => x.device === target);
        if (!m) return { exitCode: 22, failed: true, stderr: 'rbd: unmap failed: (22) Invalid argument\n' };
        this.mapped = this.mapped.filter((x) => x !== m);
        const s = m.spec.split('@')[0] as string;
        this.watchers.set(s, (this.watchers.get(s) ?? []).slice(1));
        return ok();
      }
      case 'rm': {
        if (!this.images.has(target))
          return {
            exitCode: 2,
            failed: true,
            stderr: 'Removing image: 0% complete...failed.\nrbd: delete error: (2) No such file or directory\n',
          };
        if ((this.watchers.get(target) ?? []).length)
          return { exitCode: 16, failed: true, stderr: 'rbd: error: image still has watchers\n' };
        this.images.delete(target);
        return ok();
      }
      default:
        return { exitCode: 22, failed: true, stderr: `unexpected rbd ${sub}` };
    }
  }

  runner(): Runner {
    const real = execRunner();
    const exec = async (file: string, args: readonly string[]): Promise<RunResult> => {
      const r = this.handle([...args]);
      return {
        command: `${file} ${args.join(' ')}`,
        exitCode: r.exitCode ?? 0,
        signal: undefined,
        stdout: r.stdout ?? '',
        stderr: r.stderr ?? '',
        durationMs: 1,
        failed: r.failed ?? false,
        timedOut: false,
      };
    };
    const xl = async (args: readonly string[]): Promise<RunResult> => {
      const id = Number(args[1]);
      const st = this.xl.get(id);
      const line = `${`dom${id}`.padEnd(40)} ${String(id).padStart(5)}   256     1     ${st}      12.3`;
      return {
        command: `xl ${args.join(' ')}`,
        exitCode: st ? 0 : 1,
        signal: undefined,
        stdout: st ? `Name                                        ID   Mem VCPUs\tState\tTime(s)\n${line}\n` : '',
        stderr: st ? '' : `Invalid domain identifier: ${id}`,
        durationMs: 1,
        failed: !st,
        timedOut: false,
      };
    };
    return {
      probe: (file, args, opts) =>
        file === 'rbd' ? exec(file, args) : file === 'xl' ? xl(args) : real.probe(file, args, opts),
      run: async (file, args, opts) => {
        if (file !== 'rbd') return real.run(file, args, opts);
        const r = await exec(file, args);
        if (r.failed) throw new Error(r.stderr);
        return r;
      },
    };
  }

  images_(): string[] {
    return [...this.images.keys()].sort();
  }
}

async function world(t: { teardown(fn: () => unknown): void }) {
  const root = mkdtempSync(join(tmpdir(), 'xbh-rbd-hook-'));
  t.teardown(() => rmSync(root, { recursive: true, force: true }));
  // A fake sysfs with the devices the simulated map hands out.
  const sys = join(root, 'sys');
  for (let i = 0; i < 8; i++) {
    mkdirSync(join(sys, 'block', `rbd${i}`), { recursive: true });
    writeFileSync(join(sys, 'block', `rbd${i}`, 'dev'), `251:${i * 16}\n`);
    writeFileSync(join(sys, 'block', `rbd${i}`, 'ro'), '0\n');
  }
  mkdirSync(join(sys, 'bus', 'rbd'), { recursive: true });
  const saved = { ...rbdHost };
  rbdHost.sysRoot = sys;
  rbdHost.udevControl = join(root, 'no-udev-control');
  t.teardown(() => Object.assign(rbdHost, saved));
  const server = await startXenstoreServer({ socketPath: join(root, 'xs.sock') });
  t.teardown(() => server.close());
  const xs = await connectXenstore({ path: server.socketPath });
  t.teardown(() => xs.close());
  const sim = new Sim();
  const configFor = (state: string): Config => ({
    ...defaultConfig(),
    storeDir: join(root, 'store'),
    stateDir: join(root, state),
    logFile: '',
    lockTimeoutMs: 5000,
    busyRetryMs: 200,
  });
  let devid = 51712;
  const disk = (domid: number, params: string, extra: Partial<DiskNodes> = {}): DiskNodes => ({
    domid,
    devid: ++devid,
    params,
    mode: 'w',
    vdev: 'xvda',
    domainName: `dom${domid}`,
    script: '/etc/xen/scripts/block-rbd',
    ...extra,
  });
  const hook = async (action: 'add' | 'remove', d: DiskNodes, state = 'state') => {
    const be = action === 'add' ? await writeBackendNodes(xs, d) : `backend/vbd/${d.domid}/${d.devid}`;
    if (action === 'remove') await closeBackend(xs, d);
    const log = memoryLogger();
    const code = await runHook(
      rbdBackend,
      [action],
      { XENBUS_PATH: be },
      {
        config: configFor(state),
        logger: log,
        run: sim.runner(),
        connect: () => connectXenstore({ path: server.socketPath }),
        err: () => {},
        out: () => {},
      },
    );
    const res = {
      code,
      error: await xs.tryRead(`${be}/hotplug-error`),
      status: await xs.tryRead(`${be}/hotplug-status`),
      path: await xs.tryRead(`${be}/physical-device-path`),
      pd: await xs.tryRead(`${be}/physical-device`),
      log,
    };
    if (action === 'remove') await destroyNodes(xs, d);
    return res;
  };
  const journal = (state = 'state') => {
    const d = join(root, state, 'journal');
    return existsSync(d) ? readdirSync(d) : [];
  };
  return { root, sys, sim, disk, hook, journal, configFor, xs };
}

t.test(
  'add protects the snapshot, clones, maps with noudev; remove unmaps and deletes the transient clone',
  async (t) => {
    const w = await world(t);
    const d = w.disk(1, 'rbd/golden@base conf=/etc/ceph/t.conf');
    const a = await w.hook('add', d);
    t.equal(a.code, 0, a.error ?? '');
    t.equal(a.status, 'connected');
    t.equal(a.path, '/dev/rbd0');
    t.equal(a.pd, 'fb:0', 'physical-device from sysfs, hex');
    t.strictSame(
      w.sim.calls,
      ['info rbd/golden@base', 'snap protect rbd/golden@base', 'clone rbd/xbh-dom1-xvda', 'map rbd/xbh-dom1-xvda'],
      'a fresh transient clone: no look before rbd clone',
    );
    t.strictSame(w.sim.images_(), ['rbd/golden', 'rbd/xbh-dom1-xvda']);
    t.equal(w.sim.images.get('rbd/xbh-dom1-xvda')?.parent, 'rbd/golden@base');
    w.sim.calls = [];
    const again = await w.hook('add', d);
    t.equal(again.code, 0, 'a second add of a connected disk is a no-op');
    t.strictSame(w.sim.calls, [], 'and runs nothing');
    const r = await w.hook('remove', d);
    t.equal(r.code, 0);
    t.strictSame(w.sim.calls, ['showmapped', 'unmap /dev/rbd0', 'rm rbd/xbh-dom1-xvda']);
    t.strictSame(w.sim.images_(), ['rbd/golden']);
    t.strictSame(w.sim.mapped, []);
    t.strictSame(w.journal(), []);
    t.equal((await w.hook('remove', d)).code, 0, 'remove twice is fine');
  },
);

t.test("map options: noudev only without udevd; the user's options pass through", async (t) => {
  const w = await world(t);
  writeFileSync(rbdHost.udevControl, '');
  const seen: string[][] = [];
  const orig = w.sim.handle.bind(w.sim);
  w.sim.handle = (args) => {
    if (args[0] === 'map' || args[0] === 'unmap') seen.push(args);
    return orig(args);
  };
  const d = w.disk(1, 'rbd/golden@base map_options=queue_depth=64');
  t.equal((await w.hook('add', d)).code, 0);
  t.equal((await w.hook('remove', d)).code, 0);
  t.strictSame(seen[0]?.slice(0, 3), ['map', '-o', 'queue_depth=64'], 'udevd runs: no noudev');
  t.strictSame(seen[1]?.[1], '--client_mount_timeout', 'unmap without -o');
});

t.test('access=r maps the snapshot read-only and makes no clone', async (t) => {
  const w = await world(t);
  writeFileSync(join(w.sys, 'block', 'rbd0', 'ro'), '1\n');
  const d = w.disk(1, 'rbd/golden@base', { mode: 'r' });
  const a = await w.hook('add', d);
  t.equal(a.code, 0, a.error ?? '');
  t.strictSame(w.sim.calls, ['info rbd/golden@base', 'showmapped', 'map rbd/golden@base'], 'no protect, no clone');
  t.strictSame(w.sim.images_(), ['rbd/golden']);
  t.equal((await w.hook('remove', d)).code, 0);
  t.strictSame(w.sim.mapped, []);
  // The kernel saying "writable" for a read-only disk is a failure, undone.
  writeFileSync(join(w.sys, 'block', 'rbd0', 'ro'), '0\n');
  const bad = await w.hook('add', w.disk(2, 'rbd/golden@base', { mode: 'r' }));
  t.equal(bad.code, 1);
  t.match(bad.error, /should be read-only/);
  t.strictSame(w.sim.mapped, [], 'the mapping was undone');
});

t.test('missing pool, image, snapshot: a clear error, no rbd command beyond the look', async (t) => {
  const w = await world(t);
  const cases: [string, RegExp][] = [
    ['nopool/golden@base', /pool "nopool" does not exist/],
    ['rbd/nothere@base', /image "nothere" does not exist in pool "rbd"/],
    ['rbd/golden@gone', /has no snapshot "gone"; create it with "rbd snap create rbd\/golden@gone"/],
  ];
  for (const [params, re] of cases) {
    w.sim.calls = [];
    const a = await w.hook('add', w.disk(1, params));
    t.equal(a.code, 1, params);
    t.equal(a.status, 'error');
    t.match(a.error, re);
    t.strictSame(w.sim.calls, [`info ${params}`], `${params}: only the look`);
  }
  w.sim.calls = [];
  const bad = await w.hook('add', w.disk(1, 'rbd/golden@base; rm -rf /'));
  t.equal(bad.code, 1);
  t.match(bad.error, /not pool\/image@snapshot|not a key=value option|not accepted/);
  t.strictSame(w.sim.calls, [], 'bad params run nothing');
  t.strictSame(w.sim.images_(), ['rbd/golden']);
  t.strictSame(w.journal(), []);
});

t.test(
  'sharing: a watched clone is busy; a transient clone that is not ours is busy; a clone of another snapshot is refused',
  async (t) => {
    const w = await world(t);
    w.sim.images.get('rbd/golden')?.snaps.set('base', true);
    // Another host has dom1's persistent clone mapped.
    w.sim.images.set('rbd/xbh-dom1-xvda', { parent: 'rbd/golden@base', snaps: new Map() });
    w.sim.watchers.set('rbd/xbh-dom1-xvda', [9001]);
    const a = await w.hook('add', w.disk(1, 'rbd/golden@base clone=persistent'));
    t.equal(a.code, 1);
    t.equal(a.status, 'busy');
    t.match(
      a.error,
      /rbd\/xbh-dom1-xvda is open by client\.9001 at 127\.0\.0\.1:0\/63007 .*never given to a second writer/,
    );
    t.notOk(w.sim.calls.includes('map rbd/xbh-dom1-xvda'));
    // Once nobody watches it, the persistent clone is reused (no second clone).
    w.sim.watchers.set('rbd/xbh-dom1-xvda', []);
    w.sim.calls = [];
    const d = w.disk(1, 'rbd/golden@base clone=persistent');
    t.equal((await w.hook('add', d)).code, 0);
    t.notOk(
      w.sim.calls.some((c) => c.startsWith('clone')),
      'reused, not cloned',
    );
    // On this host a second disk of the same domain and vdev is busy before asking the cluster.
    w.sim.calls = [];
    const second = await w.hook('add', w.disk(1, 'rbd/golden@base clone=persistent'));
    t.equal(second.status, 'busy');
    t.match(second.error, /already in use on this host by backend\/vbd\/1\/\d+ \(domain dom1\)/);
    t.strictSame(w.sim.calls, ['info rbd/golden@base']);
    t.equal((await w.hook('remove', d)).code, 0);
    t.strictSame(w.sim.images_(), ['rbd/golden', 'rbd/xbh-dom1-xvda'], 'a persistent clone survives remove');

    // A transient clone someone else left: not reused, not deleted.
    w.sim.images.set('rbd/xbh-dom2-xvda', { parent: 'rbd/golden@base', snaps: new Map() });
    const tr = await w.hook('add', w.disk(2, 'rbd/golden@base'));
    t.equal(tr.status, 'busy');
    t.match(tr.error, /transient clone rbd\/xbh-dom2-xvda already exists and no record on this host made it/);
    t.ok(w.sim.images.has('rbd/xbh-dom2-xvda'), 'left alone');

    // An image of that name that is a clone of something else.
    w.sim.images.set('rbd/xbh-dom3-xvda', { parent: 'rbd/golden@other', snaps: new Map() });
    const wrong = await w.hook('add', w.disk(3, 'rbd/golden@base clone=persistent'));
    t.equal(wrong.code, 1);
    t.match(wrong.error, /exists and is a clone of rbd\/golden@other, not of rbd\/golden@base/);
    t.strictSame(w.journal(), []);
  },
);

t.test('failures leave no mapping and no clone', async (t) => {
  const w = await world(t);
  // map fails: the clone this add made is deleted again.
  w.sim.fail.set('map', { code: 1, stderr: 'rbd: sysfs write failed\nrbd: map failed: (5) Input/output error\n' });
  const a = await w.hook('add', w.disk(1, 'rbd/golden@base'));
  t.equal(a.code, 1);
  t.match(a.error, /cannot map rbd\/xbh-dom1-xvda: map failed: \(5\) Input\/output error/);
  t.strictSame(w.sim.images_(), ['rbd/golden']);
  t.strictSame(w.journal(), []);

  // map "fails" (e.g. timed out) after the kernel mapped it: the new mapping is found and unmapped.
  w.sim.fail.set('map', {
    code: 110,
    stderr: 'rbd: map failed: (110) Connection timed out\n',
    thenDo: () => w.sim.mapped.push({ spec: 'rbd/xbh-dom2-xvda', device: '/dev/rbd5' }),
  });
  const b = await w.hook('add', w.disk(2, 'rbd/golden@base'));
  t.equal(b.code, 1);
  t.strictSame(w.sim.mapped, [], 'the mapping the failed map left is gone');
  t.strictSame(w.sim.images_(), ['rbd/golden']);

  // The clone appears between our look and our clone (another host): ours to refuse, not to delete.
  w.sim.fail.set('clone', {
    code: 17,
    stderr: 'rbd: clone error: (17) File exists\n',
    thenDo: () => w.sim.images.set('rbd/xbh-dom3-xvda', { parent: 'rbd/golden@base', snaps: new Map() }),
  });
  const c = await w.hook('add', w.disk(3, 'rbd/golden@base'));
  t.equal(c.status, 'busy');
  t.match(c.error, /already exists and no record on this host made it/);
  t.ok(w.sim.images.has('rbd/xbh-dom3-xvda'), "the other host's clone is not deleted");
  t.notOk(w.sim.calls.includes('rm rbd/xbh-dom3-xvda'));
  t.strictSame(w.journal(), []);

  // The device's sysfs entry is missing after map: unmap by the recorded device, delete the clone.
  w.sim.images.delete('rbd/xbh-dom3-xvda');
  rmSync(join(w.sys, 'block', 'rbd0'), { recursive: true });
  const e = await w.hook('add', w.disk(4, 'rbd/golden@base'));
  t.equal(e.code, 1);
  t.strictSame(w.sim.mapped, []);
  t.strictSame(w.sim.images_(), ['rbd/golden']);
});

t.test(
  "live migration: the receiver (NAME--incoming) maps the sender's clone; the sender's remove keeps it; the receiver's remove deletes it",
  async (t) => {
    const w = await world(t);
    const src = w.disk(1, 'rbd/golden@base', { domainName: 'web' });
    t.equal((await w.hook('add', src)).code, 0);
    const dst = w.disk(7, 'rbd/golden@base', { domainName: 'web--incoming' });
    const a = await w.hook('add', dst, 'state-dst');
    t.equal(a.code, 0, a.error ?? '');
    t.equal(w.sim.mapped.length, 2, 'both ends map the clone');
    t.strictSame(w.sim.images_(), ['rbd/golden', 'rbd/xbh-web-xvda']);
    t.ok(a.log.lines.some((l) => /taking it over for a live migration/.test(l.msg)));
    const rs = await w.hook('remove', src);
    t.equal(rs.code, 0);
    t.ok(
      rs.log.lines.some((l) => /keeping rbd\/xbh-web-xvda: it still has watchers/.test(l.msg)),
      'kept, and says why',
    );
    t.strictSame(w.sim.images_(), ['rbd/golden', 'rbd/xbh-web-xvda']);
    t.equal(w.sim.mapped.length, 1);
    t.equal((await w.hook('remove', dst, 'state-dst')).code, 0);
    t.strictSame(w.sim.images_(), ['rbd/golden']);
    t.strictSame(w.sim.mapped, []);

    // A receiver whose map fails leaves the sender's clone alone.
    t.equal((await w.hook('add', src)).code, 0);
    w.sim.fail.set('map', { code: 1, stderr: 'rbd: map failed: (5) Input/output error\n' });
    const failed = await w.hook('add', w.disk(8, 'rbd/golden@base', { domainName: 'web--incoming' }), 'state-dst');
    t.equal(failed.code, 1);
    t.strictSame(w.sim.images_(), ['rbd/golden', 'rbd/xbh-web-xvda'], 'the sender keeps its disk');
    t.equal(w.sim.mapped.length, 1);
    t.equal((await w.hook('remove', src)).code, 0);
    t.strictSame(w.sim.images_(), ['rbd/golden']);
  },
);

t.test(
  "a crash leaves a transient clone in the cluster: this host's marker lets the next add replace it and gc delete it; another host's clone stays refused",
  async (t) => {
    const w = await world(t);
    const config = w.configFor('state');
    const crash = async (d: DiskNodes) => {
      // Every mapping and /run (the journal) gone; the clone stays in the cluster, the marker in store_dir.
      w.sim.mapped = [];
      w.sim.watchers.clear();
      rmSync(join(w.root, 'state'), { recursive: true, force: true });
      await destroyNodes(w.xs, d);
    };
    const d5 = w.disk(5, 'rbd/golden@base');
    t.equal((await w.hook('add', d5)).code, 0);
    const marker = cloneMarkerPath(config, 'rbd', 'xbh-dom5-xvda');
    t.match(
      JSON.parse(readFileSync(marker, 'utf8')),
      { pool: 'rbd', image: 'xbh-dom5-xvda', backendPath: `backend/vbd/5/${d5.devid}` },
      'the marker names the clone and its disk',
    );
    await crash(d5);

    // The same domain and vdev again: its own leftover is deleted and cloned afresh.
    w.sim.calls = [];
    const again = w.disk(5, 'rbd/golden@base');
    const a = await w.hook('add', again);
    t.equal(a.code, 0, a.error ?? '');
    t.strictSame(w.sim.calls, [
      'info rbd/golden@base',
      'clone rbd/xbh-dom5-xvda',
      'info rbd/xbh-dom5-xvda',
      'status rbd/xbh-dom5-xvda',
      'rm rbd/xbh-dom5-xvda',
      'clone rbd/xbh-dom5-xvda',
      'map rbd/xbh-dom5-xvda',
    ]);
    t.ok(
      a.log.lines.some(
        (l) =>
          l.level === 'warn' &&
          /deleting leftover transient clone rbd\/xbh-dom5-xvda \(made by this host .* for backend\/vbd\/5\/\d+; no record holds it and nobody has it open\)/.test(
            l.msg,
          ),
      ),
    );
    t.equal((await w.hook('remove', again)).code, 0);
    t.strictSame(w.sim.images_(), ['rbd/golden']);
    t.notOk(existsSync(marker), 'the remove deletes the marker with the clone');

    // A leftover no add comes for: gc deletes it (once it is older than a minute).
    const d6 = w.disk(6, 'rbd/golden@base');
    t.equal((await w.hook('add', d6)).code, 0);
    await crash(d6);
    const marker6 = cloneMarkerPath(config, 'rbd', 'xbh-dom6-xvda');
    const journal = new Journal(config.stateDir);
    const quiet = { dmAvailable: false, dm: [], loops: [], nbds: [] };
    const young = await takeInventory({ config, run: w.sim.runner(), xs: undefined, journal, kernel: quiet });
    t.strictSame(
      young.rows.filter((r) => r.kind === 'rbd'),
      [],
      "a marker younger than a minute is nobody's leftover yet",
    );
    const old = Date.now() / 1000 - 600;
    utimesSync(marker6, old, old);
    const inv = await takeInventory({ config, run: w.sim.runner(), xs: undefined, journal, kernel: quiet });
    const plan = gcPlan(inv, { withoutXenstore: false }).filter((i) => i.row.kind === 'rbd');
    t.equal(plan.length, 1);
    t.match(
      plan[0]?.action,
      /^rbd rm rbd\/xbh-dom6-xvda: transient RBD clone this host made .* for backend\/vbd\/6\/\d+, which no record holds \(left by a crash or a reboot\)$/,
    );
    // Mapped again somewhere before gc gets to it: left alone, the marker kept.
    w.sim.watchers.set('rbd/xbh-dom6-xvda', [42]);
    const busy = await applyGc(plan, { config, run: w.sim.runner(), log: memoryLogger(), xs: undefined, journal });
    t.match(busy[0]?.error, /rbd\/xbh-dom6-xvda is open somewhere \(it has watchers\); left alone/);
    t.ok(existsSync(marker6));
    w.sim.watchers.clear();
    const done = await applyGc(plan, { config, run: w.sim.runner(), log: memoryLogger(), xs: undefined, journal });
    t.strictSame(
      done.map((r) => r.ok),
      [true],
    );
    t.strictSame(w.sim.images_(), ['rbd/golden']);
    t.notOk(existsSync(marker6));

    // The same domain and vdev made persistent after a crash of its transient disk: the clone
    // becomes the persistent one, and the old marker goes, so neither gc nor a later add deletes it.
    const d8 = w.disk(8, 'rbd/golden@base');
    t.equal((await w.hook('add', d8)).code, 0);
    await crash(d8);
    const marker8 = cloneMarkerPath(config, 'rbd', 'xbh-dom8-xvda');
    t.ok(existsSync(marker8));
    utimesSync(marker8, old, old);
    const p8 = w.disk(8, 'rbd/golden@base clone=persistent');
    t.equal((await w.hook('add', p8)).code, 0);
    t.notOk(existsSync(marker8), 'the persistent add drops the transient marker of that name');
    t.equal((await w.hook('remove', p8)).code, 0);
    t.ok(w.sim.images.has('rbd/xbh-dom8-xvda'), 'the persistent clone stays after its remove');
    const inv8 = await takeInventory({ config, run: w.sim.runner(), xs: undefined, journal, kernel: quiet });
    t.strictSame(
      inv8.rows.filter((r) => r.kind === 'rbd'),
      [],
      'gc never plans the persistent clone',
    );
    w.sim.images.delete('rbd/xbh-dom8-xvda');

    // Another host's marker (a shared store_dir) does not make its clone this host's leftover.
    w.sim.images.set('rbd/xbh-dom7-xvda', { parent: 'rbd/golden@base', snaps: new Map() });
    const marker7 = cloneMarkerPath(config, 'rbd', 'xbh-dom7-xvda');
    const other = JSON.stringify({
      pool: 'rbd',
      image: 'xbh-dom7-xvda',
      cluster: {},
      backendPath: 'backend/vbd/7/51712',
      machine: 'another-machine',
      host: 'elsewhere',
      boot: 'b',
      made: '2026-01-01T00:00:00.000Z',
    });
    writeFileSync(marker7, other);
    utimesSync(marker7, old, old);
    const tr = await w.hook('add', w.disk(7, 'rbd/golden@base'));
    t.equal(tr.status, 'busy');
    t.match(tr.error, /transient clone rbd\/xbh-dom7-xvda already exists and no record on this host made it/);
    t.ok(w.sim.images.has('rbd/xbh-dom7-xvda'), 'left alone');
    t.equal(readFileSync(marker7, 'utf8'), other, "the other host's marker is untouched");
    const inv7 = await takeInventory({ config, run: w.sim.runner(), xs: undefined, journal, kernel: quiet });
    t.strictSame(
      inv7.rows.filter((r) => r.kind === 'rbd'),
      [],
      "gc never plans another host's clone",
    );
  },
);

t.test(
  'clone=persistent through a save, a dom0 restart, a migration and a bootloader attach: the same clone every time, never a new one',
  async (t) => {
    const w = await world(t);
    const params = 'rbd/golden@base clone=persistent';
    const clones = () => w.sim.calls.filter((c) => c.startsWith('clone'));
    const d1 = w.disk(1, params, { domainName: 'web' });
    const a = await w.hook('add', d1);
    t.equal(a.code, 0, a.error ?? 'xl create');
    t.strictSame(clones(), ['clone rbd/xbh-web-xvda']);

    // xl save: the domain is suspended while its remove runs. Its data is in the clone, so the
    // mapping goes as at any remove and the clone stays.
    w.sim.xl.set(1, '--pss-');
    const saved = await w.hook('remove', d1);
    w.sim.xl.delete(1);
    t.equal(saved.code, 0, "the save's remove");
    t.strictSame(w.sim.images_(), ['rbd/golden', 'rbd/xbh-web-xvda'], 'the clone stays');
    t.strictSame(w.sim.mapped, []);
    t.strictSame(w.journal(), []);
    t.notOk(
      w.sim.calls.some((c) => c.startsWith('rm')),
      'nothing deleted',
    );

    // xl restore: a new domid, the same name.
    w.sim.calls = [];
    const d2 = w.disk(2, params, { domainName: 'web' });
    const restored = await w.hook('add', d2);
    t.equal(restored.code, 0, restored.error ?? 'xl restore');
    t.strictSame(clones(), [], 'no new clone');
    t.ok(w.sim.calls.includes('map rbd/xbh-web-xvda'), 'the same clone mapped');

    // A dom0 restart: every mapping and /run go; the clone stays in the cluster.
    w.sim.mapped = [];
    w.sim.watchers.clear();
    rmSync(join(w.root, 'state'), { recursive: true, force: true });
    await destroyNodes(w.xs, d2);
    w.sim.calls = [];
    const d3 = w.disk(3, params, { domainName: 'web' });
    const after = await w.hook('add', d3);
    t.equal(after.code, 0, after.error ?? 'restore after the restart');
    t.strictSame(clones(), [], 'no new clone');
    t.ok(w.sim.calls.includes('map rbd/xbh-web-xvda'), 'the same clone mapped');
    t.equal((await w.hook('remove', d3)).code, 0);
    t.strictSame(w.sim.images_(), ['rbd/golden', 'rbd/xbh-web-xvda']);

    // A live migration on one host: the receiver (NAME--incoming) maps the same clone while the
    // sender still has it; the sender's remove and then the receiver's keep it.
    const src = w.disk(5, params, { domainName: 'web' });
    t.equal((await w.hook('add', src)).code, 0);
    w.sim.calls = [];
    const dst = w.disk(6, params, { domainName: 'web--incoming' });
    const recv = await w.hook('add', dst, 'state-dst');
    t.equal(recv.code, 0, recv.error ?? 'the receiver');
    t.strictSame(clones(), [], 'no new clone');
    t.strictSame(
      w.sim.mapped.map((m) => m.spec),
      ['rbd/xbh-web-xvda', 'rbd/xbh-web-xvda'],
      'both ends map the same clone',
    );
    t.equal((await w.hook('remove', src)).code, 0, "the sender's remove");
    t.equal((await w.hook('remove', dst, 'state-dst')).code, 0, "the receiver's remove");
    t.strictSame(w.sim.images_(), ['rbd/golden', 'rbd/xbh-web-xvda'], 'the clone stays');
    t.strictSame(w.sim.mapped, []);

    // pygrub: the disk attached to dom0 (frontend 0). Named after its domain, the clone would be
    // dom0's own: refused, nothing run.
    w.sim.calls = [];
    const boot = await w.hook('add', w.disk(0, params, { domainName: 'Domain-0' }));
    t.equal(boot.code, 1);
    t.match(boot.error, /block-rbd: this disk is being attached to dom0 .*name it explicitly with name=IMAGE/);
    t.strictSame(w.sim.calls, [], 'no rbd command');
    t.strictSame(w.sim.images_(), ['rbd/golden', 'rbd/xbh-web-xvda'], 'no clone of its own');
    // Named explicitly, the bootloader maps the very clone the guest gets.
    const named = 'rbd/golden@base clone=persistent name=web-root';
    const g = w.disk(4, named, { domainName: 'web' });
    t.equal((await w.hook('add', g)).code, 0);
    t.equal((await w.hook('remove', g)).code, 0);
    w.sim.calls = [];
    const b = w.disk(0, named, { domainName: 'Domain-0' });
    const booted = await w.hook('add', b);
    t.equal(booted.code, 0, booted.error ?? 'bootloader attach');
    t.strictSame(clones(), [], "no clone: the guest's");
    t.ok(w.sim.calls.includes('map rbd/web-root'), 'the guest clone mapped for the bootloader');
    t.equal((await w.hook('remove', b)).code, 0);
    t.strictSame(w.sim.images_(), ['rbd/golden', 'rbd/web-root', 'rbd/xbh-web-xvda'], 'both clones kept');
    t.strictSame(w.sim.mapped, []);
  },
);
