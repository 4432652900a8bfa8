/**
 * Harness for the host-tier tests of the bundled `block` hook: a xenstore server, images in a
 * temporary directory, the hook run as a child process the way libxl runs it, and a teardown that
 * detaches every loop device left on the test's images (by device and inode numbers, so deleted
 * images are found too) and reports them, so a leak fails the test instead of staying on the host.
 */
import { execFile, execFileSync, spawn } from 'node:child_process';
import {
  existsSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  realpathSync,
  rmSync,
  statSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { basename, dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { decodeDev } from '../../src/devices/sysfs.js';
import { connectXenstore } from '../../src/xenstore/client.js';
import { startXenstoreServer, type XenstoreServer } from '../../src/xenstore/server.js';
import type { XenstoreClient } from '../../src/xenstore/types.js';
import { writeBackendNodes, type DiskNodes } from './backend-nodes.js';

export interface TestStore {
  dir: string;
  socketPath: string;
  server: XenstoreServer;
  xs: XenstoreClient;
  close(): Promise<void>;
}

/** A xenstore server on a socket in a fresh temporary directory, with a client connected to it. */
export async function startTestStore(prefix = 'xbh-xs-'): Promise<TestStore> {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  const socketPath = join(dir, 'xenstored.sock');
  const server = await startXenstoreServer({ socketPath });
  const xs = await connectXenstore({ path: socketPath, timeoutMs: 5000 });
  return {
    dir,
    socketPath,
    server,
    xs,
    async close() {
      await xs.close().catch(() => {});
      await server.close().catch(() => {});
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

export interface DomainSpec {
  domid: number;
  name?: string;
  /** The VM's uuid; `null` leaves the `vm` node out. Default: one uuid per domid. */
  uuid?: string | null;
  /** A device-model stub domain names the guest it serves here. */
  target?: number;
}

/** /local/domain/<domid>/{name,domid,vm[,target]} and /vm/<uuid>, as libxl writes them. */
export async function writeDomain(xs: XenstoreClient, d: DomainSpec): Promise<void> {
  const uuid = d.uuid === undefined ? `00000000-0000-4000-8000-${String(d.domid).padStart(12, '0')}` : d.uuid;
  const name = d.name ?? `guest${d.domid}`;
  await xs.transaction(async (tx) => {
    await tx.write(`/local/domain/${d.domid}/name`, name);
    await tx.write(`/local/domain/${d.domid}/domid`, String(d.domid));
    if (uuid !== null) {
      await tx.write(`/local/domain/${d.domid}/vm`, `/vm/${uuid}`);
      await tx.write(`/vm/${uuid}/name`, name);
      await tx.write(`/vm/${uuid}/uuid`, uuid);
    }
    if (d.target !== undefined) await tx.write(`/local/domain/${d.domid}/target`, String(d.target));
  });
}

export interface HookRun {
  code: number | null;
  signal: string | null;
  stdout: string;
  stderr: string;
}

/** The environment libxl gives a block script (plus `extra`). */
export function hookEnv(
  socketPath: string,
  xenbusPath: string,
  extra: Record<string, string> = {},
): Record<string, string> {
  return {
    PATH: process.env.PATH ?? '/usr/sbin:/usr/bin:/sbin:/bin',
    XENSTORED_PATH: socketPath,
    XENBUS_PATH: xenbusPath,
    XENBUS_TYPE: 'vbd',
    XENBUS_BASE_PATH: 'backend',
    ...extra,
  };
}

/** Run `file args` (a bundled hook with process.execPath when it ends in .mjs, else the file itself), stdin /dev/null. */
export function runProcess(
  file: string,
  args: string[],
  env: Record<string, string>,
  timeoutMs = 60_000,
): Promise<HookRun> {
  const [cmd, argv] = file.endsWith('.mjs') ? [process.execPath, [file, ...args]] : [file, args];
  return new Promise((resolve) => {
    const child = execFile(cmd, argv, { env, timeout: timeoutMs, encoding: 'utf8' }, (err, stdout, stderr) => {
      const e = err as (Error & { code?: number | string; signal?: string }) | null;
      resolve({
        code: e ? (typeof e.code === 'number' ? e.code : null) : 0,
        signal: e?.signal ?? null,
        stdout,
        stderr,
      });
    });
    child.stdin?.end();
  });
}

export const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');
export const BLOCK_BUNDLE = join(ROOT, 'dist', 'block.mjs');

/** dist/block.mjs (built by `npm run build`, which setup.sh runs), or an Error saying so. */
export function blockBundle(): string {
  if (!existsSync(BLOCK_BUNDLE)) throw new Error(`${BLOCK_BUNDLE} is missing: run "npm run build" first`);
  return BLOCK_BUNDLE;
}

export interface LoopRow {
  name: string;
  backFile: string;
  back: string;
  ro: boolean;
}

/** Every attached loop device (`losetup --list --json`). */
export function loops(): LoopRow[] {
  const text = execFileSync('losetup', ['--list', '--json', '--output', 'NAME,BACK-FILE,BACK-MAJ:MIN,BACK-INO,RO'], {
    encoding: 'utf8',
  });
  if (!text.trim()) return [];
  const doc = JSON.parse(text) as { loopdevices: Record<string, unknown>[] };
  return doc.loopdevices.map((d) => {
    const mm = String(d['back-maj:min'] ?? '')
      .trim()
      .split(':')
      .map(Number);
    return {
      name: String(d.name),
      backFile: String(d['back-file'] ?? ''),
      back: `${mm[0]}:${mm[1]}:${String(d['back-ino'] ?? '').trim()}`,
      ro: d.ro === true || d.ro === '1',
    };
  });
}

export function identity(path: string): string {
  const st = statSync(path, { bigint: true });
  const { major, minor } = decodeDev(st.dev);
  return `${major}:${minor}:${st.ino}`;
}

export interface BlockHarness {
  store: TestStore;
  dir: string;
  stateDir: string;
  xenLockDir: string;
  hook: string;
  /** A sparse image of `mib` MiB in the test directory; its identity is tracked for cleanup. */
  image(name: string, mib?: number): string;
  /** Track an identity (e.g. of a file made another way) for cleanup. */
  track(path: string): void;
  /** Loops over the tracked images (by identity). */
  loopsOnImages(): LoopRow[];
  /** A domain plus one disk on it; returns the backend path. */
  disk(d: DiskNodes & { name?: string; uuid?: string | null; target?: number }): Promise<string>;
  env(xenbusPath: string, extra?: Record<string, string>): Record<string, string>;
  run(action: string, xenbusPath: string, extra?: Record<string, string>, file?: string): Promise<HookRun>;
  read(path: string): Promise<string | undefined>;
  /** Detach what is left on the tracked images; returns the names detached (a leak when non-empty). */
  cleanup(): Promise<string[]>;
}

const harnessDirs = new Set<string>();

/**
 * The stock script takes a loop device in two steps (find a free one, then attach it), safe only
 * under Xen's `block` lock, which the other files' harnesses do not share. So test files do not
 * attach loops while it runs: a harness of the stock script (realXenLock) holds this host-wide
 * lock exclusively, every other harness shared, for its life.
 */
const LOOP_TEST_LOCK = join(tmpdir(), 'xbh-host-loop-tests.lock');

async function holdLoopTestLock(exclusive: boolean): Promise<() => Promise<void>> {
  const child = spawn(
    'flock',
    [
      exclusive ? '-x' : '-s',
      LOOP_TEST_LOCK,
      process.execPath,
      '-e',
      "process.stdout.write('1'); process.stdin.resume()",
    ],
    { stdio: ['pipe', 'pipe', 'inherit'] },
  );
  const exited = new Promise<void>((res) => child.once('exit', () => res()));
  await new Promise<void>((res, rej) => {
    child.stdout.once('data', () => res());
    child.once('exit', (code) => rej(new Error(`flock ${LOOP_TEST_LOCK} exited ${code} before the lock was held`)));
    child.once('error', rej);
  });
  return async () => {
    child.stdin.end();
    await exited;
  };
}

export interface HarnessOptions {
  /** Use Xen's real lock directory (/var/run/xen-hotplug), as the stock scripts do. */
  realXenLock?: boolean;
}

export async function blockHarness(opts: HarnessOptions = {}): Promise<BlockHarness> {
  const hook = blockBundle();
  const releaseLoops = await holdLoopTestLock(opts.realXenLock === true);
  let store: TestStore;
  try {
    store = await startTestStore('xbh-block-');
  } catch (e) {
    await releaseLoops();
    throw e;
  }
  const dir = store.dir;
  harnessDirs.add(dir);
  const stateDir = join(dir, 'state');
  const xenLockDir = opts.realXenLock ? '/var/run/xen-hotplug' : join(dir, 'xen-hotplug');
  const tracked = new Set<string>();
  const domains = new Set<number>();
  mkdirSync(join(dir, 'img'), { recursive: true });
  const h: BlockHarness = {
    store,
    dir,
    stateDir,
    xenLockDir,
    hook,
    image(name, mib = 4) {
      const p = join(dir, 'img', name);
      writeFileSync(p, '');
      execFileSync('truncate', ['-s', `${mib}M`, '--', p]);
      tracked.add(identity(p));
      return p;
    },
    track(path) {
      tracked.add(identity(path));
    },
    loopsOnImages() {
      // Device and inode numbers find a deleted image's loop; the path keeps an inode number that
      // a deleted image freed, and that another test's image got, from being taken for ours.
      return loops().filter((l) => tracked.has(l.back) && l.backFile.startsWith(`${dir}/`));
    },
    async disk(d) {
      if (!domains.has(d.domid)) {
        await writeDomain(store.xs, {
          domid: d.domid,
          ...(d.name ? { name: d.name } : {}),
          ...(d.uuid !== undefined ? { uuid: d.uuid } : {}),
          ...(d.target !== undefined ? { target: d.target } : {}),
        });
        domains.add(d.domid);
      }
      return writeBackendNodes(store.xs, { script: '/etc/xen/scripts/block', ...d });
    },
    env(xenbusPath, extra = {}) {
      return hookEnv(store.socketPath, xenbusPath, {
        script: '/etc/xen/scripts/block',
        XEN_BLOCKHOOKS_CONF: join(dir, 'no-such.conf'),
        XEN_BLOCKHOOKS_STATE_DIR: stateDir,
        XEN_BLOCKHOOKS_XEN_LOCK_DIR: xenLockDir,
        XEN_BLOCKHOOKS_LOG_FILE: join(dir, 'hotplug.log'),
        XEN_BLOCKHOOKS_LOCK_TIMEOUT_MS: '20000',
        ...extra,
      });
    },
    run(action, xenbusPath, extra = {}, file = hook) {
      return runProcess(file, [action], h.env(xenbusPath, extra));
    },
    read(path) {
      return store.xs.tryRead(path);
    },
    async cleanup() {
      const left = h.loopsOnImages();
      for (const l of left) {
        try {
          execFileSync('losetup', ['--detach', l.name]);
        } catch {
          // reported below through the returned list
        }
      }
      await store.close();
      await releaseLoops();
      return left.map((l) => l.name);
    },
  };
  return h;
}

/**
 * A harness torn down with the test: whatever is left on its images is detached (tests assert
 * "nothing left" themselves before they end; this only keeps a failing test from leaking).
 */
export async function harness(
  t: { teardown(fn: () => unknown): void },
  opts: HarnessOptions = {},
): Promise<BlockHarness> {
  const h = await blockHarness(opts);
  t.teardown(async () => {
    const leaked = await h.cleanup();
    if (leaked.length)
      process.stderr.write(`# block harness: detached loop devices a test left behind: ${leaked.join(', ')}\n`);
  });
  return h;
}

/** Loop devices over files in any directory of a harness of this process (none once its tests are done). */
export function harnessLoops(): LoopRow[] {
  return loops().filter((l) => [...harnessDirs].some((d) => l.backFile.startsWith(`${d}/`)));
}

/** A block device's major:minor in hex, as physical-device holds it. */
/**
 * Detach `loop` only while it is still a loop of `file`. A test's teardown that detaches a loop
 * by name after the test already detached it would take whatever loop the kernel handed out under
 * that name since, another test's or a hook's.
 */
export function detachIfBacks(loop: string, file: string): void {
  try {
    const back = readFileSync(`/sys/block/${basename(loop)}/loop/backing_file`, 'utf8').trim();
    if (back !== realpathSync(file)) return;
    execFileSync('losetup', ['--detach', loop]);
  } catch {
    // Not bound any more, or the file is gone: nothing of ours to detach.
  }
}

export function hexOf(dev: string): string {
  const { major, minor } = decodeDev(statSync(dev, { bigint: true }).rdev);
  return `${major.toString(16)}:${minor.toString(16)}`;
}
