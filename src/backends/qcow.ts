/**
 * block-qcow: QCOW2 (and other qemu formats) as a block device through qemu-nbd.
 *
 *   direct   the image itself ──qemu-nbd (--read-only for access=r)──→ /dev/nbdN ─→ guest
 *   overlay  the image (read-only, as backing) ← per-disk qcow2 overlay in store_dir
 *            ──qemu-nbd──→ /dev/nbdN ─→ guest; transient (deleted on remove) or persistent
 *
 * params: `<image> [overlay=no|transient|persistent] [format=FMT] [name=NAME] [cache=MODE]`
 * (docs/block-qcow.md). Default direct: a disk that silently forgets its writes is a worse
 * surprise than a second writer refused with "busy".
 *
 * add first checks the image and its whole backing chain: below image_dirs, regular files, format
 * detected once (or pinned with format=), no external data file, not encrypted. Steps, journaled
 * before each runs and undone newest first:
 *   qcow-use      the claim on the files this disk reads and writes, made under their base locks;
 *                 `busy` when a file would get a second writer, or a writer while others read it.
 *   qcow-overlay  (overlay mode) `qemu-img create` into a 0600 O_EXCL file; a persistent one is
 *                 reused when its backing is this base. Undo deletes a transient or unused one.
 *   nbd           a free /dev/nbdN reserved in the record under the nbd lock, then `qemu-nbd
 *                 --connect`, checked to be served by the daemon of our pid file.
 */
import {
  closeSync,
  existsSync,
  linkSync,
  lstatSync,
  mkdirSync,
  openSync,
  constants as fsc,
  readdirSync,
  readFileSync,
  rmSync,
  unlinkSync,
  writeFileSync,
} from 'node:fs';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import type { Config } from '../config/config.js';
import { describeFailure, type Runner } from '../devices/runner.js';
import {
  CACHE_MODES,
  KNOWN_FORMATS,
  isKnownFormat,
  isQemuLockConflict,
  parseQemuImgInfo,
  qemuImgCreateOverlay,
  qemuImgInfo,
  qemuImgResize,
  qemuNbdConnect,
  type ImageInfo,
} from '../devices/qemu.js';
import {
  disconnectOurs,
  ensureNbdModule,
  freeNbdDevices,
  nbdState,
  qemuNbdProcesses,
  readPidFile,
} from '../devices/nbd.js';
import type { DiskSpec } from '../disk/spec.js';
import { HotplugError, messageOf } from '../disk/errors.js';
import { findStep, type JournalEntry, type StepKind, type StepRecord } from '../journal/journal.js';
import type { QcowClaim } from '../journal/step-data.js';
import { backendPathKey } from '../disk/request.js';
import type { UndoContext, UndoRegistry } from '../journal/steps.js';
import { acquireFlock, type HeldLock } from '../lock/flock.js';
import { baseImageLockPath, lockOptions, nbdLockPath, stateLockPath } from '../lock/paths.js';
import { checkImagePath } from './image-path.js';
import { optionPairs, paramsRefusal, sourceOf, splitPathWords, whitespaceProblem } from './params-words.js';
import { looksLikeSize } from '../units/size.js';
import { deviceSectors, devString, devT } from '../devices/sysfs.js';
import { addStoreOwner, ensureStoreDir, STEP as SHARED_STEP, undoStoreOwner } from './steps.js';
import { backendIds, domainOwner, persistentOwner } from './naming.js';
import type { Backend, BuiltDevice, HookContext } from './types.js';
import {
  diskLabel,
  GrowError,
  human,
  refuseIfRecorded,
  wholeMiB,
  type ResizeDeps,
  type ResizeResult,
} from './growth.js';

export const SCRIPT = 'block-qcow';
export const STEP = { use: 'qcow-use', overlay: 'qcow-overlay', nbd: 'nbd' } as const satisfies Record<
  string,
  StepKind
>;

export type OverlayKind = 'no' | 'transient' | 'persistent';

export interface QcowParams {
  image: string;
  overlay: OverlayKind;
  /** Pinned format (format=); detected when absent. */
  format: string | undefined;
  /** Persistent overlay file name (name=, without .qcow2). */
  name: string | undefined;
  cache: string | undefined;
}

const NAME = /^[A-Za-z0-9_+@-][A-Za-z0-9._+@-]{0,99}$/;
const GRAMMAR = '<image> [overlay=no|transient|persistent] [format=FMT] [name=NAME] [cache=MODE]';

const bad = paramsRefusal(SCRIPT, GRAMMAR, '/srv/xen/debian.qcow2 overlay=transient');

/** Bare words that were meant as an option: a path cannot end in one. */
const OPTION_WORDS = new Set<string>([
  'overlay',
  'format',
  'name',
  'cache',
  'no',
  'none',
  'transient',
  'persistent',
  ...KNOWN_FORMATS,
  ...CACHE_MODES,
]);

export function parseQcowParams(params: string): QcowParams {
  const split = splitPathWords(params, (w) => /^[A-Za-z_]+=/.test(w));
  if (split === undefined) throw bad(params, 'no image given');
  const image = split.path;
  const first = image.split(/\s/, 1)[0] as string;
  if (first.includes('=') && !first.startsWith('/'))
    throw bad(params, `the first word "${first}" looks like an option; the image path comes first`);
  if (!image.startsWith('/'))
    throw bad(
      params,
      `the image "${first}" is not an absolute path; give the full path, e.g. /srv/xen/${first.replace(/^.*\//, '')}`,
    );
  const ws = whitespaceProblem(image, 'image');
  if (ws) throw bad(params, ws);
  const last = split.lastWord;
  if (last !== undefined && looksLikeSize(last))
    throw bad(
      params,
      `"${last}" is not a key=value option: block-qcow takes no size (the image's own size is the disk's), and a path cannot end in a word that looks like one`,
    );
  if (last !== undefined && OPTION_WORDS.has(last))
    throw bad(
      params,
      `"${last}" is not a key=value option (e.g. overlay=transient), and a path cannot end in a word that is an option's name or value`,
    );
  const out: QcowParams = { image, overlay: 'no', format: undefined, name: undefined, cache: undefined };
  for (const [key, value] of optionPairs(split.rest, (what) => bad(params, what))) {
    switch (key) {
      case 'overlay':
        if (value === 'no' || value === 'none') out.overlay = 'no';
        else if (value === 'transient' || value === 'persistent') out.overlay = value;
        else throw bad(params, `overlay=${value}: the value must be no, transient or persistent`);
        break;
      case 'format':
        if (!isKnownFormat(value)) throw bad(params, `format=${value}: known formats are ${KNOWN_FORMATS.join(', ')}`);
        out.format = value;
        break;
      case 'name':
        if (value.includes('/'))
          throw bad(
            params,
            `name=${value}: give a plain name, not a path; overlays always live in the store directory`,
          );
        if (!NAME.test(value))
          throw bad(
            params,
            `name=${value}: the name may hold letters, digits, ".", "_", "-", "+", "@" only and must not start with "."`,
          );
        out.name = value;
        break;
      case 'cache':
        if (!(CACHE_MODES as readonly string[]).includes(value))
          throw bad(params, `cache=${value}: known modes are ${CACHE_MODES.join(', ')}`);
        out.cache = value;
        break;
      default:
        throw bad(params, `unknown option "${key}" (known: overlay=, format=, name=, cache=)`);
    }
  }
  if (out.name !== undefined && out.overlay !== 'persistent')
    throw bad(params, `name=${out.name} names a persistent overlay; add overlay=persistent or drop name=`);
  return out;
}

// ---------------------------------------------------------------------------------------------
// names

/** Overlays live in `<storeDir>/qcow/`: persistent ones by owner and vdev (or name=), transient ones by backend path plus a random part. */
export function overlayPath(
  config: Config,
  p: QcowParams,
  disk: Pick<DiskSpec, 'domainName' | 'frontendId' | 'vdev'>,
  xenbusPath: string,
): string {
  const { domid, devid } = backendIds(xenbusPath);
  const dir = join(config.storeDir, 'qcow');
  if (p.overlay === 'persistent') {
    if (p.name !== undefined) return join(dir, `${p.name}.qcow2`);
    persistentOwner(SCRIPT, disk, xenbusPath, 'overlay', 'name=NAME'); // refused for a dom0 attach
    const owner = domainOwner(disk.domainName);
    if (owner === undefined) {
      throw new HotplugError(
        `${SCRIPT}: a persistent overlay is named after its domain, and /local/domain/${disk.frontendId ?? domid}/name is not set; give the overlay a name with name=NAME.`,
      );
    }
    return join(dir, `${owner}-${disk.vdev ?? devid}.qcow2`);
  }
  return join(dir, `transient-${domid}-${devid}-${randomBytes(4).toString('hex')}.qcow2`);
}

export function pidFilePath(config: Config, xenbusPath: string): string {
  return join(config.stateDir, 'qcow', `${backendPathKey(xenbusPath)}.qemu-nbd.pid`);
}

// ---------------------------------------------------------------------------------------------
// plan and checks

export interface QcowPlan {
  params: QcowParams;
  /** The image, resolved. */
  image: string;
  readOnly: boolean;
  overlay: OverlayKind;
  overlayPath: string | undefined;
  cache: string;
  pidFile: string;
}

export function planQcow(disk: DiskSpec, ctx: { config: Config; xenbusPath: string }): QcowPlan {
  const params = parseQcowParams(disk.params);
  const img = checkImagePath(params.image, ctx.config.imageDirs, { what: `${SCRIPT} image`, fromParams: true });
  const readOnly = disk.mode === 'r';
  // access=r needs no overlay: the image itself is exported read-only.
  const overlay: OverlayKind = readOnly ? 'no' : params.overlay;
  return {
    params,
    image: img.real,
    readOnly,
    overlay,
    overlayPath: overlay === 'no' ? undefined : overlayPath(ctx.config, params, disk, ctx.xenbusPath),
    cache: params.cache ?? ctx.config.qcow.cache,
    pidFile: pidFilePath(ctx.config, ctx.xenbusPath),
  };
}

async function imgInfo(
  run: Runner,
  image: string,
  opts: { format?: string; backingChain?: boolean },
): Promise<ImageInfo[]> {
  const r = await qemuImgInfo(run, image, opts);
  if (r.failed) {
    const why = describeFailure(r);
    throw new HotplugError(
      `${SCRIPT}: qemu-img cannot read ${image}${opts.format ? ` as ${opts.format}` : ''}: ${why}`,
    );
  }
  try {
    return parseQemuImgInfo(r.stdout);
  } catch (e) {
    throw new HotplugError(`${SCRIPT}: ${image}: ${messageOf(e)}`);
  }
}

export interface ChainFile {
  path: string;
  format: string;
  dev: string;
  ino: string;
}

/**
 * Check a backing chain as qemu-img reported it (element 0 is the image itself, already checked
 * by the caller): every backing file resolves below image_dirs, is a regular file and is the
 * file qemu named; every link records its format; no element has an external data file or is
 * encrypted. Returns the files with their identities.
 */
export function checkChain(chain: ImageInfo[], config: Config, topWhat: string): ChainFile[] {
  const out: ChainFile[] = [];
  chain.forEach((el, i) => {
    const what = i === 0 ? topWhat : `backing file ${el.filename} (of ${chain[i - 1]?.filename})`;
    if (!isKnownFormat(el.format))
      throw new HotplugError(
        `${SCRIPT}: ${what} has format "${el.format}", which is not accepted (known: ${KNOWN_FORMATS.join(', ')}).`,
      );
    if (el.encrypted)
      throw new HotplugError(
        `${SCRIPT}: ${what} is encrypted; qemu-nbd would need its key, which a hotplug script cannot supply.`,
      );
    if (el.dataFile !== undefined)
      throw new HotplugError(
        `${SCRIPT}: ${what} keeps its data in an external file (${el.dataFile}); such images are refused: convert it with qemu-img convert.`,
      );
    const st = i === 0 ? undefined : checkImagePath(el.filename, config.imageDirs, { what: `${SCRIPT} ${what}` });
    const path = st ? st.real : el.filename;
    const s = st ? st.stat : lstatSync(path, { bigint: true });
    out.push({ path, format: el.format, dev: devString(s.dev), ino: s.ino.toString() });
    const next = chain[i + 1];
    if (el.fullBackingFilename !== undefined || el.backingFilename !== undefined) {
      if (el.backingFormat === undefined) {
        throw new HotplugError(
          `${SCRIPT}: ${what} names its backing file ${el.fullBackingFilename ?? el.backingFilename} without its format, so qemu would probe it; record it with "qemu-img rebase -u -b BACKING -F FORMAT ${el.filename}".`,
        );
      }
      if (!next)
        throw new HotplugError(
          `${SCRIPT}: ${what} names backing file ${el.fullBackingFilename ?? el.backingFilename}, which qemu-img could not open.`,
        );
      if (next.format !== el.backingFormat)
        throw new HotplugError(
          `${SCRIPT}: ${what} says its backing file is ${el.backingFormat}, but qemu-img read ${next.filename} as ${next.format}.`,
        );
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// claims (sharing)

/** One file of the image chain as this disk uses it (journal/step-data.ts). */
export type Claim = QcowClaim;

interface OtherUse {
  backendPath: string;
  domainName: string | undefined;
  role: 'r' | 'w';
  how: string;
}

/** Every other record's use of `key`: block-qcow claims, and block-cow base references (read-only). */
export function usersOf(entries: JournalEntry[], key: string, self: string): OtherUse[] {
  const out: OtherUse[] = [];
  for (const e of entries) {
    if (e.backendPath === self) continue;
    for (const s of e.steps) {
      if (s.kind === STEP.use) {
        for (const c of s.data.claims) {
          if (c.key === key)
            out.push({
              backendPath: e.backendPath,
              domainName: e.disk.domainName,
              role: c.role,
              how: `${e.script} (${c.role === 'w' ? 'writing' : 'reading'} ${c.path})`,
            });
        }
      } else if (s.kind === 'base-ref' && s.data.key === key) {
        out.push({
          backendPath: e.backendPath,
          domainName: e.disk.domainName,
          role: 'r',
          how: `${e.script} (base image, read-only)`,
        });
      }
    }
  }
  return out;
}

function describe(u: OtherUse): string {
  return `${u.backendPath}${u.domainName ? ` (domain ${u.domainName})` : ''} via ${u.how}`;
}

/** Loops over a file (from sysfs): name and whether read-only. */
function loopsOn(dev: string, ino: string): { name: string; readOnly: boolean }[] {
  const out: { name: string; readOnly: boolean }[] = [];
  const names = readdirSafe('/sys/block').filter((n) => /^loop\d+$/.test(n));
  for (const n of names) {
    const back = readSafe(`/sys/block/${n}/loop/backing_file`);
    if (!back) continue;
    let match = false;
    try {
      const st = lstatSync(back.replace(/ \(deleted\)$/, ''), { bigint: true });
      match = devString(st.dev) === dev && st.ino.toString() === ino;
    } catch {
      match = false;
    }
    if (match) out.push({ name: `/dev/${n}`, readOnly: readSafe(`/sys/block/${n}/ro`) === '1' });
  }
  return out;
}

function readdirSafe(p: string): string[] {
  try {
    return readdirSync(p);
  } catch {
    return [];
  }
}
function readSafe(p: string): string | undefined {
  try {
    return readFileSync(p, 'utf8').trim();
  } catch {
    return undefined;
  }
}

/** Refuse (busy) when the claims would give a file a second writer or a writer to a file in use. */
export function checkClaims(claims: Claim[], entries: JournalEntry[], self: string): void {
  for (const c of claims) {
    const others = usersOf(entries, c.key, self).filter((u) => c.role === 'w' || u.role === 'w');
    if (others.length > 0) {
      const o = others[0] as OtherUse;
      const verb = c.role === 'w' ? 'cannot be given writable' : 'cannot be read';
      throw new HotplugError(
        `${SCRIPT}: ${c.path} ${verb}: it is in use by ${describe(o)}${others.length > 1 ? ` and ${others.length - 1} more` : ''}; ` +
          (c.role === 'w'
            ? 'an image has one writer and no readers while written: remove that disk first, or use overlay=transient to give each domain its own writes.'
            : 'it is being written: remove that disk first.'),
        'busy',
      );
    }
    const m = /^(\d+:\d+):(\d+)$/.exec(c.key);
    if (m) {
      const loops = loopsOn(m[1] as string, m[2] as string).filter((l) => c.role === 'w' || !l.readOnly);
      if (loops.length > 0) {
        throw new HotplugError(
          `${SCRIPT}: ${c.path} is attached ${loops.some((l) => !l.readOnly) ? 'writable ' : ''}to ${loops.map((l) => l.name).join(', ')}; ` +
            `${c.role === 'w' ? 'it cannot be given writable while something else uses it' : 'it cannot be read while something writes it'}: detach that first.`,
          'busy',
        );
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// add

async function lockAll(paths: string[], ctx: { config: Config; run: Runner }): Promise<HeldLock[]> {
  const held: HeldLock[] = [];
  try {
    for (const p of [...new Set(paths)].sort()) held.push(await acquireFlock(p, lockOptions(ctx.config, ctx.run)));
  } catch (e) {
    for (const l of held.reverse()) await l.release();
    throw e;
  }
  return held;
}

function claimLockPath(config: Config, c: Claim): string {
  const m = /^(\d+):(\d+):(\d+)$/.exec(c.key);
  if (m) return baseImageLockPath(config.stateDir, { dev: devT(`${m[1]}:${m[2]}`), ino: BigInt(m[3] as string) });
  return stateLockPath(
    config.stateDir,
    `qcow-overlay-${c.path.replace(/^.*\//, '').replace(/[^A-Za-z0-9._+@=-]/g, '_')}`,
  );
}

/** Made O_EXCL, mode 0600, never through a symlink. */
function createEmpty(path: string): void {
  closeSync(openSync(path, fsc.O_WRONLY | fsc.O_CREAT | fsc.O_EXCL | fsc.O_NOFOLLOW, 0o600));
}

async function makeOverlay(run: Runner, path: string, base: ChainFile): Promise<void> {
  const r = await qemuImgCreateOverlay(run, path, base.path, base.format);
  if (r.failed)
    throw new HotplugError(`${SCRIPT}: qemu-img could not create the overlay ${path}: ${describeFailure(r)}`);
}

/** nbd devices other records name (connected or reserved by an add in progress or killed). */
export function reservedDevices(entries: JournalEntry[], self: string): Set<string> {
  const out = new Set<string>();
  for (const e of entries) {
    if (e.backendPath === self) continue;
    for (const st of e.steps) if (st.kind === STEP.nbd && st.data.device !== undefined) out.add(st.data.device);
  }
  return out;
}

/** A persistent overlay found in place must be a qcow2 whose backing file is this very base. */
async function checkExistingOverlay(run: Runner, path: string, base: ChainFile, config: Config): Promise<void> {
  const st = lstatSync(path);
  if (!st.isFile())
    throw new HotplugError(
      `${SCRIPT}: the persistent overlay ${path} is not a regular file; move it away or choose another name=.`,
    );
  const chain = await imgInfo(run, path, { format: 'qcow2', backingChain: true });
  const top = chain[0] as ImageInfo;
  const backing = chain[1];
  if (!backing || top.backingFormat !== base.format) {
    throw new HotplugError(
      `${SCRIPT}: the persistent overlay ${path} is not an overlay of ${base.path} (${base.format}); move it away or choose another name=.`,
    );
  }
  const checked = checkChain(chain, config, `persistent overlay ${path}`);
  const b = checked[1] as ChainFile;
  if (b.dev !== base.dev || b.ino !== base.ino) {
    throw new HotplugError(
      `${SCRIPT}: the persistent overlay ${path} has backing file ${backing.filename}, not ${base.path}; move it away or choose another name=.`,
    );
  }
}

async function connect(ctx: HookContext, plan: QcowPlan, image: string, format: string): Promise<BuiltDevice> {
  mkdirSync(join(ctx.config.stateDir, 'qcow'), { recursive: true, mode: 0o700 });
  rmSync(plan.pidFile, { force: true });
  const info = await ctx.build.step(
    STEP.nbd,
    { pidFile: plan.pidFile, image, format, readOnly: plan.readOnly },
    async (note) => {
      // The nbd lock covers only the choice: a device the kernel shows free and no other record
      // names (a record is the reservation, written before the lock is released), so concurrent
      // adds connect in parallel and a killed add's device stays reserved until its record goes.
      const lock = await acquireFlock(nbdLockPath(ctx.config.stateDir), lockOptions(ctx.config, ctx.run));
      let device: string | undefined;
      try {
        await ensureNbdModule(ctx.run);
        const taken = reservedDevices(ctx.journal.list().entries, ctx.request.xenbusPath);
        device = freeNbdDevices().find((d) => !taken.has(d));
        if (!device)
          throw new HotplugError(
            `${SCRIPT}: every nbd device is in use or reserved; remove a disk, or reload the nbd module with a larger nbds_max.`,
          );
        note({ device });
      } finally {
        await lock.release();
      }
      const r = await qemuNbdConnect(
        ctx.run,
        { device, image, format, readOnly: plan.readOnly, pidFile: plan.pidFile, cache: plan.cache, discard: true },
        20_000,
      );
      if (r.failed) {
        const why =
          r.timedOut || r.signal
            ? describeFailure(r)
            : r.stderr.trim().split('\n').filter(Boolean).join(' ') || describeFailure(r);
        if (isQemuLockConflict(r.stderr)) {
          throw new HotplugError(
            `${SCRIPT}: ${image} is in use by another program (qemu's image lock: ${why}); stop that user first.`,
            'busy',
          );
        }
        throw new HotplugError(`${SCRIPT}: qemu-nbd could not export ${image} on ${device}: ${why}`);
      }
      const pid = readPidFile(plan.pidFile);
      const s = nbdState(device);
      if (pid === undefined || !s || s.owner !== pid) {
        throw new HotplugError(
          `${SCRIPT}: qemu-nbd reported success but ${device} is not served by it (pid file ${plan.pidFile}: ${pid ?? 'empty'}, device owner: ${s?.owner ?? 'none'}).`,
        );
      }
      if (s.sectors === 0) throw new HotplugError(`${SCRIPT}: ${device} is connected but has size 0.`);
      if (plan.readOnly && !s.readOnly)
        throw new HotplugError(`${SCRIPT}: ${device} should be read-only but the kernel says it is writable.`);
      return { device, pid, major: s.major, minor: s.minor };
    },
    (r) => ({ device: r.device, pid: r.pid, major: r.major, minor: r.minor }),
  );
  return { path: info.device, major: info.major, minor: info.minor };
}

export async function addQcow(ctx: HookContext, plan: QcowPlan): Promise<BuiltDevice> {
  const { config, run } = ctx;
  // Format: detected once (or pinned), then always given.
  const format = plan.params.format ?? (await imgInfo(run, plan.image, {}))[0]?.format;
  if (format === undefined || !isKnownFormat(format))
    throw new HotplugError(
      `${SCRIPT}: ${plan.image} has format "${format}", which is not accepted (known: ${KNOWN_FORMATS.join(', ')}); pin it with format=.`,
    );
  const chain = checkChain(
    await imgInfo(run, plan.image, { format, backingChain: true }),
    config,
    `image ${plan.image}`,
  );
  const top = chain[0] as ChainFile;
  if (top.format !== format)
    throw new HotplugError(`${SCRIPT}: qemu-img read ${plan.image} as ${top.format}, not ${format}.`);

  const claims: Claim[] = chain.map((f, i) => ({
    key: `${f.dev}:${f.ino}`,
    path: f.path,
    role: i === 0 && plan.overlay === 'no' && !plan.readOnly ? 'w' : 'r',
  }));
  if (plan.overlay === 'persistent' && plan.overlayPath)
    claims.push({ key: `path:${plan.overlayPath}`, path: plan.overlayPath, role: 'w' });

  const locks = await lockAll(
    claims.map((c) => claimLockPath(config, c)),
    ctx,
  );
  try {
    await ctx.build.step(STEP.use, { claims }, async () => {
      const { entries, unreadable } = ctx.journal.list();
      if (unreadable.length > 0)
        ctx.log.warn(
          `journal records ${unreadable.map((u) => u.file).join(', ')} cannot be read; their disks are not seen by the sharing check`,
        );
      checkClaims(claims, entries, ctx.request.xenbusPath);
    });
  } finally {
    for (const l of locks.reverse()) await l.release();
  }

  if (plan.overlay === 'no') return connect(ctx, plan, top.path, format);

  const path = plan.overlayPath as string;
  ensureStoreDir(config.storeDir);
  ensureStoreDir(join(config.storeDir, 'qcow'));
  const persistent = plan.overlay === 'persistent';
  let existed = false;
  if (persistent) {
    try {
      lstatSync(path);
      existed = true;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e;
    }
  }
  // On shared storage, one host at a time (lock/store-owner.ts).
  if (persistent) await addStoreOwner(ctx, SCRIPT, path);
  const tmp = persistent && !existed ? `${path}.${process.pid}.new` : undefined;
  await ctx.build.step(
    STEP.overlay,
    { path, persistent, existed, ...(tmp ? { tmp } : {}), base: top.path },
    async () => {
      if (existed) return checkExistingOverlay(run, path, top, config);
      const target = tmp ?? path;
      createEmpty(target);
      await makeOverlay(run, target, top);
      if (tmp) {
        linkSync(tmp, path); // EEXIST: someone made it meanwhile, which the claim rules out
        unlinkSync(tmp);
      }
    },
  );
  if (existed) await applyPendingResize(ctx, path);
  return connect(ctx, plan, path, 'qcow2');
}

// ---------------------------------------------------------------------------------------------
// resize: qemu-nbd serves a fixed size and holds the image locked, so nothing is resized online.
// A persistent overlay's new size is written next to it (`<overlay>.resize`) and applied with
// `qemu-img resize` at its next add, before qemu-nbd opens it. A transient overlay, or an image
// served directly, is refused.

function pendingPath(overlay: string): string {
  return `${overlay}.resize`;
}

async function applyPendingResize(ctx: HookContext, overlay: string): Promise<void> {
  const file = pendingPath(overlay);
  if (!existsSync(file)) return;
  const bytes = Number((JSON.parse(readFileSync(file, 'utf8')) as { bytes?: unknown }).bytes);
  const r = await qemuImgResize(ctx.run, overlay, bytes);
  if (r.failed)
    throw new HotplugError(
      `${SCRIPT}: qemu-img could not resize the persistent overlay ${overlay} to ${human(bytes)} as "xen-blockhooks resize" asked: ${describeFailure(r)}; delete ${file} to attach it at its old size.`,
    );
  unlinkSync(file);
  ctx.log.info(
    `${ctx.request.xenbusPath}: persistent overlay ${overlay} resized to ${human(bytes)} (asked by xen-blockhooks resize)`,
  );
}

async function resizeQcow(entry: JournalEntry, bytes: number, deps: ResizeDeps): Promise<ResizeResult> {
  const who = diskLabel(entry);
  const overlay = findStep(entry.steps, STEP.overlay, (s) => s.done);
  if (!overlay || !overlay.data.persistent) {
    throw new GrowError(
      `${who}: qemu-nbd serves a fixed size, so block-qcow resizes only a persistent overlay, at its next add; this disk has ${overlay ? 'a transient overlay (a new one is made at every add)' : 'no overlay (resize the image with qemu-img while no domain uses it)'}`,
    );
  }
  const before = entry.device ? deviceSectors(deps.run, entry.device.major, entry.device.minor) * 512 : 0;
  const after = wholeMiB(bytes);
  if (after < before)
    throw new GrowError(
      `${who} is ${human(before)}: block-qcow never shrinks an overlay (the guest's data past the new end would be cut off)`,
    );
  if (after === before) throw new GrowError(`${who} is already ${human(before)}`);
  const path = overlay.data.path;
  writeFileSync(pendingPath(path), `${JSON.stringify({ bytes: after, asked: new Date().toISOString() })}\n`, {
    mode: 0o600,
  });
  const how = `recorded in ${pendingPath(path)}; qemu-img resize at the disk's next add (qemu-nbd serves a fixed size)`;
  deps.log.info(`resize ${entry.backendPath} (${who}): ${human(before)} → ${human(after)}: ${how}`, {
    action: 'resize',
  });
  return {
    backendPath: entry.backendPath,
    script: entry.script,
    target: path,
    beforeBytes: before,
    afterBytes: after,
    online: false,
    how,
  };
}

/** A persistent overlay not attached: `qemu-img resize` in place, now. */
async function resizeQcowDetached(plan: QcowPlan, bytes: number, deps: ResizeDeps): Promise<ResizeResult> {
  if (plan.overlay !== 'persistent' || !plan.overlayPath) {
    throw new GrowError(
      `block-qcow resizes only a persistent overlay; this disk has ${plan.overlay === 'transient' ? 'a transient overlay (a new one at every add)' : 'no overlay (resize the image with qemu-img while no domain uses it)'}`,
    );
  }
  const path = plan.overlayPath;
  if (!existsSync(path))
    throw new GrowError(
      `the persistent overlay ${path} does not exist yet: nothing to resize (its first add makes it, as large as the image)`,
    );
  refuseIfRecorded(deps.journal, path, 'the overlay');
  if (qemuNbdUsing(path)) throw new GrowError(`the overlay ${path} is served by qemu-nbd: not resized`);
  const info = await qemuImgInfo(deps.run, path, { format: 'qcow2' });
  if (info.failed) throw new GrowError(`qemu-img cannot read ${path}: ${describeFailure(info)}`);
  const before = parseQemuImgInfo(info.stdout)[0]?.virtualSize ?? 0;
  const after = wholeMiB(bytes);
  if (after < before)
    throw new GrowError(
      `the overlay is ${human(before)}: block-qcow never shrinks an overlay (the guest's data past the new end would be cut off)`,
    );
  if (after === before) throw new GrowError(`the overlay is already ${human(before)}`);
  const r = await qemuImgResize(deps.run, path, after);
  if (r.failed) throw new GrowError(`qemu-img could not resize ${path}: ${describeFailure(r)}`);
  const how = `${path} resized (qemu-img resize)`;
  deps.log.info(`resize of a detached disk: ${human(before)} → ${human(after)}: ${how}`, { action: 'resize' });
  return { backendPath: '', script: SCRIPT, target: path, beforeBytes: before, afterBytes: after, online: false, how };
}

// ---------------------------------------------------------------------------------------------
// undo

async function undoNbd(step: StepRecord<'nbd'>, ctx: UndoContext): Promise<void> {
  const { pidFile, device, pid } = step.data;
  await disconnectOurs(ctx.run, { device, pidFile, pid }, Math.min(ctx.config.busyRetryMs, 10_000));
}

async function undoOverlay(step: StepRecord<'qcow-overlay'>, ctx: UndoContext): Promise<void> {
  const { path, tmp } = step.data;
  if (tmp !== undefined) rmSync(tmp, { force: true });
  if (step.data.persistent) {
    // Kept, unless this very add created it (the claim made the name ours alone) and never
    // handed it to a guest.
    if (!step.data.existed && ctx.entry.device === undefined) {
      if (qemuNbdUsing(path)) throw new Error(`overlay ${path} is still open by qemu-nbd; not deleting it`);
      rmSync(path, { force: true });
    }
    return;
  }
  if (qemuNbdUsing(path)) throw new Error(`overlay ${path} is still open by qemu-nbd; not deleting it`);
  rmSync(path, { force: true });
}

/** Whether a qemu-nbd of ours still has `path` open (by its argv). */
function qemuNbdUsing(path: string): boolean {
  return qemuNbdProcessesServing(path).length > 0;
}

function qemuNbdProcessesServing(path: string): number[] {
  const out: number[] = [];
  for (const p of readdirSafe('/proc').filter((x) => /^\d+$/.test(x))) {
    let argv: string[];
    try {
      argv = readFileSync(`/proc/${p}/cmdline`).toString('utf8').split('\0');
    } catch {
      continue;
    }
    if (/(^|\/)qemu-nbd$/.test(argv[0] ?? '') && argv.includes(path)) out.push(Number(p));
  }
  return out;
}

/** The claim holds nothing but the record itself: dropping the step is the release. */
async function undoUse(): Promise<void> {}

export const qcowUndo: UndoRegistry = {
  [STEP.use]: undoUse,
  [SHARED_STEP.storeOwner]: undoStoreOwner,
  [STEP.overlay]: undoOverlay,
  [STEP.nbd]: undoNbd,
};

export const qcowBackend: Backend<QcowPlan> = {
  source: (params) => sourceOf(() => parseQcowParams(params).image),
  transient: (plan) =>
    !plan.readOnly && plan.overlay === 'transient'
      ? `transient qcow2 overlay ${plan.overlayPath ?? ''}`.trimEnd()
      : undefined,
  script: SCRIPT,
  summary:
    'qcow2 (and other qemu image formats) through qemu-nbd, directly or as per-domain overlays on a shared image',
  usage: [
    `params: ${GRAMMAR}`,
    '  image       absolute path of a disk image inside image_dirs (qcow2, raw, qcow, qed, vmdk, vdi, vhdx, vpc);',
    '              it may hold spaces (the key=value words after it are read from the right)',
    '  overlay=no          (default) export the image itself: access=w writes into it, access=r exports it read-only',
    '  overlay=transient   the domain writes into its own qcow2 overlay on the image, deleted on remove (LiveCD style)',
    '  overlay=persistent  the same, kept in store_dir/qcow/<domain>-<vdev>.qcow2 and reused by the next add',
    '  format=FMT  the image format, instead of detecting it (pin it for raw images a guest writes to)',
    "  name=NAME   the persistent overlay's file name (store_dir/qcow/NAME.qcow2)",
    '  cache=MODE  qemu-nbd cache mode (default qcow.cache)',
    'xl:  disk = [ "vdev=xvda,access=w,script=block-qcow,target=/srv/xen/debian.qcow2 overlay=transient" ]',
    'The image and its backing files are never opened writable in overlay mode or with access=r.',
  ].join('\n'),
  plan: (disk, ctx) => planQcow(disk, ctx),
  add: addQcow,
  undo: qcowUndo,
  resize: resizeQcow,
  resizeDetached: resizeQcowDetached,
  shared: { what: 'the choice of a free nbd device' },
};

/** For tests and diagnostics: the qemu-nbd daemons a record's pid file names. */
export function daemonsOf(config: Config, xenbusPath: string): number[] {
  return qemuNbdProcesses(pidFilePath(config, xenbusPath));
}
