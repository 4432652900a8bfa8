/**
 * Debian's stock Xen hotplug scripts (xen-utils-common, unmodified) for tests that run them next
 * to ours. They are fetched with `apt-get download xen-utils-common` into `.cache/stock/` (not
 * committed) and unpacked with `dpkg-deb -x`; a fresh machine gets them the same way, after an
 * `apt-get update` if the package lists are empty.
 *
 * What the stock `block` needs at run time, all checked by `stockPrerequisites()`: Debian's
 * xenstore-utils (xenstore-read & co., pointed at our server with XENSTORED_PATH), flock, losetup,
 * logger, /dev/stdin (its lock loops forever without it), and /var/log/xen (it appends stderr to
 * /var/log/xen/xen-hotplug.log). It locks the real /var/run/xen-hotplug/block.
 */
import { execFile } from 'node:child_process';
import { accessSync, constants, existsSync, mkdirSync, readdirSync, renameSync, rmSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');
export const STOCK_CACHE = join(ROOT, '.cache', 'stock');
export const STOCK_PACKAGE = 'xen-utils-common';

function run(cmd: string, args: string[], cwd?: string): Promise<{ ok: boolean; out: string }> {
  return new Promise((res) => {
    execFile(cmd, args, { cwd, encoding: 'utf8', timeout: 300_000, maxBuffer: 16 << 20 }, (err, stdout, stderr) => {
      res({ ok: !err, out: `${stdout}${stderr}`.trim() });
    });
  });
}

function onPath(tool: string): boolean {
  return (process.env.PATH ?? '/usr/sbin:/usr/bin:/sbin:/bin').split(':').some((d) => {
    try {
      accessSync(join(d, tool), constants.X_OK);
      return true;
    } catch {
      return false;
    }
  });
}

function scriptsIn(root: string): string {
  return join(root, 'etc', 'xen', 'scripts');
}

/**
 * The directory holding the stock `block`, `block-common.sh`, `locking.sh`…, fetching and
 * unpacking the package first if needed. Throws an Error saying what is missing and how to get it.
 */
export async function stockScriptsDir(): Promise<string> {
  const unpacked = join(STOCK_CACHE, 'root');
  if (existsSync(join(scriptsIn(unpacked), 'block'))) return scriptsIn(unpacked);
  mkdirSync(STOCK_CACHE, { recursive: true });
  const debs = (): string[] =>
    readdirSync(STOCK_CACHE).filter((f) => f.startsWith(`${STOCK_PACKAGE}_`) && f.endsWith('.deb'));
  if (debs().length === 0) {
    let r = await run('apt-get', ['download', STOCK_PACKAGE], STOCK_CACHE);
    if (!r.ok) {
      const u = await run('apt-get', ['update']);
      r = await run('apt-get', ['download', STOCK_PACKAGE], STOCK_CACHE);
      if (!r.ok) {
        throw new Error(
          `cannot fetch Debian's ${STOCK_PACKAGE} (the stock Xen hotplug scripts) into ${STOCK_CACHE}: ` +
            `apt-get download ${STOCK_PACKAGE} failed: ${r.out.split('\n').pop()}` +
            `${u.ok ? '' : `; apt-get update also failed: ${u.out.split('\n').pop()}`}. ` +
            `Needs a Debian/Ubuntu machine with network access to the archive (or put the .deb in ${STOCK_CACHE} by hand).`,
        );
      }
    }
  }
  const deb = debs().sort().pop();
  if (!deb) throw new Error(`apt-get download ${STOCK_PACKAGE} reported success but left no .deb in ${STOCK_CACHE}`);
  // Unpack next to the final place and rename, so concurrent test files never see half a tree.
  const tmp = join(STOCK_CACHE, `root.${process.pid}.tmp`);
  rmSync(tmp, { recursive: true, force: true });
  const x = await run('dpkg-deb', ['-x', join(STOCK_CACHE, deb), tmp]);
  if (!x.ok) throw new Error(`dpkg-deb -x ${deb} failed: ${x.out}`);
  if (!existsSync(join(scriptsIn(tmp), 'block'))) throw new Error(`${deb} has no etc/xen/scripts/block`);
  try {
    renameSync(tmp, unpacked);
  } catch {
    rmSync(tmp, { recursive: true, force: true }); // another process got there first
  }
  return scriptsIn(unpacked);
}

/** What the stock scripts need on this machine and is missing (empty: ready). Creates /var/log/xen. */
export async function stockPrerequisites(): Promise<string[]> {
  const missing: string[] = [];
  for (const tool of ['xenstore-read', 'xenstore-write', 'xenstore-list', 'flock', 'losetup', 'logger', 'stat']) {
    if (!onPath(tool))
      missing.push(`${tool} (${tool.startsWith('xenstore') ? 'apt-get install xenstore-utils' : 'not on PATH'})`);
  }
  if (!existsSync('/dev/stdin'))
    missing.push('/dev/stdin (the stock lock spins forever without it: ln -s /proc/self/fd/0 /dev/stdin)');
  try {
    mkdirSync('/var/log/xen', { recursive: true });
  } catch (e) {
    missing.push(`/var/log/xen (${(e as Error).message})`);
  }
  return missing;
}
