/**
 * `xen-blockhooks simulate`: be the domain builder for one disk, without Xen.
 *
 * It writes the nodes libxl's device_disk_add() writes (xl syntax) or xend's blkif controller's
 * (xm syntax) in one transaction into an embedded xenstore server (or the real xenstored with
 * --real-xenstore), runs the hook as libxl runs it (child process, environment, timeout), and
 * moves the backend through the states blkback and libxl would.
 *
 * Safety: with the embedded server the hook keeps its journal and locks under
 * <state_dir>/simulate, so a real disk's record is never its to find or undo. What is shared
 * host-wide beyond the journal (block-thin's one pool, block-qcow's choice of a free /dev/nbdN) a
 * simulated hook would decide blind to the real disks, so it is refused before anything is built:
 * block-thin while the real journal holds a block-thin or pool record, or while the pool, its
 * devices or files exist and simulate did not make them (a remove only for the first reason);
 * block-qcow while the real journal holds a block-qcow record. With --real-xenstore the hooks use
 * the real journal and locks. Either way no hotplug log line is written unless
 * XEN_BLOCKHOOKS_LOG_FILE names a file.
 */
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { Config } from '../config/config.js';
import type { Runner } from '../devices/runner.js';
import { Journal, type JournalEntry } from '../journal/journal.js';
import { connectXenstore } from '../xenstore/client.js';
import { startXenstoreServer, type XenstoreServer } from '../xenstore/server.js';
import type { XenstoreClient, XsOps } from '../xenstore/types.js';
import { parseDisk, type Disk } from './diskspec.js';
import { readKernel, type KernelState } from './kernel.js';
import { recordStrings } from './inventory.js';
import { hookNamed, paramsSource } from '../backends/index.js';

export const SIMULATE_HELP = `Usage: xen-blockhooks simulate [options] DISKSPEC

Play the domain builder for one disk without Xen: write the backend and frontend nodes exactly
as libxl (xl syntax) or xend (xm syntax) does, run the hook's add as libxl runs it, print what
it built and the keys it wrote, then run remove and show that nothing is left.

DISKSPEC, xl syntax (xl-disk-configuration(5); target= takes the rest, spaces and commas included):
  'vdev=xvda,access=w,script=block-cow,target=/var/lib/xen/images/base.img 64'
DISKSPEC, xm syntax (<type>:<params>,<dev>,<mode>; the prefix becomes the backend's type):
  'cow:/var/lib/xen/images/base.img 64,xvda,w'
Several words are joined with spaces, so quoting the spec is optional.

Options:
  --domid N          the guest's domain id, 1 to 32751 (default 1)
  --name NAME        the guest's name, written to /local/domain/N/name (default sim<N>)
  --xl | --xm        force the syntax (default: xm only when xl would reject the prefix)
  --action add|remove  one step only: add (leaves the device, like --keep) or remove
  --keep             add only; leave the device and the nodes for a later --action remove
  --real-xenstore    use the running xenstored (XENSTORED_PATH or /var/run/xenstored/socket)
                     instead of an embedded server that lives only as long as this command;
                     a domain id that exists there (and was not made by simulate) is refused
  --script-dir DIR   run DIR/<script> as libxl would (e.g. /etc/xen/scripts, the installed
                     wrappers); default: node with the <script>.mjs bundle beside this program
  --timeout SECONDS  kill the hook after this long, as libxl does: 1 to 3600 (default 40)
  -h, --help         this text

Safety: with the embedded server the hook keeps its journal and locks in a namespace of its own
(<state_dir>/simulate); a backend path that has a record in the real journal, or a node in a
running xenstored, is refused, and so are block-thin while real block-thin disks or the thin pool
exist (they share one pool) and block-qcow while real block-qcow disks exist (they share the nbd
devices): use --real-xenstore for those. The hook writes no line to the hotplug log unless
XEN_BLOCKHOOKS_LOG_FILE names one. Real devices are still built (loop, device-mapper, nbd): that
is what is simulated for.

Exit status: 0 the hook did its job (and remove left nothing), 1 the hook failed or left
something behind (what, is printed), or was refused, 2 bad usage (a DISKSPEC that
xl or xm would refuse too).`;

/** The node simulate writes into a domain it makes, so that a later --real-xenstore run can tell its own domain from a real one. */
export const SIMULATED_MARK = 'xen-blockhooks-simulated';

/** The journal and lock namespace of simulate with the embedded xenstore. */
export function simulateStateDir(config: Config): string {
  return join(config.stateDir, 'simulate');
}

const BACKEND_DOMID = 0;

/**
 * Why the hook `script`, run with simulate's own journal, would share host-wide state with the
 * real disks (see the header), or undefined when it would not.
 */
export async function sharedStateConflict(
  script: string,
  action: SimulateOptions['action'],
  deps: { config: Config; run: Runner },
): Promise<string | undefined> {
  const backend = hookNamed(script);
  const shared = backend?.shared;
  if (!backend || !shared) return undefined;
  const hook = backend.script;
  const real = new Journal(deps.config.stateDir);
  const { entries, unreadable } = real.list();
  const users = entries.filter((e) => e.script === hook || shared.alsoUsedBy?.(e));
  const what = shared.what;
  if (users.length)
    return `${hook} disks share ${what} with the real ${hook} disks, and the real journal holds ${users.length === 1 ? 'one' : users.length}: ${users.map((e) => `${e.backendPath} (${real.file(e.backendPath)})`).join(', ')}`;
  if (unreadable.length)
    return `${hook} disks share ${what} with the real ${hook} disks, and the real journal has records that cannot be read (${unreadable.map((u) => u.file).join(', ')})`;
  if (!shared.present || action === 'remove') return undefined;
  // Made by a simulated disk that is still kept: simulate's own.
  const madeBy = shared.madeBy;
  if (madeBy && new Journal(simulateStateDir(deps.config)).list().entries.some((e) => madeBy(e))) return undefined;
  const found = await shared.present(deps);
  if (found.length) return `${hook} disks share ${what} with the real ${hook} disks: ${found.join('; ')}`;
  return undefined;
}

export interface SimulateOptions {
  spec: string;
  syntax: 'xl' | 'xm' | 'auto';
  domid: number;
  name: string;
  action: 'both' | 'add' | 'remove';
  realXenstore: boolean;
  scriptDir: string | undefined;
  timeoutMs: number;
}

export interface SimulateDeps {
  config: Config;
  run: Runner;
  env: NodeJS.ProcessEnv;
  out: (s: string) => void;
  err: (s: string) => void;
  /** Where the hook bundles are (default: beside this program, else the checkout's dist/). */
  bundleDir?: string;
}

/** `block-cow` for `cow:`; the drop-in `block` for the types it handles itself. */
export function scriptFor(disk: Disk): string {
  if (disk.syntax === 'xl') return disk.script ?? 'block';
  return disk.type === 'file' || disk.type === 'phy' ? 'block' : `block-${disk.type}`;
}

export function backendPaths(disk: Disk, domid: number) {
  const rel = `backend/vbd/${domid}/${disk.devid}`;
  return {
    rel,
    back: `/local/domain/${BACKEND_DOMID}/${rel}`,
    front: `/local/domain/${domid}/device/vbd/${disk.devid}`,
    libxl: `/libxl/${domid}/device/vbd/${disk.devid}`,
  };
}

/** The nodes the toolstack writes for this disk, in order: [path, value]. */
export function toolstackNodes(disk: Disk, domid: number, name: string, scriptPath: string): [string, string][] {
  const p = backendPaths(disk, domid);
  const nodes: [string, string][] = [
    [`/local/domain/${domid}/name`, name],
    [`/local/domain/${domid}/domid`, String(domid)],
    [`/local/domain/${domid}/${SIMULATED_MARK}`, '1'],
  ];
  if (disk.syntax === 'xl') {
    const b = (k: string, v: string) => nodes.push([`${p.back}/${k}`, v]);
    b('frontend', p.front);
    b('params', disk.target ?? '');
    b('script', scriptPath);
    b('frontend-id', String(domid));
    b('online', '1');
    b('removable', '0');
    b('bootable', '1');
    b('state', '1');
    b('dev', disk.vdev);
    b('type', 'phy');
    b('mode', disk.mode);
    b('device-type', disk.cdrom ? 'cdrom' : 'disk');
    b('discard-enable', disk.discard ? '1' : '0');
    b('specification', disk.specification ?? 'xen');
    if (disk.directIoSafe) b('direct-io-safe', '1');
    frontendNodes(nodes, p.front, p.back, disk);
    nodes.push([`${p.front}/trusted`, disk.trusted === false ? '0' : '1']);
    nodes.push([`${p.libxl}/frontend`, p.front], [`${p.libxl}/backend`, p.back]);
  } else {
    const b = (k: string, v: string) => nodes.push([`${p.back}/${k}`, v]);
    b('domain', name);
    b('frontend', p.front);
    b('frontend-id', String(domid));
    b('online', '1');
    b('state', '1');
    b('dev', disk.vdev);
    b('type', disk.type);
    b('params', disk.params);
    b('mode', disk.mode);
    frontendNodes(nodes, p.front, p.back, disk);
  }
  return nodes;
}

/** The frontend nodes both toolstacks write (xl adds `trusted` after them). */
function frontendNodes(nodes: [string, string][], front: string, back: string, disk: Disk): void {
  nodes.push(
    [`${front}/backend`, back],
    [`${front}/backend-id`, String(BACKEND_DOMID)],
    [`${front}/state`, '1'],
    [`${front}/virtual-device`, String(disk.devid)],
    [`${front}/device-type`, disk.cdrom ? 'cdrom' : 'disk'],
  );
}

/**
 * What the running xenstored (if one answers) has at `path`: a short description, or undefined
 * when there is no xenstored or no such node.
 */
async function realBackendNode(env: NodeJS.ProcessEnv, path: string): Promise<string | undefined> {
  let xs: XenstoreClient;
  try {
    xs = await connectXenstore({ env, timeoutMs: 2000 });
  } catch {
    return undefined;
  }
  try {
    if ((await xs.tryRead(path)) === undefined) return undefined;
    const pd = await xs.tryRead(`${path}/physical-device`);
    return pd ? `physical-device ${pd}` : 'a device being set up';
  } catch {
    return undefined;
  } finally {
    await xs.close().catch(() => {});
  }
}

/** The directory with the hook bundles: beside this program, or the checkout's dist/. */
export function defaultBundleDir(): string {
  const here = dirname(fileURLToPath(import.meta.url));
  for (const d of [here, resolve(here, '../../dist'), resolve(here, '../dist')]) {
    if (
      existsSync(join(d, 'xen-blockhooks.mjs')) ||
      existsSync(join(d, 'block-cow.mjs')) ||
      existsSync(join(d, 'block.mjs'))
    )
      return d;
  }
  return here;
}

interface HookRun {
  code: number | null;
  signal: string | null;
  ms: number;
  output: string;
  timedOut: boolean;
}

function runHookProcess(file: string, args: string[], env: NodeJS.ProcessEnv, timeoutMs: number): Promise<HookRun> {
  return new Promise((res) => {
    const t0 = Date.now();
    let output = '';
    let timedOut = false;
    const child = spawn(file, args, { env, cwd: '/', stdio: ['ignore', 'pipe', 'pipe'] });
    child.stdout.on('data', (d: Buffer) => {
      output += d.toString();
    });
    child.stderr.on('data', (d: Buffer) => {
      output += d.toString();
    });
    const timer = setTimeout(() => {
      timedOut = true;
      child.kill('SIGKILL');
    }, timeoutMs);
    child.on('error', (e) => {
      clearTimeout(timer);
      res({ code: 127, signal: null, ms: Date.now() - t0, output: `${output}${e.message}\n`, timedOut });
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      res({ code, signal, ms: Date.now() - t0, output, timedOut });
    });
  });
}

async function dump(xs: XsOps, path: string): Promise<[string, string][]> {
  const out: [string, string][] = [];
  let kids: string[];
  try {
    kids = await xs.directory(path);
  } catch {
    return out;
  }
  for (const k of kids.sort()) {
    const v = await xs.tryRead(`${path}/${k}`);
    if (v !== undefined) out.push([k, v]);
  }
  return out;
}

function describeDevice(majmin: string, k: KernelState, out: (s: string) => void): void {
  const [maj, min] = majmin.split(':').map((x) => parseInt(x, 16));
  const dm = k.dm.find((d) => d.major === maj && d.minor === min);
  const loopBy = (mm: string) => k.loops.find((l) => `${l.major}:${l.minor}` === mm || l.name === mm);
  if (dm) {
    out(`  device-mapper ${dm.name} (${maj}:${min}):`);
    for (const t of dm.table) out(`    table:  ${t}`);
    for (const s of dm.status) out(`    status: ${s}`);
    for (const t of dm.table) {
      for (const w of t.split(/\s+/).filter((x) => /^\d+:\d+$/.test(x))) {
        const l = loopBy(w);
        if (l) out(`    ${w} = ${l.name} on ${l.backFile ?? '?'}${l.readOnly ? ' (read-only)' : ''}`);
        const inner = k.dm.find((d) => `${d.major}:${d.minor}` === w);
        if (inner) out(`    ${w} = device-mapper ${inner.name}: ${inner.table.join(' | ')}`);
      }
    }
    return;
  }
  const l = loopBy(`${maj}:${min}`);
  if (l) {
    out(`  loop ${l.name} (${maj}:${min}) on ${l.backFile ?? '?'}${l.readOnly ? ' (read-only)' : ''}`);
    return;
  }
  const n = k.nbds.find((x) => x.name.endsWith(`nbd${(min ?? 0) >> 4}`) && maj === 43);
  if (n) {
    out(`  nbd ${n.name} served by process ${n.pid}: ${n.cmdline.join(' ')}`);
    return;
  }
  out(`  block device ${maj}:${min}`);
}

/** Kernel objects a record mentions that are still there (dm by name or maj:min, loops). */
function stillThere(entry: JournalEntry, k: KernelState, others: Set<string>): string[] {
  const refs = recordStrings(entry);
  const left: string[] = [];
  for (const d of k.dm)
    if (refs.has(d.name) || refs.has(`/dev/mapper/${d.name}`) || refs.has(`${d.major}:${d.minor}`))
      left.push(`dm ${d.name}`);
  for (const l of k.loops) {
    const mentioned = refs.has(l.name) || refs.has(`${l.major}:${l.minor}`);
    const shared = others.has(l.name) || others.has(`${l.major}:${l.minor}`);
    if (mentioned && !shared) left.push(`loop ${l.name} on ${l.backFile ?? '?'}`);
  }
  for (const n of k.nbds) if (refs.has(n.name)) left.push(`nbd ${n.name}`);
  return left;
}

/**
 * Devices that appeared during the run and belong to this disk: a dm device named after the
 * simulated domain, a loop or nbd on a file the disk names or in the store directory. (Other
 * domains and programs may make devices meanwhile: those are not this disk's leftovers.)
 */
function kernelDiff(
  before: KernelState,
  after: KernelState,
  ours: { name: string; files: string[]; storeDir: string },
): string[] {
  const dmBefore = new Set(before.dm.map((d) => d.name));
  const loopBefore = new Set(before.loops.map((l) => `${l.name} ${l.backFile}`));
  const nbdBefore = new Set(before.nbds.map((n) => n.name));
  const mine = (file: string | undefined) =>
    file !== undefined && (ours.files.includes(file) || file.startsWith(`${ours.storeDir}/`));
  return [
    ...after.dm.filter((d) => !dmBefore.has(d.name) && d.name.includes(`-${ours.name}-`)).map((d) => `dm ${d.name}`),
    ...after.loops
      .filter((l) => !loopBefore.has(`${l.name} ${l.backFile}`) && mine(l.backFile?.replace(/ \(deleted\)$/, '')))
      .map((l) => `loop ${l.name} on ${l.backFile ?? '?'}`),
    ...after.nbds.filter((n) => !nbdBefore.has(n.name) && n.cmdline.some((a) => mine(a))).map((n) => `nbd ${n.name}`),
  ];
}

export async function simulate(o: SimulateOptions, deps: SimulateDeps): Promise<number> {
  const { out, err } = deps;
  const disk = parseDisk(o.spec, o.syntax);
  const script = scriptFor(disk);
  let file: string;
  let args: string[];
  if (script.includes('/')) {
    file = script;
    args = [];
  } else if (o.scriptDir) {
    file = join(o.scriptDir, script);
    args = [];
  } else {
    const dir = deps.bundleDir ?? defaultBundleDir();
    const bundle = join(dir, `${script}.mjs`);
    if (!existsSync(bundle)) {
      err(
        `xen-blockhooks simulate: there is no ${script}.mjs in ${dir}; build the hooks (npm run build) or give --script-dir`,
      );
      return 1;
    }
    file = process.execPath;
    args = [bundle];
  }
  if (!existsSync(file)) {
    err(`xen-blockhooks simulate: ${file} does not exist`);
    return 1;
  }
  const scriptPath = script.includes('/') ? script : join(deps.config.xenScriptDir, script);
  const p = backendPaths(disk, o.domid);
  // The real journal: a record there is a real disk, never simulate's to touch.
  const realJournal = new Journal(deps.config.stateDir);
  const real = realJournal.load(p.rel);
  if (real && !o.realXenstore) {
    err(
      `xen-blockhooks simulate: ${p.rel} is a real disk (${real.script} record ${realJournal.file(p.rel)}${real.disk.domainName ? `, domain ${real.disk.domainName}` : ''}); simulate never touches it: choose another --domid`,
    );
    return 1;
  }
  if (!o.realXenstore) {
    const shared = await sharedStateConflict(script, o.action, deps);
    if (shared) {
      err(
        `xen-blockhooks simulate: ${shared}; with the embedded xenstore simulate keeps a journal of its own and could take or tear down what a real disk uses, so it builds nothing: run it with --real-xenstore (the hooks' own journal and locks)`,
      );
      return 1;
    }
  }
  const journal = o.realXenstore ? realJournal : new Journal(simulateStateDir(deps.config));

  let server: XenstoreServer | undefined;
  let sockDir: string | undefined;
  let xs: XenstoreClient | undefined;
  const hookEnv: NodeJS.ProcessEnv = { ...deps.env };
  // The real hotplug log gets no simulated line unless the caller names a log.
  if (deps.env.XEN_BLOCKHOOKS_LOG_FILE === undefined) hookEnv.XEN_BLOCKHOOKS_LOG_FILE = '';
  try {
    if (o.realXenstore) {
      xs = await connectXenstore({ env: deps.env, timeoutMs: 10_000 });
      out(`xenstore: the running xenstored`);
    } else {
      const live = await realBackendNode(deps.env, p.back);
      if (live) {
        err(
          `xen-blockhooks simulate: ${p.back} exists in the running xenstored (${live}); simulate never touches a real disk: choose another --domid`,
        );
        return 1;
      }
      sockDir = mkdtempSync(join(tmpdir(), 'xbh-simulate-'));
      server = await startXenstoreServer({ socketPath: join(sockDir, 'socket') });
      xs = await connectXenstore({ path: server.socketPath, timeoutMs: 10_000 });
      hookEnv.XENSTORED_PATH = server.socketPath;
      hookEnv.XEN_BLOCKHOOKS_STATE_DIR = simulateStateDir(deps.config);
      out(
        `xenstore: embedded server on ${server.socketPath} (lives as long as this command); journal and locks in ${simulateStateDir(deps.config)}`,
      );
    }
    const c = xs;
    out(
      `${disk.syntax} disk: vdev ${disk.vdev} → devid ${disk.devid}, mode ${disk.mode}, script ${script}, domain ${o.domid} (${o.name})`,
    );

    const existed = (await c.tryRead(p.back)) !== undefined;
    const domainExisted = (await c.tryRead(`/local/domain/${o.domid}`)) !== undefined;
    if (
      o.realXenstore &&
      domainExisted &&
      (await c.tryRead(`/local/domain/${o.domid}/${SIMULATED_MARK}`)) === undefined
    ) {
      const name = await c.tryRead(`/local/domain/${o.domid}/name`);
      err(
        `xen-blockhooks simulate: domain ${o.domid}${name ? ` (${name})` : ''} exists in the running xenstored and was not made by simulate; choose a --domid no domain has`,
      );
      return 1;
    }
    if (o.action !== 'remove' && existed) {
      err(
        `xen-blockhooks simulate: ${p.back} already exists (a device is attached there); remove it first with --action remove`,
      );
      return 1;
    }
    if (!existed) {
      const nodes = toolstackNodes(disk, o.domid, o.name, scriptPath);
      await c.transaction(async (tx) => {
        for (const [k, v] of nodes) await tx.write(k, v);
      });
      out(`wrote ${disk.syntax === 'xl' ? 'as libxl' : 'as xend'} does:`);
      for (const [k, v] of nodes) out(`  ${k} = ${JSON.stringify(v)}`);
    }
    const hookBaseEnv: NodeJS.ProcessEnv = {
      ...hookEnv,
      script: scriptPath,
      XENBUS_TYPE: 'vbd',
      XENBUS_PATH: p.rel,
      XENBUS_BASE_PATH: 'backend',
    };
    const shown = `${file === process.execPath ? `${file} ${args.join(' ')}` : file}`;
    let failed = false;
    let kernelBefore: KernelState | undefined;

    if (o.action !== 'remove') {
      kernelBefore = await readKernel(deps.run);
      await c.write(`${p.back}/state`, '2');
      out(`backend state 2 (InitWait, as blkback sets it); running: XENBUS_PATH=${p.rel} ${shown} add`);
      const before = new Map(await dump(c, p.back));
      const r = await runHookProcess(file, [...args, 'add'], hookBaseEnv, o.timeoutMs);
      out(
        `${script} add: ${r.timedOut ? `killed after ${o.timeoutMs} ms (SIGKILL, as libxl does)` : `exit ${r.code ?? r.signal}`} in ${r.ms} ms`,
      );
      for (const l of r.output.trimEnd().split('\n').filter(Boolean)) out(`  | ${l}`);
      const after = await dump(c, p.back);
      const written = after.filter(([k, v]) => before.get(k) !== v);
      out('the hook wrote:');
      for (const [k, v] of written) out(`  ${p.back}/${k} = ${JSON.stringify(v)}`);
      if (written.length === 0) out('  (nothing)');
      const pd = after.find(([k]) => k === 'physical-device')?.[1];
      if (r.code !== 0 || pd === undefined) {
        const he = after.find(([k]) => k === 'hotplug-error')?.[1];
        err(
          `xen-blockhooks simulate: ${script} add failed${he ? `: ${he}` : r.code === 0 ? ': it exited 0 without writing physical-device (xl would wait for a device that never comes)' : ''}`,
        );
        failed = true;
      } else {
        out(`built: physical-device ${pd} = ${after.find(([k]) => k === 'physical-device-path')?.[1] ?? '?'}`);
        describeDevice(pd, await readKernel(deps.run), out);
        const entry = journal.load(p.rel);
        if (entry) {
          out(`journal ${journal.file(p.rel)} (${entry.phase}):`);
          for (const s of entry.steps) out(`  ${s.kind}${s.done ? '' : ' (not done)'} ${JSON.stringify(s.data)}`);
        }
      }
      if (o.action === 'add' && !failed) {
        out(
          `kept: run "xen-blockhooks simulate --action remove --domid ${o.domid}${o.realXenstore ? ' --real-xenstore' : ''} DISKSPEC" to take it down`,
        );
        return 0;
      }
      // After a failed add libxl runs remove as well.
    }

    // remove, as libxl does it
    const entry = journal.load(p.rel);
    await c.transaction(async (tx) => {
      await tx.write(`${p.back}/online`, '0');
      await tx.write(`${p.back}/state`, '5');
    });
    await c.write(`${p.back}/state`, '6');
    out(`backend online 0, state 5 then 6 (Closing, Closed); running: XENBUS_PATH=${p.rel} ${shown} remove`);
    const r = await runHookProcess(file, [...args, 'remove'], hookBaseEnv, o.timeoutMs);
    out(
      `${script} remove: ${r.timedOut ? `killed after ${o.timeoutMs} ms` : `exit ${r.code ?? r.signal}`} in ${r.ms} ms`,
    );
    for (const l of r.output.trimEnd().split('\n').filter(Boolean)) out(`  | ${l}`);
    if (r.code !== 0) {
      const he = await c.tryRead(`${p.back}/hotplug-error`);
      err(`xen-blockhooks simulate: ${script} remove failed${he ? `: ${he}` : ''}`);
      failed = true;
    }
    const gone = [
      p.back,
      p.front,
      ...(disk.syntax === 'xl' ? [p.libxl] : []),
      ...(o.action === 'both' && !domainExisted ? [`/local/domain/${o.domid}`] : []),
    ];
    for (const path of gone) {
      if ((await c.tryRead(path)) !== undefined) await c.rm(path);
    }
    out(`removed ${gone.join(', ')} (as the toolstack does after remove)`);

    const kernelAfter = await readKernel(deps.run);
    // Devices another record uses (a real disk's too: a read-only file: disk shares its loop) are not this disk's leftovers.
    const others = new Set<string>();
    for (const j of new Set([journal, realJournal]))
      for (const e of j.list().entries) for (const s of recordStrings(e)) others.add(s);
    const left: string[] = [];
    if (journal.load(p.rel)) left.push(`journal record ${journal.file(p.rel)}`);
    if (entry) left.push(...stillThere(entry, kernelAfter, others));
    const source = paramsSource(script, disk.syntax === 'xl' ? (disk.target ?? '') : disk.params);
    const files = source.startsWith('/') ? [source] : [];
    if (kernelBefore)
      for (const d of kernelDiff(kernelBefore, kernelAfter, { name: o.name, files, storeDir: deps.config.storeDir }))
        if (!left.includes(d)) left.push(d);
    if (left.length) {
      err(`xen-blockhooks simulate: remove left behind: ${left.join('; ')}`);
      return 1;
    }
    out(
      `nothing left: no record, no device-mapper device, loop or nbd of this disk${kernelBefore ? ' (the kernel holds the same devices as before add)' : ''}`,
    );
    return failed ? 1 : 0;
  } finally {
    await xs?.close().catch(() => {});
    await server?.close().catch(() => {});
    if (sockDir) rmSync(sockDir, { recursive: true, force: true });
  }
}
