/**
 * Security properties, each checked rather than promised:
 *   - no shell anywhere: a static scan of src/ and the bundles for shell options, `sh -c` and
 *     child_process exec of strings;
 *   - every user path is passed after `--` (argv recorded from a full add and remove of block-cow);
 *   - stores are made O_EXCL 0600 in a directory only root may write to, never through a symlink;
 *   - only backend-side xenstore nodes are read (every request path recorded by the server);
 *   - the base image is attached read-only and never written (argv, checksum and mtime).
 */
import t, { type Test } from 'tap';
import {
  chmodSync,
  existsSync,
  lstatSync,
  mkdirSync,
  readdirSync,
  readFileSync,
  rmSync,
  statSync,
  symlinkSync,
  writeFileSync,
} from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { cowBackend } from '../../src/backends/cow.js';
import type { Config } from '../../src/config/config.js';
import { runHook } from '../../src/hotplug/main.js';
import { memoryLogger } from '../../src/log/logger.js';
import { connectXenstore } from '../../src/xenstore/client.js';
import { XsOp } from '../../src/xenstore/wire.js';
import { backendPath, closeBackend, writeBackendNodes, type DiskNodes } from '../lib/backend-nodes.js';
import { FakeDeviceRunner, checked, sha256 } from '../lib/fault-lib.js';
import { hookDir } from '../lib/hook-dir.js';

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');

function walk(d: string, ext: RegExp): string[] {
  const out: string[] = [];
  for (const n of readdirSync(d)) {
    const p = join(d, n);
    if (statSync(p).isDirectory()) out.push(...walk(p, ext));
    else if (ext.test(n)) out.push(p);
  }
  return out;
}

t.test('no shell anywhere in src/', async (t) => {
  await checked(
    'all hooks',
    'shell injection (static)',
    'src/ has no shell option, no sh -c, no child_process exec/execSync of a string, no execa template or command()',
    () => {
      const bad: string[] = [];
      for (const f of walk(join(ROOT, 'src'), /\.ts$/)) {
        const text = readFileSync(f, 'utf8');
        text.split('\n').forEach((line, i) => {
          const code = line.replace(/\/\/.*$/, '').replace(/^\s*\*.*$/, '');
          const where = `${f.slice(ROOT.length + 1)}:${i + 1}: ${line.trim()}`;
          if (/\bshell\s*:\s*(true|['"`])/.test(code)) bad.push(where);
          if (/['"`]\/bin\/(ba|da)?sh['"`]|['"`]sh['"`]\s*,\s*\[\s*['"`]-c/.test(code)) bad.push(where);
          if (/\bexecaCommand(Sync)?\b|\$\s*`|execa\s*`/.test(code)) bad.push(where);
        });
        // child_process's exec/execSync run a string through /bin/sh: not even imported.
        for (const m of text.matchAll(/import\s*\{([^}]*)\}\s*from\s*['"](node:)?child_process['"]/g)) {
          const names = (m[1] ?? '').split(',').map((n) => n.trim().split(/\s+as\s+/)[0]);
          if (names.some((n) => n === 'exec' || n === 'execSync'))
            bad.push(`${f.slice(ROOT.length + 1)}: imports exec/execSync from child_process`);
        }
      }
      t.same(bad, [], 'no shell use in src/');
      if (bad.length) throw new Error(bad.join('; '));
    },
    () => t.counts.fail,
  ).catch(() => {});
  const dist = join(ROOT, 'dist');
  await checked(
    'all hooks',
    'shell injection (bundles)',
    'dist/*.mjs and *.cjs pass no literal shell: true',
    () => {
      // npm test builds dist/ first (pretest); without it there is nothing to scan, and that fails.
      const bundles = existsSync(dist) ? readdirSync(dist).filter((f) => /\.(mjs|cjs)$/.test(f)) : [];
      t.ok(bundles.length > 0, `the bundles are built in ${dist} (npm run build)`);
      const hits = bundles.filter((f) => /\bshell\s*:\s*true\b/.test(readFileSync(join(dist, f), 'utf8')));
      t.same(hits, [], 'no bundle passes shell: true');
      if (hits.length) throw new Error(hits.join(', '));
    },
    () => t.counts.fail,
  ).catch(() => {});
});

interface World {
  dir: string;
  images: string;
  base: string;
  config: Config;
  sock: string;
  reqs: { op: number; path: string }[];
}

async function world(t: Test): Promise<World & { xs: Awaited<ReturnType<typeof connectXenstore>> }> {
  const reqs: { op: number; path: string }[] = [];
  const h = await hookDir({
    prefix: 'xbh-sec-',
    base: Buffer.alloc(1024 * 1024, 0x5a),
    onRequest: (op, args) => reqs.push({ op, path: args[0] ?? '' }),
    config: { lockTimeoutMs: 5000 },
  });
  t.teardown(() => h.close());
  const { dir, images, base, config, sock, xs } = h;
  return { dir, images, base, config, sock, reqs, xs };
}

function disk(domid: number, params: string, extra: Partial<DiskNodes> = {}): DiskNodes {
  return { domid, devid: 51712, params, mode: 'w', vdev: 'xvda', domainName: `g${domid}`, ...extra };
}

async function hook(
  w: World,
  action: string,
  be: string,
  fake: FakeDeviceRunner,
): Promise<{ code: number; log: string[] }> {
  const logger = memoryLogger();
  const code = await runHook(
    cowBackend,
    [action],
    { XENBUS_PATH: be },
    {
      connect: () => connectXenstore({ path: w.sock }),
      run: fake,
      config: w.config,
      logger,
      err: () => {},
      out: () => {},
    },
  );
  return { code, log: logger.lines.map((l) => l.msg) };
}

t.test('block-cow: user paths after --, base read-only, store 0600 in a root-only directory', async (t) => {
  const w = await world(t);
  const fake = new FakeDeviceRunner(join(w.dir, 'sys'));
  const sum = sha256(w.base);
  const mtime = statSync(w.base).mtimeMs;
  const dw = disk(5, `${w.base} 16`);
  const dr = disk(6, `${w.base}`, { mode: 'r' });
  const dp = disk(7, `${w.base} 16 store=keep.cow`);
  for (const d of [dw, dr, dp]) {
    const be = await writeBackendNodes(w.xs, d);
    const r = await hook(w, 'add', be, fake);
    t.equal(r.code, 0, `add ${be}: ${r.log.join(' | ')}`);
  }
  const storeFiles = readdirSync(w.config.storeDir).sort();
  await checked(
    'block-cow',
    'argv of a full add (w, r, persistent)',
    'every user path (base, stores, dm names) comes after -- in every command',
    () => {
      const userWords = [w.base, w.config.storeDir];
      const bad = fake.calls
        .filter((c) => c.file !== 'flock')
        .filter((c) => {
          const i = c.args.findIndex((a) => userWords.some((u) => a.startsWith(u)) || a.startsWith('xbh-'));
          return i >= 0 && c.args.indexOf('--') < 0 ? true : i >= 0 && c.args.indexOf('--') > i;
        });
      t.same(
        bad.map((c) => `${c.file} ${c.args.join(' ')}`),
        [],
        'no user path before --',
      );
      t.ok(
        fake.calls.some((c) => c.file === 'losetup' && c.args.includes(w.base)),
        'the base was passed to losetup',
      );
      if (bad.length) throw new Error(bad.map((c) => `${c.file} ${c.args.join(' ')}`).join('; '));
    },
    () => t.counts.fail,
  ).catch(() => {});
  await checked(
    'block-cow',
    'base image access',
    'every losetup of the base is --read-only, the kernel loop is ro, the base checksum and mtime are unchanged',
    () => {
      const baseCalls = fake.calls.filter((c) => c.file === 'losetup' && c.args.includes(w.base));
      t.ok(baseCalls.length >= 1, 'the base was attached');
      t.ok(
        baseCalls.every((c) => c.args.includes('--read-only')),
        'always --read-only',
      );
      const baseIno = String(statSync(w.base).ino);
      t.ok(
        fake.loops.filter((l) => l.ino === baseIno).every((l) => l.ro),
        'its loop is read-only',
      );
      t.equal(sha256(w.base), sum, 'checksum unchanged');
      t.equal(statSync(w.base).mtimeMs, mtime, 'mtime unchanged');
      t.ok(
        fake.dms.every((d) => !d.table.includes(' linear ') || d.ro),
        'the r disk is a read-only dm device',
      );
    },
    () => t.counts.fail,
  );
  await checked(
    'block-cow',
    'store creation',
    "stores are regular files, mode 0600, owned by root, in a 0700 root-owned directory; a persistent store's claim is a 0700 directory with a 0600 owner record",
    () => {
      t.same(
        storeFiles,
        ['keep.cow', 'keep.cow.owner', 'transient-5-51712.cow'],
        "one store per writable disk, and the persistent one's claim",
      );
      const claim = lstatSync(join(w.config.storeDir, 'keep.cow.owner'));
      t.ok(
        claim.isDirectory() && (claim.mode & 0o777) === 0o700 && claim.uid === 0,
        'the claim is a root-owned 0700 directory',
      );
      const owner = lstatSync(join(w.config.storeDir, 'keep.cow.owner', 'owner.json'));
      t.ok(
        owner.isFile() && (owner.mode & 0o777) === 0o600 && owner.uid === 0,
        'its owner record is a root-owned 0600 file',
      );
      const ds = statSync(w.config.storeDir);
      t.equal((ds.mode & 0o777).toString(8), '700', 'store directory 0700');
      t.equal(ds.uid, 0, 'store directory owned by root');
      for (const f of storeFiles.filter((n) => !n.endsWith('.owner'))) {
        const st = lstatSync(join(w.config.storeDir, f));
        t.ok(st.isFile(), `${f} is a regular file`);
        t.equal((st.mode & 0o777).toString(8), '600', `${f} is 0600`);
        t.equal(st.uid, 0, `${f} owned by root`);
      }
    },
    () => t.counts.fail,
  );
  for (const d of [dw, dr, dp]) {
    await closeBackend(w.xs, d);
    const r = await hook(w, 'remove', backendPath(d), fake);
    t.equal(r.code, 0, 'remove');
  }
  t.same(fake.loops, [], 'no loop left');
  t.same(fake.dms, [], 'no dm left');
});

t.test('block-cow: a symlink or a foreign file at the store path, a group-writable store directory', async (t) => {
  const w = await world(t);
  const fake = new FakeDeviceRunner(join(w.dir, 'sys'));
  mkdirSync(w.config.storeDir, { mode: 0o700 });
  const target = join(w.dir, 'victim');
  writeFileSync(target, 'precious');
  symlinkSync(target, join(w.config.storeDir, 'transient-5-51712.cow'));
  symlinkSync(target, join(w.config.storeDir, 'evil.cow'));
  const d1 = disk(5, `${w.base} 16`);
  const d2 = disk(6, `${w.base} 16 store=evil.cow`);
  for (const [name, d] of [
    ['symlink at the transient store path', d1],
    ['persistent store= naming a symlink', d2],
  ] as const) {
    const be = await writeBackendNodes(w.xs, d);
    const r = await hook(w, 'add', be, fake);
    await checked(
      'block-cow',
      name,
      'exit 1, the symlink target is not written, truncated or followed, nothing left attached',
      async () => {
        t.equal(r.code, 1, `${name}: refused`);
        t.match(
          await w.xs.tryRead(`${be}/hotplug-error`),
          /symbolic link|not a regular file|in the way/,
          `${name}: says why`,
        );
        t.equal(readFileSync(target, 'utf8'), 'precious', `${name}: target untouched`);
        t.same(fake.loops, [], `${name}: no loop`);
        t.same(fake.dms, [], `${name}: no dm`);
      },
      () => t.counts.fail,
    );
  }
  rmSync(join(w.config.storeDir, 'transient-5-51712.cow'));
  chmodSync(w.config.storeDir, 0o777);
  const be = backendPath(d1);
  const r = await hook(w, 'add', be, fake);
  await checked(
    'block-cow',
    'store directory writable by others',
    'exit 1, says chmod 700, no store made',
    async () => {
      t.equal(r.code, 1, 'refused');
      t.match(await w.xs.tryRead(`${be}/hotplug-error`), /writable by group or others/, 'says why');
      t.same(readdirSync(w.config.storeDir).sort(), ['evil.cow'], 'no store made');
      t.same(fake.loops, [], 'no loop');
    },
    () => t.counts.fail,
  );
});

t.test('block-cow reads only backend-side xenstore nodes', async (t) => {
  const w = await world(t);
  const fake = new FakeDeviceRunner(join(w.dir, 'sys'));
  const d = disk(9, `${w.base} 16`, { domainName: 'victim' });
  const other = disk(10, `${w.base} 16`, { devid: 51728 });
  await writeBackendNodes(w.xs, other);
  const be = await writeBackendNodes(w.xs, d);
  // What a guest could plant in its own home: none of it may be read, let alone trusted.
  for (const [k, v] of [
    ['device/vbd/51712/params', '/etc/shadow'],
    ['device/vbd/51712/mode', 'w'],
    ['data/params', '/etc/shadow'],
    ['device/vbd/51712/backend', '/local/domain/0/backend/vbd/10/51728'],
  ]) {
    await w.xs.write(`/local/domain/9/${k}`, v as string);
  }
  w.reqs.length = 0;
  const r1 = await hook(w, 'add', be, fake);
  await closeBackend(w.xs, d);
  const r2 = await hook(w, 'remove', be, fake);
  t.equal(r1.code, 0, 'add');
  t.equal(r2.code, 0, 'remove');
  await checked(
    'block-cow',
    'frontend-writable xenstore nodes',
    'every path read (add and remove) is backend-side, or /local/domain/<id>/name or /vm',
    () => {
      const READS = new Set<number>([XsOp.READ, XsOp.DIRECTORY, XsOp.GET_PERMS]);
      const abs = (p: string) => (p.startsWith('/') ? p : `/local/domain/0/${p}`);
      const read = w.reqs.filter((q) => READS.has(q.op)).map((q) => abs(q.path));
      t.ok(read.length > 0, `requests were recorded (${read.length})`);
      const frontendSide = read.filter((p) => {
        const m = /^\/local\/domain\/(\d+)(\/.*)?$/.exec(p);
        if (!m) return false;
        if (m[1] === '0') return false;
        // name and vm are written by libxl into the guest's home, which the guest may only read.
        return m[2] !== '/name' && m[2] !== '/vm';
      });
      t.same([...new Set(frontendSide)], [], 'no read below a guest home but its name and vm');
      t.notOk(
        read.some((p) => p.includes('/device/vbd/')),
        'the frontend directory is never read',
      );
      if (frontendSide.length) throw new Error([...new Set(frontendSide)].join(', '));
    },
    () => t.counts.fail,
  );
});
