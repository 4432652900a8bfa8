// Builds the test guest once into .cache/vm/: Debian's own kernel (boot it as an uncompressed
// ELF vmlinux) and a busybox initramfs with the block/9p/overlay modules and guest-init.sh.
// Rebuilt only when an input changes: kernel .deb name, init script, module list, this file.
// Several test processes may build at once (the guest shards run in parallel on a cold cache):
// each builds in its own folder and renames finished files into place, so none ever sees a
// half-written kernel, initramfs or .deb.
//
//   node scripts/vm/build-guest.mjs        build (or confirm the cache) and print the paths
import { execFileSync, spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import {
  chmodSync,
  closeSync,
  copyFileSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  openSync,
  readFileSync,
  readdirSync,
  renameSync,
  rmSync,
  statSync,
  symlinkSync,
  writeFileSync,
} from 'node:fs';
import { dirname, join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';

const HERE = dirname(fileURLToPath(import.meta.url));
export const PROJECT_ROOT = join(HERE, '..', '..');
export const CACHE_DIR = join(PROJECT_ROOT, '.cache', 'vm');
const INIT_SCRIPT = join(HERE, 'guest-init.sh');
const BUSYBOX = '/bin/busybox';

/** Load order for busybox insmod (the .deb has no modules.dep; order follows each `depends=`). */
export const MODULES = [
  'virtio_ring',
  'virtio_pci_modern_dev',
  'virtio_pci_legacy_dev',
  'virtio',
  'virtio_pci',
  '9pnet',
  '9pnet_virtio',
  'netfs',
  'fscache',
  '9p',
  'overlay',
  'loop',
  'nbd',
  'dm-mod',
  'dm-bufio',
  'dm-snapshot',
  'crc32c_generic',
  'dm-bio-prison',
  'libcrc32c',
  'dm-persistent-data',
  'dm-thin-pool',
  'dm-zero',
  'crc16',
  'mbcache',
  'jbd2',
  'ext4',
  'libceph',
  'rbd',
];

/** Busybox applets guest-init.sh uses. */
const APPLETS = [
  'sh',
  'mount',
  'mkdir',
  'insmod',
  'cat',
  'ln',
  'rm',
  'chmod',
  'chroot',
  'poweroff',
  'sync',
  'hostname',
  'echo',
];

function run(file, args, opts = {}) {
  return execFileSync(file, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], ...opts });
}

function have(file) {
  try {
    run(file, ['--version']);
    return true;
  } catch {
    return false;
  }
}

/**
 * Name of the kernel package linux-image-amd64 depends on, e.g. linux-image-6.1.0-56-amd64.
 * apt-cache takes ~0.6 s, so the answer is remembered until apt's package lists change.
 */
export function kernelPackage() {
  const memo = join(CACHE_DIR, 'kernel-package');
  let key = 'no-lists';
  try {
    key = String(statSync('/var/lib/apt/lists').mtimeMs);
  } catch {}
  if (existsSync(memo)) {
    const [k, pkg] = readFileSync(memo, 'utf8').split('\n');
    if (k === key && pkg) return pkg;
  }
  if (!have('apt-cache')) throw new Error('apt-cache is not installed: the test guest needs a Debian kernel package');
  const out = run('apt-cache', ['depends', 'linux-image-amd64']);
  const m = /Depends:\s*(linux-image-\d\S*)/.exec(out);
  if (!m) throw new Error(`apt-cache depends linux-image-amd64 names no kernel package:\n${out}`);
  mkdirSync(CACHE_DIR, { recursive: true });
  writeFileSync(memo, `${key}\n${m[1]}\n`);
  return m[1];
}

/** The kernel .deb in the cache, downloaded with apt-get download when missing. */
function kernelDeb(pkg, log) {
  const debDir = join(CACHE_DIR, 'debs');
  mkdirSync(debDir, { recursive: true });
  const find = (dir) => readdirSync(dir).find((f) => f.startsWith(`${pkg}_`) && f.endsWith('.deb'));
  let deb = find(debDir);
  if (!deb) {
    // apt-get writes the file in place as it downloads: fetch into a private folder, then rename.
    const dl = mkdtempSync(join(debDir, 'download-'));
    try {
      log(`downloading ${pkg} with apt-get download`);
      try {
        run('apt-get', ['download', pkg], { cwd: dl });
      } catch {
        log('apt-get download failed; running apt-get update and retrying');
        run('apt-get', ['update']);
        run('apt-get', ['download', pkg], { cwd: dl });
      }
      deb = find(dl);
      if (!deb) throw new Error(`apt-get download ${pkg} left no .deb in ${dl}`);
      renameSync(join(dl, deb), join(debDir, deb));
    } finally {
      rmSync(dl, { recursive: true, force: true });
    }
  }
  return join(debDir, deb);
}

/** dpkg-deb --fsys-tarfile DEB | tar -x (only the given members), without a shell. */
export function extract(deb, dest, patterns) {
  return new Promise((resolve, reject) => {
    const dpkg = spawn('dpkg-deb', ['--fsys-tarfile', deb], { stdio: ['ignore', 'pipe', 'pipe'] });
    const tar = spawn('tar', ['-x', '-C', dest, '--wildcards', ...patterns], {
      stdio: [dpkg.stdout, 'ignore', 'pipe'],
    });
    let err = '';
    dpkg.stderr.on('data', (d) => {
      err += d;
    });
    tar.stderr.on('data', (d) => {
      err += d;
    });
    let left = 2;
    let failed = false;
    const done = (what) => (code) => {
      if (code !== 0) failed = true;
      if (code !== 0) err += `\n${what} exited with status ${code}`;
      if (--left !== 0) return;
      if (failed) reject(new Error(`extracting ${deb}: ${err.trim()}`));
      else resolve();
    };
    // dpkg-deb's stdout belongs to tar, so its 'close' never comes: wait for 'exit'.
    dpkg.on('exit', done('dpkg-deb'));
    tar.on('close', done('tar'));
    dpkg.on('error', reject);
    tar.on('error', reject);
  });
}

/** All files under dir, relative, sorted (for cpio and module lookup). */
export function walk(dir, base = dir) {
  const out = [];
  for (const e of readdirSync(dir, { withFileTypes: true }).sort((a, b) => a.name.localeCompare(b.name))) {
    const p = join(dir, e.name);
    out.push(relative(base, p));
    if (e.isDirectory()) out.push(...walk(p, base));
  }
  return out;
}

/**
 * A busybox initramfs: `dirs` made under `root`, busybox with its `applets`, `init` as /init, and
 * `modules` ({ name, path }) copied to /lib/modules/<name>.ko with their load order in
 * /lib/modules/order; written as a newc cpio archive to `out`. Shared with the Xen tier's build.
 */
export function busyboxInitramfs(root, out, { dirs, applets, init, modules }) {
  for (const d of [...dirs, 'lib/modules']) mkdirSync(join(root, d), { recursive: true });
  copyFileSync(BUSYBOX, join(root, 'bin', 'busybox'));
  chmodSync(join(root, 'bin', 'busybox'), 0o755);
  for (const a of applets) symlinkSync('busybox', join(root, 'bin', a));
  copyFileSync(init, join(root, 'init'));
  chmodSync(join(root, 'init'), 0o755);
  for (const m of modules) copyFileSync(m.path, join(root, 'lib', 'modules', `${m.name}.ko`));
  writeFileSync(join(root, 'lib', 'modules', 'order'), `${modules.map((m) => m.name).join('\n')}\n`);
  const fd = openSync(out, 'w');
  try {
    execFileSync('cpio', ['-o', '-H', 'newc', '--quiet', '-R', '0:0'], {
      cwd: root,
      input: `${walk(root).join('\n')}\n`,
      stdio: ['pipe', fd, 'pipe'],
    });
  } finally {
    closeSync(fd);
  }
}

/** The one file under `files` (relative to `base`) that is module `name`, or an error naming `where`. */
export function findModule(files, name, base, where) {
  const found = files.filter((f) => f.endsWith(`/${name}.ko`));
  if (found.length !== 1) throw new Error(`module ${name}: expected one ${name}.ko in ${where}, found ${found.length}`);
  return { name, path: join(base, found[0]) };
}

/** vmlinuz → ELF vmlinux: find the xz stream inside the bzImage and decompress it. */
export function unpackVmlinux(vmlinuz, vmlinux) {
  const img = readFileSync(vmlinuz);
  const magic = Buffer.from([0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00]);
  const at = img.indexOf(magic);
  if (at < 0) throw new Error(`${vmlinuz}: no xz payload found`);
  const fd = openSync(vmlinux, 'w');
  try {
    execFileSync('xz', ['-dc', '--single-stream'], {
      input: img.subarray(at),
      stdio: ['pipe', fd, 'pipe'],
      maxBuffer: 1 << 30,
    });
  } catch (e) {
    // xz stops reading at the end of its stream; the bytes after it then meet a closed pipe.
    if (!(e.code === 'EPIPE' && e.status === 0)) throw e;
  } finally {
    closeSync(fd);
  }
  const head = readFileSync(vmlinux).subarray(0, 4);
  if (!head.equals(Buffer.from([0x7f, 0x45, 0x4c, 0x46]))) throw new Error(`${vmlinux}: not an ELF image`);
}

function stampOf(debName) {
  const h = createHash('sha256');
  for (const part of [
    debName,
    readFileSync(INIT_SCRIPT),
    MODULES.join(' '),
    readFileSync(fileURLToPath(import.meta.url)),
  ]) {
    h.update(part);
    h.update('\0');
  }
  return h.digest('hex');
}

/**
 * Returns { vmlinux, initrd, pvh, kernel } for QEMU, building them first when the cache is stale.
 * Throws with a clear message when a needed tool or the kernel cannot be had.
 */
export async function buildGuest({ log = () => {} } = {}) {
  const pkg = kernelPackage();
  const deb = kernelDeb(pkg, log);
  const stamp = stampOf(deb.split('/').pop());
  const paths = {
    vmlinux: join(CACHE_DIR, 'vmlinux'),
    initrd: join(CACHE_DIR, 'initrd.cpio'),
    pvh: '/usr/share/qemu/pvh.bin',
    kernel: pkg,
  };
  const stampFile = join(CACHE_DIR, 'stamp');
  if (
    existsSync(stampFile) &&
    readFileSync(stampFile, 'utf8') === stamp &&
    existsSync(paths.vmlinux) &&
    existsSync(paths.initrd)
  ) {
    return paths;
  }
  for (const tool of ['dpkg-deb', 'xz', 'cpio', 'tar']) {
    if (!have(tool)) throw new Error(`${tool} is not installed (needed to build the test guest)`);
  }
  if (!existsSync(BUSYBOX)) throw new Error(`${BUSYBOX} missing: install busybox-static`);
  mkdirSync(CACHE_DIR, { recursive: true });
  log(`building the test guest from ${deb}`);
  // Folders of the earlier layout, built in place.
  for (const d of ['kernel', 'initramfs']) rmSync(join(CACHE_DIR, d), { recursive: true, force: true });
  const work = mkdtempSync(join(CACHE_DIR, 'build-'));
  try {
    const unpacked = join(work, 'kernel');
    mkdirSync(unpacked);
    await extract(deb, unpacked, ['./boot/vmlinuz-*', ...MODULES.map((m) => `./lib/modules/*/${m}.ko`)]);

    const files = walk(unpacked);
    const vmlinuz = files.find((f) => /^boot\/vmlinuz-/.test(f));
    if (!vmlinuz) throw new Error(`${deb} has no boot/vmlinuz-*`);
    unpackVmlinux(join(unpacked, vmlinuz), join(work, 'vmlinux'));

    busyboxInitramfs(join(work, 'initramfs'), join(work, 'initrd.cpio'), {
      dirs: ['bin', 'dev', 'proc', 'sys', 'mnt'],
      applets: APPLETS,
      init: INIT_SCRIPT,
      modules: MODULES.map((m) => findModule(files, m, unpacked, deb)),
    });
    // Same inputs give the same files, so a concurrent builder's rename over ours is harmless.
    renameSync(join(work, 'vmlinux'), paths.vmlinux);
    renameSync(join(work, 'initrd.cpio'), paths.initrd);
    writeFileSync(join(work, 'stamp'), stamp);
    renameSync(join(work, 'stamp'), stampFile);
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
  log(`test guest ready: ${paths.vmlinux}, ${paths.initrd}`);
  return paths;
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const t0 = Date.now();
  const p = await buildGuest({ log: (m) => console.error(m) });
  console.log(`${p.kernel}\n${p.vmlinux}\n${p.initrd}\n(${Date.now() - t0} ms)`);
}
