/**
 * Hostile and broken input against block-cow (and block-qcow's backing-file checks), through the
 * real hook runtime (runHook) with an in-process xenstore and a runner that plays losetup and
 * dmsetup in memory. Every case must end with: exit 1 (2 for a bad command line),
 * hotplug-status error|busy and a hotplug-error sentence (when the backend path is one we may write
 * to), no device command run for a refusal the plan makes, no journal record, no store, the base
 * image's sha256 and mtime unchanged, no file created anywhere in the test's tree outside the
 * state directory's (empty) folders, and no xenstore node written but hotplug-status/-error.
 */
import t, { type Test } from 'tap';
import { execFileSync } from 'node:child_process';
import {
  chmodSync,
  existsSync,
  mkdirSync,
  readdirSync,
  renameSync,
  statSync,
  symlinkSync,
  writeFileSync,
} from 'node:fs';
import { join } from 'node:path';
import { cowBackend } from '../../src/backends/cow.js';
import { qcowBackend } from '../../src/backends/qcow.js';
import type { Backend } from '../../src/backends/types.js';
import type { Config } from '../../src/config/config.js';
import { execRunner } from '../../src/devices/exec.js';
import type { Runner } from '../../src/devices/runner.js';
import { runHook } from '../../src/hotplug/main.js';
import { memoryLogger } from '../../src/log/logger.js';
import { connectXenstore } from '../../src/xenstore/client.js';
import { startXenstoreServer, type XenstoreServer } from '../../src/xenstore/server.js';
import type { XenstoreClient } from '../../src/xenstore/types.js';
import { writeBackendNodes, type DiskNodes } from '../lib/backend-nodes.js';
import { FakeDeviceRunner, checked, sha256, snapshotTree, treeChanges } from '../lib/fault-lib.js';
import { hookDir } from '../lib/hook-dir.js';

const HOOK = 'block-cow';

interface World {
  dir: string;
  images: string;
  outside: string;
  base: string;
  config: Config;
  server: XenstoreServer;
  xs: XenstoreClient;
  sock: string;
  reads: string[];
}

async function world(t: Test): Promise<World> {
  const buf = Buffer.alloc(1024 * 1024);
  for (let i = 0; i < buf.length; i += 4) buf.writeUInt32LE((i * 2654435761) >>> 0, i);
  const reads: string[] = [];
  const h = await hookDir({
    prefix: 'xbh-hostile-',
    base: buf,
    onRequest: (_op, args) => reads.push(args[0] ?? ''),
    config: { lockTimeoutMs: 5000 },
  });
  t.teardown(() => h.close());
  const { dir, images, base, config, server, xs, sock } = h;
  const outside = join(dir, 'outside');
  mkdirSync(outside);
  return { dir, images, outside, base, config, server, xs, sock, reads };
}

function disk(domid: number, params: string, extra: Partial<DiskNodes> = {}): DiskNodes {
  return { domid, devid: 51712, params, mode: 'w', vdev: 'xvda', domainName: `g${domid}`, ...extra };
}

interface Outcome {
  code: number;
  stderr: string;
  log: string[];
  runner: FakeDeviceRunner;
}

async function runCow(
  w: World,
  action: string,
  env: NodeJS.ProcessEnv,
  opts: { runner?: Runner; backend?: Backend; connect?: () => Promise<XenstoreClient> } = {},
): Promise<Outcome> {
  const fake = new FakeDeviceRunner(join(w.dir, 'sys'));
  const logger = memoryLogger();
  let stderr = '';
  const code = await runHook(opts.backend ?? cowBackend, [action], env, {
    connect: opts.connect ?? (() => connectXenstore({ path: w.sock })),
    run: opts.runner ?? fake,
    config: w.config,
    logger,
    err: (s) => (stderr += `${s}\n`),
    out: () => {},
  });
  return { code, stderr, log: logger.lines.map((l) => `${l.level} ${l.msg}`), runner: fake };
}

/** A sentence a person can act on: not a stack, not a catch-all, names something. */
function readable(t: Test, msg: string | undefined, what: string): void {
  t.ok(msg !== undefined && msg.length >= 20, `${what}: hotplug-error is a sentence (${JSON.stringify(msg)})`);
  t.notMatch(
    msg ?? '',
    /\n\s+at |\[object |undefined|failed unexpectedly|TypeError|ERR_[A-Z_]+/,
    `${what}: no stack, no catch-all`,
  );
}

function ls(p: string): string[] {
  try {
    return readdirSync(p);
  } catch {
    return [];
  }
}

interface Case {
  name: string;
  params?: string;
  /** Set up files before the run; may return params. */
  setup?: (w: World) => string | void;
  nodes?: Partial<DiskNodes>;
  /** Remove or rewrite nodes after writing them. */
  after?: (w: World, be: string) => Promise<void>;
  re: RegExp;
  status?: 'error' | 'busy';
}

/**
 * Run one refused add and check everything the brief promises. `deviceFree`: the refusal happens
 * in the plan, before any device command.
 */
async function refused(t: Test, w: World, c: Case, domid: number, deviceFree = true): Promise<void> {
  const params = c.setup?.(w) ?? c.params ?? '';
  const d = disk(domid, params, c.nodes);
  const be = await writeBackendNodes(w.xs, d);
  await c.after?.(w, be);
  const sumBefore = sha256(w.base);
  const mtimeBefore = statSync(w.base).mtimeMs;
  const treeBefore = snapshotTree(w.dir);
  const storeBefore = new Map(w.server.store.dump('/'));
  const storeDirBefore = existsSync(w.config.storeDir);
  const r = await runCow(w, 'add', { XENBUS_PATH: be });
  const f0 = t.counts.fail;
  await checked(
    HOOK,
    `hostile input: ${c.name}`,
    `exit 1, hotplug-status=${c.status ?? 'error'}, readable hotplug-error, no device command, nothing left, base unchanged, no file outside the store`,
    async () => {
      t.equal(r.code, 1, `${c.name}: exit 1 (${r.log.join(' | ')})`);
      const status = await w.xs.tryRead(`${be}/hotplug-status`);
      const error = await w.xs.tryRead(`${be}/hotplug-error`);
      t.equal(status, c.status ?? 'error', `${c.name}: hotplug-status`);
      readable(t, error, c.name);
      t.match(error ?? '', c.re, `${c.name}: says why`);
      t.equal(await w.xs.tryRead(`${be}/physical-device`), undefined, `${c.name}: no physical-device`);
      if (deviceFree) t.same(r.runner.deviceCalls(), [], `${c.name}: no device command ran`);
      t.same(r.runner.loops, [], `${c.name}: no loop`);
      t.same(r.runner.dms, [], `${c.name}: no dm device`);
      t.same(ls(join(w.config.stateDir, 'journal')), [], `${c.name}: no journal record`);
      t.same(ls(join(w.config.stateDir, 'locks')), [], `${c.name}: no lock file`);
      t.same(ls(w.config.storeDir), [], `${c.name}: no store`);
      t.equal(existsSync(w.config.storeDir), storeDirBefore, `${c.name}: the store directory was not even created`);
      t.equal(sha256(w.base), sumBefore, `${c.name}: base checksum unchanged`);
      t.equal(statSync(w.base).mtimeMs, mtimeBefore, `${c.name}: base mtime unchanged`);
      const changes = treeChanges(treeBefore, snapshotTree(w.dir), [
        w.config.stateDir,
        w.config.storeDir,
        w.config.xenLockDir,
        join(w.dir, 'sys'),
      ]);
      t.same(changes, [], `${c.name}: no file created or changed outside the store and state folders`);
      const written = w.server.store
        .dump('/')
        .filter(([p, v]) => storeBefore.get(p) !== v)
        .map(([p]) => p);
      const abs = `/local/domain/0/${be}`;
      t.same(
        written.filter((p) => p !== `${abs}/hotplug-status` && p !== `${abs}/hotplug-error`),
        [],
        `${c.name}: only hotplug-status/-error written to xenstore`,
      );
      if (process.env.HOSTILE_DEBUG)
        console.error(`## ${c.name}: code ${r.code} ${status}: ${error} :: ${r.log.join(' | ')}`);
      if (t.counts.fail > f0) throw new Error(`${c.name}: ${error ?? r.log.join(' | ')}`);
    },
    () => t.counts.fail,
  ).catch(() => {});
  await w.xs.rm(be);
}

t.test('base image and params: refused in the plan, nothing touched', async (t) => {
  const w = await world(t);
  const I = w.images;
  const cases: Case[] = [
    { name: 'missing base', params: `${I}/nope.img 16`, re: /does not exist/ },
    {
      name: 'base is a directory',
      setup: (w) => (mkdirSync(join(w.images, 'd.img')), `${w.images}/d.img`),
      re: /is a directory/,
    },
    {
      name: 'base is a FIFO',
      setup: (w) => (execFileSync('mkfifo', [join(w.images, 'f.img')]), `${w.images}/f.img 16`),
      re: /is a FIFO/,
    },
    {
      name: 'base is a character device node',
      setup: (w) => (execFileSync('mknod', [join(w.images, 'null.img'), 'c', '1', '3']), `${w.images}/null.img`),
      re: /character device/,
    },

    {
      name: 'base is a socket',
      setup: (w) => (
        execFileSync('python3', [
          '-c',
          `import socket;s=socket.socket(socket.AF_UNIX);s.bind(${JSON.stringify(join(w.images, 's.img'))})`,
        ]),
        `${w.images}/s.img`
      ),
      re: /socket/,
    },
    {
      name: 'symlink inside pointing outside',
      setup: (w) => (
        writeFileSync(join(w.outside, 'secret.img'), Buffer.alloc(4096, 7)),
        symlinkSync(join(w.outside, 'secret.img'), join(w.images, 'esc.img')),
        `${w.images}/esc.img 16`
      ),
      re: /resolves to .*secret\.img\) lies outside the allowed image directories/,
    },
    {
      name: 'dangling symlink',
      setup: (w) => (
        symlinkSync(join(w.outside, 'nothing'), join(w.images, 'dangling.img')),
        `${w.images}/dangling.img`
      ),
      re: /does not exist/,
    },
    {
      name: 'symlink loop',
      setup: (w) => (
        symlinkSync(join(w.images, 'loop-b.img'), join(w.images, 'loop-a.img')),
        symlinkSync(join(w.images, 'loop-a.img'), join(w.images, 'loop-b.img')),
        `${w.images}/loop-a.img`
      ),
      re: /cannot be resolved: a loop of symbolic links/,
    },
    {
      name: 'symlinked directory leading out',
      setup: (w) => (symlinkSync('/etc', join(w.images, 'etc')), `${w.images}/etc/passwd`),
      re: /resolves to \/etc\/passwd\) lies outside/,
    },
    {
      name: 'base outside the image directories',
      params: '/etc/passwd 16',
      re: /lies outside the allowed image directories/,
    },
    { name: 'base outside via ..', params: `${I}/../outside/x.img`, re: /contains "\.\."/ },
    { name: '.. that resolves back inside', params: `${I}/../images/base.img`, re: /contains "\.\."/ },
    { name: 'base is the image directory itself', params: `${I}`, re: /is a directory/ },
    {
      name: 'shell metacharacters ;',
      setup: (w) => `${w.images}/base.img;touch ${w.dir}/pwned`,
      re: /does not exist|not inside/,
    },
    {
      name: 'shell metacharacters $()',
      setup: (w) => `${w.images}/$(touch ${w.dir}/pwned2).img`,
      re: /does not exist/,
    },
    {
      name: 'shell metacharacters backticks and pipes',
      setup: (w) => `${w.images}/\`id\`|cat&.img`,
      re: /does not exist/,
    },
    {
      name: 'terminal escape sequence in the path',
      setup: (w) => `${w.images}/base.img\u001b[2J\u0007`,
      re: /contains control characters/,
    },
    {
      name: 'NUL byte in the path',
      setup: (w) => `${w.images}/base.img\u0000/../../etc/passwd`,
      re: /contains "\.\."|cannot resolve|control|not inside/,
    },
    {
      name: "very long path (3000 bytes, the error sentence would pass xenstore's limit)",
      setup: (w) => `${w.images}/${'a'.repeat(3000)}.img`,
      re: /^The base image path is too long for the kernel \(\d+ bytes, ENAMETOOLONG\)/,
    },
    {
      name: 'size not numeric (a path with a space, then)',
      setup: (w) => `${w.images}/base.img lots`,
      re: /^The base image \/\S+\/images\/base\.img lots does not exist \(or a symlink on the way leads nowhere\)\. The params were read as the path "\/\S+\/images\/base\.img lots" and the words the grammar takes after it: a path may hold spaces, and a word after it that is neither a size nor an option is part of it\.$/,
    },
    { name: 'empty params', params: '', re: /params is missing or empty/ },
    { name: 'whitespace-only params', params: '   \t ', re: /params is missing or empty/ },
    { name: 'params missing', params: 'x', after: async (w, be) => w.xs.rm(`${be}/params`), re: /params is missing/ },
    { name: 'mode x', setup: (w) => `${w.images}/base.img`, nodes: { mode: 'x' as 'w' }, re: /neither r nor w/ },
    {
      name: 'mode w! (no sharing check)',
      setup: (w) => `${w.images}/base.img`,
      nodes: { mode: 'w!' as 'w' },
      re: /not supported/,
    },
    {
      name: 'mode missing',
      setup: (w) => `${w.images}/base.img`,
      after: async (w, be) => w.xs.rm(`${be}/mode`),
      re: /mode is missing/,
    },
    {
      name: 'empty base image (0 bytes)',
      setup: (w) => (writeFileSync(join(w.images, 'empty.img'), ''), `${w.images}/empty.img`),
      re: /0 bytes/,
    },
    {
      name: 'backend already closing (state 6)',
      setup: (w) => `${w.images}/base.img`,
      nodes: { state: 6 },
      re: /is closing/,
    },
  ];
  let domid = 10;
  for (const c of cases) await refused(t, w, c, domid++);
  t.notOk(
    ls(w.dir).some((f) => f.startsWith('pwned')),
    'no shell ever ran the metacharacters',
  );
});

t.test('non-UTF-8 bytes in params (raw xenstore value)', async (t) => {
  const w = await world(t);
  const c: Case = {
    name: 'non-UTF-8 bytes in the base path',
    params: 'placeholder',
    after: async (w, be) =>
      w.server.store.write(
        `/local/domain/0/${be}/params`,
        Buffer.concat([Buffer.from(`${w.images}/b`), Buffer.from([0xff, 0xfe, 0xc3, 0x28]), Buffer.from('.img 16')]),
      ),
    re: /does not exist/,
  };
  await refused(t, w, c, 40);
});

t.test('XENBUS_PATH hostile: refused before a single xenstore write', async (t) => {
  const w = await world(t);
  await writeBackendNodes(w.xs, disk(5, `${w.base} 16`));
  const paths: [string, string | undefined, number, RegExp][] = [
    ['XENBUS_PATH missing', undefined, 2, /XENBUS_PATH is not set/],
    ['XENBUS_PATH empty', '', 1, /XENBUS_PATH is empty/],
    ['XENBUS_PATH is the frontend', '/local/domain/5/device/vbd/51712', 1, /not a block backend path/],
    ['XENBUS_PATH with ..', 'backend/vbd/5/51712/../../../../local/domain/5', 1, /contains "\.\."/],
    ['XENBUS_PATH of another device class', 'backend/vif/5/0', 1, /not a block backend path/],
    ['XENBUS_PATH below a backend', 'backend/vbd/5/51712/params', 1, /not a block backend path/],
    ['XENBUS_PATH with a newline', 'backend/vbd/5/51712\n', 1, /not a block backend path/],
    ['XENBUS_PATH absolute under a guest home', '/local/domain/5/backend/vbd/5/51712', 1, /.*/],
  ];
  for (const [name, p, code, re] of paths) {
    const before = w.server.store.dump('/');
    const tree = snapshotTree(w.dir);
    const env: NodeJS.ProcessEnv = p === undefined ? {} : { XENBUS_PATH: p };
    const r = await runCow(w, 'add', env);
    const f0 = t.counts.fail;
    await checked(
      HOOK,
      `hostile input: ${name}`,
      `exit ${code}, one clear line on stderr, xenstore untouched, nothing created`,
      async () => {
        if (name.includes('guest home')) {
          // A well-formed absolute path below a guest's home: the runtime accepts the shape; the
          // nodes are not there, so the add fails on the missing params and writes only the error.
          t.equal(r.code, 1, `${name}: exit 1`);
          t.same(r.runner.deviceCalls(), [], `${name}: no device command`);
        } else {
          t.equal(r.code, code, `${name}: exit ${code}`);
          t.match(r.stderr, re, `${name}: says why (${r.stderr.trim()})`);
          t.same(w.server.store.dump('/'), before, `${name}: nothing written to xenstore`);
          t.same(r.runner.calls, [], `${name}: no command at all`);
        }
        t.same(treeChanges(tree, snapshotTree(w.dir), [w.config.stateDir]), [], `${name}: no file created`);
        t.same(ls(join(w.config.stateDir, 'journal')), [], `${name}: no journal record`);
        if (t.counts.fail > f0) throw new Error(`${name}: exit ${r.code}: ${r.stderr}`);
      },
      () => t.counts.fail,
    ).catch(() => {});
  }
});

t.test('xenstore absent or closing mid-transaction', async (t) => {
  const w = await world(t);
  const d = disk(6, `${w.base} 16`);
  const be = await writeBackendNodes(w.xs, d);
  {
    const tree = snapshotTree(w.dir);
    const r = await runCow(
      w,
      'add',
      { XENBUS_PATH: be },
      { connect: () => connectXenstore({ path: join(w.dir, 'no-such.sock'), timeoutMs: 1000 }) },
    );
    const f0 = t.counts.fail;
    await checked(
      HOOK,
      'xenstore socket absent (add)',
      'exit 1, the reason logged, no command run, nothing created',
      async () => {
        t.equal(r.code, 1, 'exit 1');
        t.match(r.log.join('\n'), /cannot reach xenstore/, 'says xenstore cannot be reached');
        t.same(r.runner.calls, [], 'no command ran');
        t.same(treeChanges(tree, snapshotTree(w.dir), [w.config.stateDir]), [], 'nothing created');
        if (t.counts.fail > f0) throw new Error(r.log.join(' | '));
      },
      () => t.counts.fail,
    ).catch(() => {});
  }
  {
    const r = await runCow(
      w,
      'remove',
      { XENBUS_PATH: be },
      { connect: () => connectXenstore({ path: join(w.dir, 'no-such.sock'), timeoutMs: 1000 }) },
    );
    const f0 = t.counts.fail;
    await checked(
      HOOK,
      'xenstore socket absent (remove, nothing recorded)',
      'exit 0 from the journal alone, nothing run',
      async () => {
        t.equal(r.code, 0, 'remove without xenstore and without a record is a no-op');
        t.same(r.runner.deviceCalls(), [], 'no device command');
        if (t.counts.fail > f0) throw new Error(r.log.join(' | '));
      },
      () => t.counts.fail,
    ).catch(() => {});
  }
  // The connection dies when the hook starts its success transaction: everything built is undone.
  {
    const sumBefore = sha256(w.base);
    const server2Sock = join(w.dir, 'xs2.sock');
    let victim: XenstoreClient | undefined;
    const server2 = await startXenstoreServer({
      socketPath: server2Sock,
      onRequest: (op) => {
        if (op === 6 /* TRANSACTION_START */ && victim) void server2.close();
      },
    });
    const xs2 = await connectXenstore({ path: server2Sock });
    const be2 = await writeBackendNodes(xs2, d);
    await xs2.close();
    const r = await runCow(
      w,
      'add',
      { XENBUS_PATH: be2 },
      {
        connect: async () => {
          victim = await connectXenstore({ path: server2Sock, timeoutMs: 2000 });
          return victim;
        },
      },
    );
    const f0 = t.counts.fail;
    await checked(
      HOOK,
      'xenstore closing mid-transaction (success report)',
      'exit 1, every device built is undone, no record, no store, base unchanged',
      async () => {
        t.equal(r.code, 1, `exit 1 (${r.log.join(' | ')})`);
        t.ok(
          r.runner.deviceCalls().some((c) => c.file === 'dmsetup' && c.args[0] === 'create'),
          'the device was built before the report',
        );
        t.same(r.runner.loops, [], 'loops undone');
        t.same(r.runner.dms, [], 'dm device undone');
        t.same(ls(join(w.config.stateDir, 'journal')), [], 'no record');
        t.same(ls(w.config.storeDir), [], 'no store');
        t.equal(sha256(w.base), sumBefore, 'base unchanged');
        if (t.counts.fail > f0) throw new Error(r.log.join(' | '));
      },
      () => t.counts.fail,
    ).catch(() => {});
    await server2.close().catch(() => {});
  }
});

t.test('persistent store already attached to another domain: busy, the other disk untouched', async (t) => {
  const w = await world(t);
  const fake = new FakeDeviceRunner(join(w.dir, 'sys'));
  const a = disk(7, `${w.base} 16 store=shared.cow`);
  const b = disk(8, `${w.base} 16 store=shared.cow`);
  const beA = await writeBackendNodes(w.xs, a);
  const beB = await writeBackendNodes(w.xs, b);
  const ra = await runCow(w, 'add', { XENBUS_PATH: beA }, { runner: fake });
  t.equal(ra.code, 0, `first domain attaches the store (${ra.log.join(' | ')})`);
  const loopsBefore = JSON.stringify(fake.loops);
  const dmsBefore = JSON.stringify(fake.dms);
  const sumBefore = sha256(w.base);
  const rb = await runCow(w, 'add', { XENBUS_PATH: beB }, { runner: fake });
  const f0 = t.counts.fail;
  await checked(
    HOOK,
    'persistent store attached to another domain',
    'exit 1, hotplug-status=busy, names the other disk, the first disk keeps its loops and dm device, store kept',
    async () => {
      t.equal(rb.code, 1, 'exit 1');
      t.equal(await w.xs.tryRead(`${beB}/hotplug-status`), 'busy', 'busy');
      const msg = await w.xs.tryRead(`${beB}/hotplug-error`);
      readable(t, msg, 'store busy');
      t.match(
        msg ?? '',
        /shared\.cow is already in use by \/dev\/loop1 \(disk backend\/vbd\/7\/51712\)/,
        'says the store is in use, by which loop and which disk',
      );
      t.equal(JSON.stringify(fake.loops), loopsBefore, 'the first disk keeps its loops');
      t.equal(JSON.stringify(fake.dms), dmsBefore, 'the first disk keeps its dm device');
      t.same(
        ls(w.config.storeDir).sort(),
        ['shared.cow', 'shared.cow.owner'],
        "the store and the first disk's claim stay, nothing else made",
      );
      t.equal((statSync(join(w.config.storeDir, 'shared.cow')).mode & 0o777).toString(8), '600', 'store mode 0600');
      t.equal(sha256(w.base), sumBefore, 'base unchanged');
      t.same(ls(join(w.config.stateDir, 'journal')), ['backend~vbd~7~51712.json'], 'only the first disk has a record');
      if (t.counts.fail > f0) throw new Error(msg ?? rb.log.join(' | '));
    },
    () => t.counts.fail,
  ).catch(() => {});
  const rr = await runCow(w, 'remove', { XENBUS_PATH: beA }, { runner: fake });
  t.equal(rr.code, 0, 'first disk removed');
  t.same(fake.loops, [], 'no loops');
  t.same(fake.dms, [], 'no dm');
  t.same(ls(w.config.storeDir), ['shared.cow'], "the store stays, its claim goes with the first disk's remove");
  t.same(ls(join(w.config.stateDir, 'journal')), [], 'no record');
});

t.test('a symlinked directory swapped after the check: the loop must be over the checked file', async (t) => {
  const w = await world(t);
  // images/sub is a real directory at check time, and a symlink to outside/ when losetup opens it.
  mkdirSync(join(w.images, 'sub'));
  writeFileSync(join(w.images, 'sub', 'base.img'), Buffer.alloc(1024 * 1024, 1));
  writeFileSync(join(w.outside, 'base.img'), Buffer.alloc(1024 * 1024, 2));
  const fake = new FakeDeviceRunner(join(w.dir, 'sys'));
  let swapped = false;
  fake.onCall = (file, args) => {
    if (!swapped && file === 'losetup' && args[0] === '--find') {
      renameSync(join(w.images, 'sub'), join(w.images, 'sub.old'));
      symlinkSync(w.outside, join(w.images, 'sub'));
      swapped = true;
    }
  };
  const d = disk(9, `${w.images}/sub/base.img 16`);
  const be = await writeBackendNodes(w.xs, d);
  const outsideIno = String(statSync(join(w.outside, 'base.img')).ino);
  const r = await runCow(w, 'add', { XENBUS_PATH: be }, { runner: fake });
  t.ok(swapped, 'the directory was swapped between the check and losetup');
  const attachedOutside = fake.loops.some((l) => l.ino === outsideIno);
  const row = {
    hook: HOOK,
    fault: 'directory swapped for a symlink after the check (TOCTOU)',
    checked: 'the loop is over the file that was checked, or the add is refused and the redirected loop detached',
  };
  await checked(
    row.hook,
    row.fault,
    row.checked,
    async () => {
      t.notOk(attachedOutside, 'no loop over the file outside image_dirs');
      t.equal(r.code, 1, 'refused');
      t.match(await w.xs.tryRead(`${be}/hotplug-error`), /changed while it was being attached/);
    },
    () => t.counts.fail,
  );
  await runCow(w, 'remove', { XENBUS_PATH: be }, { runner: fake });
  t.same(fake.loops, [], 'no loop left');
});

t.test('a block device base passes the plan (its st_size is 0)', async (t) => {
  const w = await world(t);
  // A loop device node: the loop driver makes the device when it is opened.
  execFileSync('mknod', [join(w.images, 'disk0'), 'b', '7', '251']);
  const { planCow } = await import('../../src/backends/cow.js');
  await checked(
    HOOK,
    'block device as the base',
    'the plan accepts it and records its major:minor',
    () => {
      const plan = planCow(
        {
          params: `${w.images}/disk0 16`,
          mode: 'w',
          frontendId: 3,
          vdev: 'xvda',
          type: 'phy',
          state: 2,
          domainName: 'g3',
        },
        { config: w.config, xenbusPath: 'backend/vbd/3/51712' },
      );
      t.equal(plan.baseRdev, '7:251', 'the block device is the base');
    },
    () => t.counts.fail,
  );
});

t.test('block-qcow: backing files outside the image directories or on a device', async (t) => {
  const w = await world(t);
  const img = (...args: string[]) => execFileSync('qemu-img', args, { stdio: ['ignore', 'ignore', 'pipe'] });
  img('create', '-q', '-f', 'raw', join(w.outside, 'secret.raw'), '4M');
  img('create', '-q', '-f', 'qcow2', '-b', join(w.outside, 'secret.raw'), '-F', 'raw', join(w.images, 'escape.qcow2'));
  execFileSync('mknod', [join(w.images, 'zero'), 'c', '1', '5']);
  img(
    'create',
    '-q',
    '-f',
    'qcow2',
    '-u',
    '-b',
    join(w.images, 'zero'),
    '-F',
    'raw',
    join(w.images, 'dev.qcow2'),
    '4M',
  );
  execFileSync('mknod', [join(w.images, 'blk'), 'b', '7', '252']);
  img(
    'create',
    '-q',
    '-f',
    'qcow2',
    '-u',
    '-b',
    join(w.images, 'blk'),
    '-F',
    'raw',
    join(w.images, 'blockdev.qcow2'),
    '4M',
  );
  chmodSync(join(w.images, 'escape.qcow2'), 0o644);
  const cases: [string, string, RegExp][] = [
    [
      'qcow2 backing file outside the image directories',
      `${w.images}/escape.qcow2 overlay=transient`,
      /outside|not inside|lies outside/,
    ],
    ['qcow2 backing file is a character device', `${w.images}/dev.qcow2 overlay=transient`, /character device|device/],
    ['qcow2 backing file is a block device', `${w.images}/blockdev.qcow2`, /block device/],
  ];
  let domid = 50;
  for (const [name, params, re] of cases) {
    const d = disk(domid++, params, { script: '/etc/xen/scripts/block-qcow' });
    const be = await writeBackendNodes(w.xs, d);
    const sums = new Map(
      ls(w.images)
        .filter((f) => f.endsWith('.qcow2') || f.endsWith('.raw'))
        .map((f) => [f, sha256(join(w.images, f))]),
    );
    const secret = sha256(join(w.outside, 'secret.raw'));
    const tree = snapshotTree(w.dir);
    const logger = memoryLogger();
    const code = await runHook(
      qcowBackend,
      ['add'],
      { XENBUS_PATH: be },
      {
        connect: () => connectXenstore({ path: w.sock }),
        run: execRunner(),
        config: w.config,
        logger,
        err: () => {},
        out: () => {},
      },
    );
    const f0 = t.counts.fail;
    await checked(
      'block-qcow',
      `hostile input: ${name}`,
      'exit 1, hotplug-status=error, readable hotplug-error, images and backing unchanged, nothing created',
      async () => {
        t.equal(code, 1, `${name}: exit 1`);
        t.equal(await w.xs.tryRead(`${be}/hotplug-status`), 'error', `${name}: error`);
        const msg = await w.xs.tryRead(`${be}/hotplug-error`);
        readable(t, msg, name);
        t.match(msg ?? '', re, `${name}: says why (${msg})`);
        for (const [f, s] of sums) t.equal(sha256(join(w.images, f)), s, `${name}: ${f} unchanged`);
        t.equal(sha256(join(w.outside, 'secret.raw')), secret, `${name}: the outside file unchanged`);
        t.same(
          treeChanges(tree, snapshotTree(w.dir), [w.config.stateDir, w.config.storeDir]),
          [],
          `${name}: nothing created`,
        );
        t.same(ls(w.config.storeDir), [], `${name}: no overlay`);
        t.same(ls(join(w.config.stateDir, 'journal')), [], `${name}: no record`);
        if (t.counts.fail > f0) throw new Error(msg ?? logger.lines.map((l) => l.msg).join(' | '));
      },
      () => t.counts.fail,
    ).catch(() => {});
  }
});

t.test(
  'a store directory below a symbolic link (e.g. /var/lib on another disk) is not mistaken for a redirected loop',
  async (t) => {
    const w = await world(t);
    const real = join(w.dir, 'real-parent');
    mkdirSync(real);
    symlinkSync(real, join(w.dir, 'via'));
    w.config.storeDir = join(w.dir, 'via', 'store');
    const fake = new FakeDeviceRunner(join(w.dir, 'sys'));
    const d = disk(12, `${w.base} 16`);
    const be = await writeBackendNodes(w.xs, d);
    const r = await runCow(w, 'add', { XENBUS_PATH: be }, { runner: fake });
    t.equal(r.code, 0, `add over a symlinked store directory: ${r.log.join(' | ')}`);
    t.ok(
      fake.loops.some((l) => l.file.startsWith(w.config.storeDir)),
      'the store loop is attached',
    );
    await runCow(w, 'remove', { XENBUS_PATH: be }, { runner: fake });
    t.same(fake.loops, [], 'no loop left');
  },
);

t.test('the store filesystem is full (a real tmpfs filled up): refused before anything is built', async (t) => {
  const w = await world(t);
  const mnt = join(w.dir, 'full');
  mkdirSync(mnt);
  try {
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=512k,mode=0700', 'xbh-full', mnt], { stdio: 'pipe' });
  } catch (e) {
    t.fail(`cannot mount a tmpfs here (the test needs root): ${(e as Error).message}`);
    return;
  }
  t.teardown(() => {
    execFileSync('umount', [mnt]);
  });
  w.config.storeDir = join(mnt, 'store');
  mkdirSync(w.config.storeDir, { mode: 0o700 });
  // Fill it: writes until ENOSPC.
  const filler = join(mnt, 'filler');
  try {
    writeFileSync(filler, Buffer.alloc(1024 * 1024, 1));
  } catch (e) {
    t.equal((e as NodeJS.ErrnoException).code, 'ENOSPC', 'the filler ran out of space');
  }
  await refused(
    t,
    w,
    {
      name: 'store filesystem full',
      params: `${w.base} 16`,
      re: /store directory .*has only \d+ KiB free of 512 KiB \(its filesystem is full\)/,
    },
    13,
  );
});
