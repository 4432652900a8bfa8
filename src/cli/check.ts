/**
 * `xen-blockhooks check`: is this machine ready for the hooks? Every key of the configuration,
 * the directories it names, the tools each hook runs, the kernel's device-mapper, loop, nbd and
 * rbd, and Xen itself. It changes nothing: a directory that does not exist is judged by whether
 * it could be made, and a module that is not loaded by whether the kernel has it to load.
 *
 * Two roots keep it testable and let the installer check a staged tree: `root` is where the
 * installation is looked for (the configuration file, the directories it names, the installed
 * hooks); `machineRoot` is where this machine's /dev, /proc, /sys, /lib/modules and the hooks'
 * PATH are read.
 */
import { accessSync, constants, existsSync, readFileSync, statSync, type Stats } from 'node:fs';
import { release } from 'node:os';
import { dirname, join } from 'node:path';
import { DEFAULT_CONFIG_FILE, checkConfig, type Config } from '../config/config.js';
import { childEnv } from '../devices/exec.js';

export const CHECK_HELP = `Usage: xen-blockhooks check [--root DIR]

Check that this machine is ready for the hooks, and print every problem found:
  - every line of the configuration (and every XEN_BLOCKHOOKS_* override) parses;
  - the directories it names (state_dir, store_dir, xen_lock_dir, the log file's directory,
    image_dirs) exist or can be made, and are not writable by everyone;
  - the tools each hook runs are on the hooks' PATH (losetup; dmsetup for block-cow, block-thin
    and block-lvsnap; qemu-nbd and qemu-img for block-qcow; lvm for block-lvsnap; rbd for
    block-rbd): a problem for a hook installed in xen_script_dir, a note for one that is not;
    kpartx, for "xen-blockhooks open" (a note when it is missing);
  - the kernel has device-mapper and loop devices (problems when not), nbd (block-qcow) and rbd
    (block-rbd) loaded or loadable (problems when that hook is installed, notes otherwise);
  - this machine is a Xen dom0.
Nothing is changed.

Options:
  --root DIR  look for the configuration, its directories and the installed hooks under DIR
              (a staging tree, as the installer's DESTDIR); the kernel and the tools are still
              this machine's
  -h, --help  this text

Exit status: 0 no problems (notes may be printed), 1 problems (each on a line of its own),
2 bad usage.`;

export interface CheckOptions {
  /** Where the installation is looked for (a DESTDIR); default /. */
  root?: string;
  /** Where /dev, /proc, /sys, /lib/modules and the PATH directories are read; default /. */
  machineRoot?: string;
  env: NodeJS.ProcessEnv;
  /** The running kernel's release (uname -r), for /lib/modules. */
  kernelRelease?: string;
}

export interface CheckReport {
  problems: string[];
  notes: string[];
}

/** The programs each hook runs (through the Runner, on the PATH of childEnv), and the package that has it. */
export const HOOK_TOOLS: Readonly<Record<string, readonly string[]>> = {
  block: ['losetup'],
  'block-cow': ['losetup', 'dmsetup'],
  'block-qcow': ['qemu-nbd', 'qemu-img', 'modprobe'],
  'block-thin': ['losetup', 'dmsetup'],
  'block-lvsnap': ['lvm', 'dmsetup'],
  'block-rbd': ['rbd'],
};

const PACKAGE: Record<string, string> = {
  losetup: 'mount',
  dmsetup: 'dmsetup',
  'qemu-nbd': 'qemu-utils',
  'qemu-img': 'qemu-utils',
  modprobe: 'kmod',
  lvm: 'lvm2',
  rbd: 'ceph-common',
};

/** The line the installer's wrappers start with (packaging/wrapper.sh.in). */
const WRAPPER_MARK = '# xen-blockhooks:';

function under(root: string, path: string): string {
  return root === '/' ? path : join(root, path);
}

function statOf(p: string): Stats | undefined {
  try {
    return statSync(p);
  } catch {
    return undefined;
  }
}

function readText(p: string): string | undefined {
  try {
    return readFileSync(p, 'utf8');
  } catch {
    return undefined;
  }
}

function modeText(st: Stats): string {
  return (st.mode & 0o7777).toString(8).padStart(4, '0');
}

export function runCheck(o: CheckOptions): CheckReport {
  const root = o.root ?? '/';
  const machine = o.machineRoot ?? '/';
  const problems: string[] = [];
  const notes: string[] = [];

  // The configuration: every problem, not only the first.
  const conf = checkConfig({
    ...o.env,
    XEN_BLOCKHOOKS_CONF: o.env.XEN_BLOCKHOOKS_CONF ?? under(root, DEFAULT_CONFIG_FILE),
  });
  problems.push(...conf.problems);
  if (!conf.found) notes.push(`${conf.file} does not exist: the defaults are in force`);
  const c: Config = conf.config;

  // The directories.
  const dirs: [string, string, boolean][] = [
    ['state_dir', c.stateDir, true],
    ['store_dir', c.storeDir, true],
    ['xen_lock_dir', c.xenLockDir, true],
    ...(c.logFile ? [['log_file', dirname(c.logFile), true] as [string, string, boolean]] : []),
    ...c.imageDirs.map((d) => ['image_dirs', d, false] as [string, string, boolean]),
  ];
  for (const [key, d, made] of dirs) {
    const p = under(root, d);
    const st = statOf(p);
    if (st) {
      if (!st.isDirectory()) problems.push(`${key}: ${p} is not a directory`);
      else if (st.mode & 0o002)
        problems.push(`${key}: ${p} is writable by everyone (mode ${modeText(st)}); make it 0755 or stricter`);
      continue;
    }
    if (!made) {
      notes.push(`image_dirs: ${p} does not exist (no base image can come from there)`);
      continue;
    }
    let anc = dirname(p);
    while (!statOf(anc) && anc !== dirname(anc)) anc = dirname(anc);
    const ast = statOf(anc);
    if (!ast?.isDirectory()) {
      problems.push(`${key}: ${p} cannot be made: ${anc} is not a directory`);
      continue;
    }
    try {
      accessSync(anc, constants.W_OK | constants.X_OK);
    } catch (e) {
      problems.push(
        `${key}: ${p} cannot be made: ${anc} is not writable (${(e as NodeJS.ErrnoException).code ?? (e as Error).message})`,
      );
    }
  }
  if (c.logFile) {
    const st = statOf(under(root, c.logFile));
    if (st && st.mode & 0o002)
      problems.push(`log_file: ${under(root, c.logFile)} is writable by everyone (mode ${modeText(st)})`);
  }

  // The installed hooks: wrappers the installer wrote in xen_script_dir.
  const scriptDir = under(root, c.xenScriptDir);
  const installed = new Set(
    Object.keys(HOOK_TOOLS).filter((h) =>
      (readText(join(scriptDir, h)) ?? '')
        .split('\n')
        .slice(0, 3)
        .some((l) => l.startsWith(WRAPPER_MARK)),
    ),
  );
  if (installed.size === 0)
    notes.push(
      `no hook is installed in ${scriptDir} (install the xen-blockhooks package, or run ./install); what a hook needs is reported as a note`,
    );

  // The tools, on the PATH the hooks run them with.
  const pathDirs = (childEnv({}).PATH ?? '').split(':');
  const found = (tool: string) =>
    pathDirs.some((d) => {
      const st = statOf(under(machine, join(d, tool)));
      return st !== undefined && st.isFile() && (st.mode & 0o111) !== 0;
    });
  for (const [hook, tools] of Object.entries(HOOK_TOOLS)) {
    const missing = tools.filter((t) => !found(t));
    if (missing.length === 0) continue;
    const what = missing.map((t) => `${t} (package ${PACKAGE[t] ?? t})`).join(', ');
    if (installed.has(hook))
      problems.push(`${hook} is installed but cannot run: not on its PATH (${pathDirs.join(':')}): ${what}`);
    else notes.push(`${hook} (not installed) would need: ${what}`);
  }

  if (!found('kpartx')) notes.push('"xen-blockhooks open" would need: kpartx (package kpartx)');

  // The kernel.
  const kernelRelease = o.kernelRelease ?? release();
  const modules = `${readText(under(machine, `/lib/modules/${kernelRelease}/modules.dep`)) ?? ''}\n${readText(under(machine, `/lib/modules/${kernelRelease}/modules.builtin`)) ?? ''}`;
  const hasModule = (name: string) =>
    new RegExp(`(^|/)${name.replace(/[-_]/g, '[-_]')}\\.ko(\\.[a-z]+)?:?`, 'm').test(modules);
  const misc = readText(under(machine, '/proc/misc')) ?? '';
  const devices = readText(under(machine, '/proc/devices')) ?? '';

  if (/\sdevice-mapper$/m.test(misc) || /\sdevice-mapper$/m.test(devices)) {
    if (!existsSync(under(machine, '/dev/mapper/control')))
      problems.push(
        `device-mapper: the kernel has it but ${under(machine, '/dev/mapper/control')} is missing (dmsetup mknodes makes it)`,
      );
  } else if (hasModule('dm-mod')) {
    notes.push(
      'device-mapper: the dm_mod module is not loaded; the kernel loads it when dmsetup first opens /dev/mapper/control',
    );
  } else {
    problems.push(
      `device-mapper: this kernel has none (no device-mapper in ${under(machine, '/proc/misc')}, no dm_mod module): block-cow, block-thin and block-lvsnap cannot build a disk`,
    );
  }

  if (existsSync(under(machine, '/dev/loop-control'))) {
    // loaded (the control node is the driver's)
  } else if (hasModule('loop')) {
    notes.push(`loop: the module is not loaded and ${under(machine, '/dev/loop-control')} is missing (modprobe loop)`);
  } else {
    problems.push(
      `loop: this kernel has no loop devices (no ${under(machine, '/dev/loop-control')}, no loop module): block, block-cow and block-thin cannot attach a file`,
    );
  }

  const optional: [string, string, string, string][] = [
    ['nbd', '/sys/module/nbd', 'block-qcow', 'block-qcow loads it on first use (modprobe nbd)'],
    ['rbd', '/sys/bus/rbd', 'block-rbd', 'load it with modprobe rbd'],
  ];
  for (const [mod, sys, hook, how] of optional) {
    if (existsSync(under(machine, sys))) continue;
    if (hasModule(mod)) {
      notes.push(`${mod}: the module is not loaded; ${how}`);
      continue;
    }
    const m = `${mod}: this kernel has no ${mod} (no ${under(machine, sys)}, no ${mod} module)`;
    if (installed.has(hook)) problems.push(`${m}: ${hook} is installed and cannot attach a disk`);
    else notes.push(`${m}: ${hook} (not installed) would need it`);
  }

  // Xen: the hooks are run by the toolstack of a dom0.
  const caps = readText(under(machine, '/proc/xen/capabilities'));
  if (caps === undefined) {
    const hv = (readText(under(machine, '/sys/hypervisor/type')) ?? '').trim();
    problems.push(
      hv === 'xen'
        ? `Xen: ${under(machine, '/proc/xen/capabilities')} is missing (is xenfs mounted on /proc/xen?)`
        : 'Xen: this machine is not running on Xen (no /proc/xen, /sys/hypervisor/type is not xen): no toolstack will run the hooks',
    );
  } else if (!/control_d/.test(caps)) {
    problems.push('Xen: this is a Xen guest, not dom0 (no control_d in /proc/xen/capabilities): the hooks run in dom0');
  }
  return { problems, notes };
}

export function renderCheck(r: CheckReport): string[] {
  const lines = [...r.problems.map((p) => `problem: ${p}`), ...r.notes.map((n) => `note: ${n}`)];
  const n = r.problems.length;
  lines.push(
    n === 0
      ? `No problems found${r.notes.length ? ` (${r.notes.length} note${r.notes.length === 1 ? '' : 's'})` : ''}.`
      : `${n} problem${n === 1 ? '' : 's'} found.`,
  );
  return lines;
}
