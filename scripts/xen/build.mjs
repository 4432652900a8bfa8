// Builds the real-Xen test tier once into .cache/xen/build-<hash>/, from Debian packages fetched with
// `apt-get download` (nothing is installed on this machine):
//   xen.elf          Debian's Xen 4.17 hypervisor, gunzipped (an ELF32 multiboot image for -kernel)
//   vmlinux          Debian's kernel as an ELF image: dom0 (PV) and the test domUs (PV)
//   xenroot/         a root layer: Xen 4.17 tools and libraries, kmod, and Debian 12's own
//                    nodejs 18.20 (so /usr/bin/node in dom0 is Debian's node, not this machine's)
//   modroot/         the kernel's modules, depmod'ed, at usr/lib/modules/<version>
//   dom0-initrd.cpio busybox + virtio/9p/overlay modules + dom0-init.sh
//   domu-initrd.cpio busybox + xen-blkfront + domu-init.sh (the guest the scenarios boot), and
//                    for a guest that mounts its disk: ext4's modules and this machine's resize2fs
//                    with the shared libraries ldd lists for it
// Rebuilt only when an input changes (package file names, the init scripts, this file, the
// programs copied from this machine and their libraries); each
// set of inputs gets its own folder .cache/xen/build-<hash>/ holding the files above.
//
//   node scripts/xen/build.mjs      build (or confirm the cache) and print the paths
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import {
  chmodSync,
  closeSync,
  copyFileSync,
  existsSync,
  lstatSync,
  mkdirSync,
  openSync,
  readFileSync,
  readdirSync,
  renameSync,
  rmSync,
  symlinkSync,
  utimesSync,
  writeFileSync,
} from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { busyboxInitramfs, extract, findModule, kernelPackage, unpackVmlinux, walk } from '../vm/build-guest.mjs';

const HERE = dirname(fileURLToPath(import.meta.url));
export const PROJECT_ROOT = join(HERE, '..', '..');
export const CACHE_DIR = join(PROJECT_ROOT, '.cache', 'xen');
const DEB_DIR = join(CACHE_DIR, 'debs');
const VM_DEB_DIR = join(PROJECT_ROOT, '.cache', 'vm', 'debs');
const BUSYBOX = '/bin/busybox';
const DOM0_INIT = join(HERE, 'dom0-init.sh');
const DOMU_INIT = join(HERE, 'domu-init.sh');

export const XEN_PACKAGES = [
  'xen-hypervisor-4.17-amd64',
  'xen-utils-4.17',
  'xen-utils-common',
  'xenstore-utils',
  'libxenmisc4.17',
  'libxenstore4',
  'libxentoolcore1',
  'libxentoollog1',
  'libxencall1',
  'libxenevtchn1',
  'libxenforeignmemory1',
  'libxengnttab1',
  'libxendevicemodel1',
  'libxenhypfs1',
  'libyajl2',
  'kmod',
  'libkmod2',
];
/** Debian 12's nodejs; its dependencies that this machine lacks are added by nodePackages(). */
const NODE_ROOTS = ['nodejs', 'libnode108'];
const NODE_MAJOR = '18.';

/** Modules of the dom0 initramfs, busybox insmod order (each after its `depends=`). */
const DOM0_EARLY_MODULES = [
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
];
/**
 * Loaded from dom0's initramfs too (from RAM: reading modules over 9p and running modprobe in
 * a PV dom0 under TCG costs seconds); the build orders them and their dependencies from
 * modules.dep. crc32c_generic first: libcrc32c needs a crc32c algorithm (a softdep).
 */
const DOM0_MODULES = [
  'crc32c_generic',
  'xenfs',
  'xen-evtchn',
  'xen-gntdev',
  'xen-gntalloc',
  'xen-privcmd',
  'xen-blkback',
  'loop',
  'nbd',
  'dm-mod',
  'dm-snapshot',
  'dm-thin-pool',
  'dm-zero',
  'rbd',
  // A bootloader (pygrub) reads the guest's disk through a dom0 frontend; udev loads it on a real dom0.
  'xen-blkfront',
];
const DOMU_MODULES = ['xen-blkfront'];
/**
 * In the domU's initramfs too, but loaded only by a guest that mounts its disk (xbh_mode=resize),
 * from /lib/modules/fs.order: ext4 and what it needs (crc32c_generic first: ext4's softdep, for
 * metadata_csum).
 */
const DOMU_FS_MODULES = ['crc32c_generic', 'ext4'];
/**
 * Programs of this machine the domU runs besides busybox, at /bin/<name>, with the shared
 * libraries `ldd` lists for them at the same paths (and the dynamic loader): e2fsprogs'
 * resize2fs grows a mounted ext4 filesystem online.
 */
const DOMU_PROGRAMS = ['/usr/sbin/resize2fs'];
/** Parts of the kernel's module tree dom0 may need (Xen drivers, block, dm, 9p, ext4, crypto). */
const MODULE_TREES = [
  'kernel/drivers/xen',
  'kernel/drivers/block',
  'kernel/drivers/md',
  'kernel/drivers/virtio',
  'kernel/fs/9p',
  'kernel/fs/overlayfs',
  'kernel/fs/netfs',
  'kernel/fs/fscache',
  'kernel/fs/ext4',
  'kernel/fs/jbd2',
  'kernel/fs/mbcache.ko',
  'kernel/net/9p',
  'kernel/net/ceph',
  'kernel/net/dns_resolver',
  'kernel/lib',
  'kernel/crypto',
  'kernel/arch/x86/crypto',
  'modules.builtin',
  'modules.builtin.modinfo',
  'modules.order',
];
const INITRD_APPLETS = [
  'sh',
  'mount',
  'umount',
  'mkdir',
  'insmod',
  'cat',
  'ln',
  'rm',
  'chmod',
  'poweroff',
  'sync',
  'echo',
  'sleep',
  'switch_root',
  'dd',
  'ls',
  'test',
  '[',
  'grep',
  'head',
  'tr',
  'cmp',
  'blockdev',
  'mknod',
  'seq',
  'date',
  'hostname',
  'df',
  'tail',
  'dmesg',
  'sed',
];

function run(file, args, opts = {}) {
  return execFileSync(file, args, {
    encoding: 'utf8',
    stdio: ['ignore', 'pipe', 'pipe'],
    maxBuffer: 64 << 20,
    ...opts,
  });
}

function have(file) {
  try {
    run(file, ['--version']);
    return true;
  } catch {
    return false;
  }
}

let aptUpdated = false;
function aptCache(args) {
  try {
    return run('apt-cache', args);
  } catch (e) {
    if (aptUpdated) throw e;
    aptUpdated = true;
    run('apt-get', ['update']);
    return run('apt-cache', args);
  }
}

/** True when dpkg says the package is installed on this machine. */
function installedHere(pkg) {
  try {
    return /install ok installed/.test(run('dpkg-query', ['-W', '-f=${Status}', pkg]));
  } catch {
    return false;
  }
}

/** The Debian version of nodejs that matches libnode108 (the host may carry another vendor's nodejs). */
function debianNodeVersion() {
  const out = aptCache(['madison', 'nodejs']);
  const versions = out
    .split('\n')
    .map((l) => l.split('|').map((s) => s.trim()))
    .filter((c) => c[1]?.startsWith(NODE_MAJOR) && /debian/.test(c[2] ?? ''));
  if (!versions.length)
    throw new Error(`apt knows no Debian nodejs ${NODE_MAJOR}x (apt-cache madison nodejs):\n${out}`);
  return versions[0][1]; // madison lists the newest first
}

/**
 * nodejs + libnode108 and, recursively, the packages they depend on that are not installed
 * here (they are on a Debian 12 dom0; e.g. libc-ares2 and the node-* builtins in /usr/share/nodejs).
 */
function nodePackages() {
  const want = new Set(NODE_ROOTS);
  let frontier = [...NODE_ROOTS];
  while (frontier.length) {
    const out = aptCache([
      'depends',
      '--no-recommends',
      '--no-suggests',
      '--no-conflicts',
      '--no-breaks',
      '--no-replaces',
      '--no-enhances',
      ...frontier,
    ]);
    const next = [];
    for (const line of out.split('\n')) {
      // "  Depends: libuv1" / " |Depends: <nodejs:any>" (virtual or alternative: skip)
      const m = /^\s*\|?(?:Pre)?Depends:\s*([^\s<>]+)\s*$/.exec(line);
      if (!m || line.includes('|Depends')) continue;
      const pkg = m[1].replace(/:any$/, '');
      if (want.has(pkg) || installedHere(pkg)) continue;
      want.add(pkg);
      next.push(pkg);
    }
    frontier = next;
  }
  return [...want].sort();
}

/** Downloads the missing .debs into DEB_DIR; returns { pkg: path }. */
function download(specs, log) {
  mkdirSync(DEB_DIR, { recursive: true });
  const files = () => readdirSync(DEB_DIR).filter((f) => f.endsWith('.deb'));
  const find = (name, version) =>
    files().find((f) => f.startsWith(`${name}_${version ? `${version.replace(/^\d+:/, '')}_` : ''}`));
  const missing = specs.filter(({ name, version }) => !find(name, version));
  if (missing.length) {
    const args = missing.map(({ name, version }) => (version ? `${name}=${version}` : name));
    log(`apt-get download ${args.join(' ')}`);
    try {
      run('apt-get', ['download', ...args], { cwd: DEB_DIR });
    } catch {
      log('apt-get download failed; running apt-get update and retrying');
      run('apt-get', ['update']);
      run('apt-get', ['download', ...args], { cwd: DEB_DIR });
    }
  }
  const out = {};
  for (const { name, version } of specs) {
    const f = find(name, version);
    if (!f) throw new Error(`apt-get download ${name} left no .deb in ${DEB_DIR}`);
    out[name] = join(DEB_DIR, f);
  }
  return out;
}

/**
 * Moves dir/{bin,sbin,lib,lib64} into dir/usr/…: this machine is merged-/usr, and a layer with
 * real /bin or /lib folders would hide the host's /bin → usr/bin symlinks.
 */
function foldIntoUsr(dir) {
  for (const top of ['bin', 'sbin', 'lib', 'lib64']) {
    const src = join(dir, top);
    if (!existsSync(src) || lstatSync(src).isSymbolicLink()) continue;
    mergeMove(src, join(dir, 'usr', top));
  }
}

function mergeMove(src, dst) {
  if (!existsSync(dst)) {
    mkdirSync(dirname(dst), { recursive: true });
    renameSync(src, dst);
    return;
  }
  if (!lstatSync(dst).isDirectory() || !lstatSync(src).isDirectory()) {
    rmSync(dst, { recursive: true, force: true });
    renameSync(src, dst);
    return;
  }
  for (const e of readdirSync(src)) mergeMove(join(src, e), join(dst, e));
  rmSync(src, { recursive: true, force: true });
}

/** A busybox initramfs at dir with init script and modules (found in modFiles, absolute paths), in order. */
function buildInitramfs(dir, out, init, modules, modFiles) {
  rmSync(dir, { recursive: true, force: true });
  busyboxInitramfs(dir, out, {
    dirs: ['bin', 'dev', 'proc', 'sys', 'mnt', 'newroot', 'tmp'],
    applets: INITRD_APPLETS,
    init,
    modules: modules.map((m) => findModule(modFiles, m, '/', 'the kernel package')),
  });
}

/** The programs and every shared library `ldd` lists for them (the loader included), as absolute paths. */
function withLibraries(programs) {
  const files = new Set();
  for (const p of programs) {
    if (!existsSync(p))
      throw new Error(`${p} is missing on this machine (the domU runs it): install the package that has it`);
    files.add(p);
    for (const line of run('ldd', [p]).split('\n')) {
      // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)" and "/lib64/ld-linux-x86-64.so.2 (0x…)"
      const m = /(\/\S+) \(0x[0-9a-f]+\)/.exec(line);
      if (m) files.add(m[1]);
    }
  }
  return [...files];
}

/**
 * The domU's initramfs: busybox, domu-init.sh and xen-blkfront (loaded at boot, /lib/modules/order),
 * the filesystem modules (loaded on demand, /lib/modules/fs.order), and `programs` with their
 * libraries (withLibraries): programs at /bin/<name>, libraries at the paths ldd gave.
 */
function buildDomuInitramfs(dir, out, kdirMods, modFiles, programs) {
  const fsModules = moduleOrder(kdirMods, DOMU_FS_MODULES).filter((m) => !DOMU_MODULES.includes(m));
  buildInitramfs(dir, out, DOMU_INIT, DOMU_MODULES, modFiles);
  for (const m of fsModules)
    copyFileSync(findModule(modFiles, m, '/', 'the kernel package').path, join(dir, 'lib', 'modules', `${m}.ko`));
  writeFileSync(join(dir, 'lib', 'modules', 'fs.order'), `${fsModules.join('\n')}\n`);
  for (const f of programs) {
    const to = DOMU_PROGRAMS.includes(f) ? join(dir, 'bin', f.split('/').pop()) : join(dir, f);
    mkdirSync(dirname(to), { recursive: true });
    copyFileSync(f, to); // follows symlinks: the library itself under its soname
    chmodSync(to, 0o755);
  }
  const fd = openSync(out, 'w');
  try {
    execFileSync('cpio', ['-o', '-H', 'newc', '--quiet', '-R', '0:0'], {
      cwd: dir,
      input: `${walk(dir).join('\n')}\n`,
      stdio: ['pipe', fd, 'pipe'],
    });
  } finally {
    closeSync(fd);
  }
}

/** `names` and everything they depend on, dependencies first, from depmod's modules.dep. */
function moduleOrder(kdir, names) {
  const deps = new Map();
  for (const line of readFileSync(join(kdir, 'modules.dep'), 'utf8').split('\n')) {
    const [mod, rest] = line.split(':');
    if (mod) deps.set(mod, (rest ?? '').trim().split(/\s+/).filter(Boolean));
  }
  const byName = new Map([...deps.keys()].map((p) => [p.split('/').pop().replace(/\.ko$/, ''), p]));
  const order = [];
  const visit = (path) => {
    if (order.includes(path)) return;
    // modules.dep lists a module's full closure, the ones loaded last first.
    for (const d of [...(deps.get(path) ?? [])].reverse()) visit(d);
    order.push(path);
  };
  for (const n of names) {
    const path = byName.get(n) ?? byName.get(n.replace(/-/g, '_')) ?? byName.get(n.replace(/_/g, '-'));
    if (!path) throw new Error(`module ${n} is not in modules.dep`);
    visit(path);
  }
  return order.map((p) => p.split('/').pop().replace(/\.ko$/, ''));
}

/**
 * Removes other builds (and the layout of earlier versions of this script) once they have not
 * been used for two hours: a run started from them is long over by then.
 */
function pruneBuilds(keep) {
  const old = Date.now() - 2 * 3600_000;
  for (const e of readdirSync(CACHE_DIR)) {
    const p = join(CACHE_DIR, e);
    if (p === keep || e === 'debs' || e === 'packages.json') continue;
    try {
      if (lstatSync(p).mtimeMs < old) rmSync(p, { recursive: true, force: true });
    } catch {}
  }
}

function stampOf(debs, hostFiles) {
  const h = createHash('sha256');
  for (const part of [
    Object.values(debs)
      .map((p) => p.split('/').pop())
      .sort()
      .join(' '),
    readFileSync(DOM0_INIT),
    readFileSync(DOMU_INIT),
    readFileSync(fileURLToPath(import.meta.url)),
    ...hostFiles.flatMap((f) => [f, readFileSync(f)]),
  ]) {
    h.update(part);
    h.update('\0');
  }
  return h.digest('hex');
}

/**
 * Returns the tier's paths, building them first when the cache is stale:
 * { xen, vmlinux, dom0Initrd, domuInitrd, xenroot, modroot, kernelVersion, nodeVersion, packages }.
 */
export async function buildXen({ log = () => {} } = {}) {
  for (const tool of ['apt-get', 'apt-cache', 'dpkg-deb', 'xz', 'cpio', 'tar', 'gzip', 'ldd']) {
    if (!have(tool)) throw new Error(`${tool} is not installed (needed to build the Xen test tier)`);
  }
  mkdirSync(CACHE_DIR, { recursive: true });
  // Package resolution costs a few apt-cache calls: remember it until apt's lists change.
  const memo = join(CACHE_DIR, 'packages.json');
  let listsKey = 'none';
  try {
    listsKey = String(readdirSync('/var/lib/apt/lists').length) + ':' + String(lstatSync('/var/lib/apt/lists').mtimeMs);
  } catch {}
  let resolved;
  if (existsSync(memo)) {
    const m = JSON.parse(readFileSync(memo, 'utf8'));
    if (m.listsKey === listsKey) resolved = m;
  }
  if (!resolved) {
    resolved = { listsKey, kernel: kernelPackage(), nodeVersion: debianNodeVersion(), node: nodePackages() };
    writeFileSync(memo, JSON.stringify(resolved, null, 1));
  }
  // Reuse the guest tier's copy of the kernel package when it has one.
  mkdirSync(DEB_DIR, { recursive: true });
  if (existsSync(VM_DEB_DIR)) {
    const k = readdirSync(VM_DEB_DIR).find((f) => f.startsWith(`${resolved.kernel}_`) && f.endsWith('.deb'));
    if (k && !existsSync(join(DEB_DIR, k))) {
      const part = join(DEB_DIR, `.${k}.${process.pid}`);
      copyFileSync(join(VM_DEB_DIR, k), part);
      renameSync(part, join(DEB_DIR, k));
    }
  }
  const specs = [
    ...XEN_PACKAGES.map((name) => ({ name })),
    ...resolved.node.map((name) => ({
      name,
      version: name === 'nodejs' || name === 'libnode108' ? resolved.nodeVersion : undefined,
    })),
    { name: resolved.kernel },
  ];
  const debs = download(specs, log);
  const domuFiles = withLibraries(DOMU_PROGRAMS);
  const stamp = stampOf(debs, domuFiles);
  // Each set of inputs builds into its own folder, never changed once complete: a run that is
  // booted from one build keeps its 9p exports even while another run builds a newer one.
  const dir = join(CACHE_DIR, `build-${stamp.slice(0, 16)}`);
  const paths = {
    xen: join(dir, 'xen.elf'),
    vmlinux: join(dir, 'vmlinux'),
    dom0Initrd: join(dir, 'dom0-initrd.cpio'),
    domuInitrd: join(dir, 'domu-initrd.cpio'),
    xenroot: join(dir, 'xenroot'),
    modroot: join(dir, 'modroot'),
    kernelPackage: resolved.kernel,
    nodeVersion: resolved.nodeVersion,
    packages: Object.keys(debs),
  };
  const complete = join(dir, 'complete');
  if (existsSync(complete)) {
    paths.kernelVersion = readFileSync(complete, 'utf8').trim();
    const now = new Date();
    utimesSync(dir, now, now); // "used": kept by pruneBuilds for two more hours
    return paths;
  }
  pruneBuilds(dir);
  if (!existsSync(BUSYBOX)) throw new Error(`${BUSYBOX} missing: install busybox-static`);
  log('building the Xen test tier');
  rmSync(dir, { recursive: true, force: true });
  mkdirSync(dir, { recursive: true });

  // xenroot: every Xen and node package, folded into usr/.
  rmSync(paths.xenroot, { recursive: true, force: true });
  mkdirSync(paths.xenroot, { recursive: true });
  for (const [name, deb] of Object.entries(debs)) {
    if (name === resolved.kernel) continue;
    run('dpkg-deb', ['-x', deb, paths.xenroot]);
  }
  const xenGz = join(paths.xenroot, 'boot', 'xen-4.17-amd64.gz');
  if (!existsSync(xenGz)) throw new Error(`${debs['xen-hypervisor-4.17-amd64']} has no boot/xen-4.17-amd64.gz`);
  const fd = openSync(paths.xen, 'w');
  try {
    execFileSync('gzip', ['-dc', xenGz], { stdio: ['ignore', fd, 'pipe'] });
  } finally {
    closeSync(fd);
  }
  rmSync(join(paths.xenroot, 'boot'), { recursive: true, force: true });
  foldIntoUsr(paths.xenroot);
  // Debian's node is /usr/bin/node in this layer; check it is an executable file, not a link out.
  if (!existsSync(join(paths.xenroot, 'usr', 'bin', 'node')))
    throw new Error('the nodejs package left no usr/bin/node');

  // The kernel: ELF vmlinux, and the module trees dom0 needs, depmod'ed with Debian's kmod.
  const kdir = join(dir, 'kernel');
  rmSync(kdir, { recursive: true, force: true });
  mkdirSync(kdir, { recursive: true });
  await extract(debs[resolved.kernel], kdir, ['./boot/vmlinuz-*', ...MODULE_TREES.map((t) => `./lib/modules/*/${t}`)]);
  const vmlinuz = readdirSync(join(kdir, 'boot')).find((f) => f.startsWith('vmlinuz-'));
  if (!vmlinuz) throw new Error(`${debs[resolved.kernel]} has no boot/vmlinuz-*`);
  unpackVmlinux(join(kdir, 'boot', vmlinuz), paths.vmlinux);
  const kver = vmlinuz.replace(/^vmlinuz-/, '');
  rmSync(paths.modroot, { recursive: true, force: true });
  mkdirSync(join(paths.modroot, 'usr', 'lib'), { recursive: true });
  renameSync(join(kdir, 'lib', 'modules'), join(paths.modroot, 'usr', 'lib', 'modules'));
  rmSync(kdir, { recursive: true, force: true });
  // kmod picks the tool from its argv[0]; the package's usr/sbin/depmod links to /bin/kmod,
  // which this machine lacks, so make a local link.
  const depmod = join(dir, 'depmod');
  rmSync(depmod, { force: true });
  symlinkSync(join(paths.xenroot, 'usr', 'bin', 'kmod'), depmod);
  execFileSync(depmod, ['-b', join(paths.modroot, 'usr'), kver], {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, LD_LIBRARY_PATH: join(paths.xenroot, 'usr', 'lib', 'x86_64-linux-gnu') },
  });
  if (!existsSync(join(paths.modroot, 'usr', 'lib', 'modules', kver, 'modules.dep')))
    throw new Error('depmod wrote no modules.dep');
  const modFiles = walk(join(paths.modroot, 'usr', 'lib', 'modules', kver))
    .filter((f) => f.endsWith('.ko'))
    .map((f) => join(paths.modroot, 'usr', 'lib', 'modules', kver, f));

  const kdirMods = join(paths.modroot, 'usr', 'lib', 'modules', kver);
  const dom0Modules = [
    ...DOM0_EARLY_MODULES,
    ...moduleOrder(kdirMods, DOM0_MODULES).filter((m) => !DOM0_EARLY_MODULES.includes(m)),
  ];
  buildInitramfs(join(dir, 'dom0-initramfs'), paths.dom0Initrd, DOM0_INIT, dom0Modules, modFiles);
  buildDomuInitramfs(join(dir, 'domu-initramfs'), paths.domuInitrd, kdirMods, modFiles, domuFiles);
  rmSync(join(dir, 'dom0-initramfs'), { recursive: true, force: true });
  rmSync(join(dir, 'domu-initramfs'), { recursive: true, force: true });
  rmSync(depmod, { force: true });
  writeFileSync(complete, `${kver}\n`);
  paths.kernelVersion = kver;
  log(`Xen test tier ready in ${dir}`);
  return paths;
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const t0 = Date.now();
  const p = await buildXen({ log: (m) => console.error(m) });
  console.log(JSON.stringify(p, null, 1));
  console.error(`(${Date.now() - t0} ms)`);
}
