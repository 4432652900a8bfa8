/**
 * The data of each kind of journal step, as the hooks and `xen-blockhooks open` write it, and a
 * validator per kind for records read back from disk. A record on disk is untrusted (a crash, an
 * older version, a hand edit): journal.ts runs `stepProblem` on every step it reads, and a record
 * with a step that does not validate is reported as unreadable, like one that is not JSON.
 *
 * Fields an add writes in its intent (before the step runs) are required; fields learned while or
 * after it runs (a loop's name, an nbd device) are optional, since a killed add never wrote them.
 * Fields a validator does not know are left alone (and kept on disk).
 *
 * The kind strings here are the ones on disk; the backends name them through their own constants
 * (STEP in backends/steps.ts, qcow.ts, rbd.ts, THIN_STEP, LVSNAP_STEP, BLOCK_LOOP_STEP, OPEN_STEP).
 */
import type { Cluster, ImageSpec } from '../devices/rbd.js';

// ---------------------------------------------------------------------------------------------
// the data of each kind

/** A shared read-only loop over a base image (backends/steps.ts). */
export interface BaseRefData {
  /** The base image's `dev:ino` (fileIdKey): the key the references share. */
  key: string;
  file: string;
  dev: string;
  ino: string;
  /** Written true under the base lock: only then is the step a reference. */
  counted: boolean;
  /** The loop, once attached or found. */
  loop?: string;
  major?: number;
  minor?: number;
}

/** This host's claim on a persistent store (lock/store-owner.ts). */
export interface StoreOwnerData {
  path: string;
  backendPath: string;
  /** Whether the claim was made for this disk (false: it was there already, someone else's). */
  ours?: boolean;
}

/** A store file in the store directory (a copy-on-write store, a resize's tail). */
export interface StoreFileData {
  path: string;
  persistent: boolean;
  /** The temporary name a persistent store is made under before it is linked into place. */
  tmp?: string;
  existed?: boolean;
  dev?: string;
  ino?: string;
}

/** A loop over a store file, unique to its disk. */
export interface LoopData {
  file: string;
  dev: string;
  ino: string;
  readOnly: boolean;
  loop?: string;
  major?: number;
  minor?: number;
}

/** A device-mapper device made for this record. */
export interface DmData {
  name: string;
  table: string;
  /** The dm uuid it is created with (absent in records of versions that gave none). */
  uuid?: string;
  readOnly: boolean;
  major?: number;
  minor?: number;
}

/** block's loop over a file: (phy:/file: drop-in). */
export interface BlockLoopData {
  file: string;
  dev: string;
  ino: string;
  readOnly: boolean;
  /** Loops over the file before the attach (none of them is this disk's). */
  before: string[];
  device?: string;
  major?: number;
  minor?: number;
}

/** One file of a qcow image chain as block-qcow claims it. */
export interface QcowClaim {
  /** `dev:ino` of an image file, or `path:<abs>` for a persistent overlay not created yet. */
  key: string;
  path: string;
  role: 'r' | 'w';
}

export interface QcowUseData {
  claims: QcowClaim[];
}

export interface QcowOverlayData {
  path: string;
  persistent: boolean;
  existed: boolean;
  tmp?: string;
  /** The image the overlay is made over. */
  base: string;
}

export interface NbdData {
  pidFile: string;
  image: string;
  format: string;
  readOnly: boolean;
  /** The nbd device, noted once chosen (its reservation) and again once connected. */
  device?: string;
  pid?: number;
  major?: number;
  minor?: number;
}

export interface LvSnapshotData {
  vg: string;
  lv: string;
  /** The origin LV, in the same VG. */
  origin: string;
  persistent: boolean;
  existed: boolean;
  thin: boolean;
  /** The copy-on-write area of a classic snapshot. */
  sizeMiB?: number;
}

export interface ThinPoolData {
  pool: string;
  data: string;
  meta: string;
  created?: boolean;
  major?: number;
  minor?: number;
}

export interface ThinData {
  pool: string;
  id: number;
  persistent: boolean;
  key: string;
  existed: boolean;
}

export interface RbdCloneData {
  cluster: Cluster;
  pool: string;
  image: string;
  parent: ImageSpec & { snap: string };
  persistent: boolean;
  /** Whether the clone was there before this add (noted again if `rbd clone` finds it). */
  existed: boolean;
  incoming: boolean;
}

export interface RbdMapData {
  cluster: Cluster;
  spec: ImageSpec;
  readOnly: boolean;
  noudev: boolean;
  /** The spec's mappings before the map (none of them is this disk's). */
  before: string[];
  device?: string;
  major?: number;
  minor?: number;
}

/** Xen's block lock, taken by an open (its undo takes it once more). */
export interface XenBlockLockData {
  path: string;
}

/** The loop an open attaches over an image file. */
export interface OpenLoopData {
  file: string;
  dev: string;
  ino: string;
  readOnly: boolean;
  before: string[];
  loop?: string;
  major?: number;
  minor?: number;
}

export interface PartitionMapData {
  name: string;
  major: number;
  minor: number;
  number: number;
  sectors: number;
}

/** The partition maps an open makes over its parent device. */
export interface PartitionsData {
  /** The parent device's path and `maj:min`, and the name prefix kpartx gives its maps. */
  parent: string;
  majmin: string;
  prefix: string;
  readOnly: boolean;
  /** A domain's disk: its backend path, domain and vdev, and its hook. */
  disk?: string;
  domid?: number | null;
  domain?: string | null;
  vdev?: string | null;
  hook?: string;
  /** An image: its path. */
  image?: string;
  maps?: PartitionMapData[];
}

/** Every step kind, by the string written in its record. */
export interface StepDataByKind {
  'base-ref': BaseRefData;
  'store-owner': StoreOwnerData;
  'store-file': StoreFileData;
  loop: LoopData;
  dm: DmData;
  'block-loop': BlockLoopData;
  'qcow-use': QcowUseData;
  'qcow-overlay': QcowOverlayData;
  nbd: NbdData;
  'lv-snapshot': LvSnapshotData;
  'thin-pool': ThinPoolData;
  thin: ThinData;
  'rbd-clone': RbdCloneData;
  'rbd-map': RbdMapData;
  'xen-block-lock': XenBlockLockData;
  'open-loop': OpenLoopData;
  partitions: PartitionsData;
}

export type StepKind = keyof StepDataByKind;
export type StepData<K extends StepKind> = StepDataByKind[K];

type AnyStepRecord = {
  [P in StepKind]: {
    /** Which undoer applies. */
    kind: P;
    /** Everything the undoer needs; filled in further as the step completes (e.g. the loop device). */
    data: StepDataByKind[P];
    done: boolean;
  };
}[StepKind];

/** One step of a record: with `K` a union of kinds (the default: all), the union of their records. */
export type StepRecord<K extends StepKind = StepKind> = Extract<AnyStepRecord, { kind: K }>;

/** Narrow a step to one kind. */
export function isStep<K extends StepKind>(step: StepRecord, kind: K): step is StepRecord<K> {
  return step.kind === kind;
}

/** The first step of `kind` (that passes `test`), typed as that kind. */
export function findStep<K extends StepKind>(
  steps: readonly StepRecord[],
  kind: K,
  test: (step: StepRecord<K>) => boolean = () => true,
): StepRecord<K> | undefined {
  for (const s of steps) if (isStep(s, kind) && test(s)) return s;
  return undefined;
}

// ---------------------------------------------------------------------------------------------
// validators

/**
 * A test of one value, and what it wants in words. Invariant in T (the phantom `_t`), so that a
 * shape must test each field exactly as its interface types it: optional where optional.
 */
interface Check<T> {
  (v: unknown): v is T;
  readonly what: string;
  readonly _t?: (t: T) => T;
}

function check<T>(what: string, test: (v: unknown) => boolean): Check<T> {
  return Object.assign((v: unknown): v is T => test(v), { what });
}

/** Names, paths and numbers as strings are never empty when a hook writes them. */
const text = check<string>('a non-empty string', (v) => typeof v === 'string' && v !== '');
const anyString = check<string>('a string', (v) => typeof v === 'string');
const num = check<number>('a number', (v) => typeof v === 'number' && Number.isFinite(v));
const bool = check<boolean>('true or false', (v) => typeof v === 'boolean');

function optional<T>(c: Check<T>): Check<T | undefined> {
  return check<T | undefined>(`${c.what}, or absent`, (v) => v === undefined || c(v));
}

function nullable<T>(c: Check<T>): Check<T | null> {
  return check<T | null>(`${c.what} or null`, (v) => v === null || c(v));
}

function listOf<T>(c: Check<T>): Check<T[]> {
  return check<T[]>(`a list of ${c.what}`, (v) => Array.isArray(v) && v.every((x) => c(x)));
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** Each field of T with its test (every field, optional ones included). */
type Shape<T> = { [P in keyof T]-?: Check<T[P]> };

/** The first field of `v` that fails its test, in words; undefined when every field passes. */
function shapeProblem<T>(shape: Shape<T>, v: Record<string, unknown>): string | undefined {
  for (const [field, c] of Object.entries(shape) as [string, Check<unknown>][]) {
    const value = v[field];
    if (c(value)) continue;
    return value === undefined ? `has no "${field}"` : `has "${field}" ${JSON.stringify(value)}, not ${c.what}`;
  }
  return undefined;
}

function object<T>(what: string, shape: Shape<T>): Check<T> {
  return check<T>(what, (v) => isObject(v) && shapeProblem(shape, v) === undefined);
}

const cluster = object<Cluster>('a cluster ({conf, id, keyring}, each a string or absent)', {
  conf: optional(anyString),
  id: optional(anyString),
  keyring: optional(anyString),
});
const imageSpec = {
  pool: text,
  image: text,
  snap: optional(anyString),
} satisfies Shape<ImageSpec>;
const loopResult = { loop: optional(text), major: optional(num), minor: optional(num) };
const fileId = { dev: text, ino: text };

const shapes: { [K in StepKind]: Shape<StepDataByKind[K]> } = {
  'base-ref': { key: text, file: text, ...fileId, counted: bool, ...loopResult },
  'store-owner': { path: text, backendPath: text, ours: optional(bool) },
  'store-file': {
    path: text,
    persistent: bool,
    tmp: optional(text),
    existed: optional(bool),
    dev: optional(text),
    ino: optional(text),
  },
  loop: { file: text, ...fileId, readOnly: bool, ...loopResult },
  dm: { name: text, table: text, uuid: optional(text), readOnly: bool, major: optional(num), minor: optional(num) },
  'block-loop': {
    file: text,
    ...fileId,
    readOnly: bool,
    before: listOf(text),
    device: optional(text),
    major: optional(num),
    minor: optional(num),
  },
  'qcow-use': {
    claims: listOf(
      object<QcowClaim>('claims ({key, path, role r or w})', {
        key: text,
        path: text,
        role: check<'r' | 'w'>('r or w', (v) => v === 'r' || v === 'w'),
      }),
    ),
  },
  'qcow-overlay': { path: text, persistent: bool, existed: bool, tmp: optional(text), base: text },
  nbd: {
    pidFile: text,
    image: text,
    format: text,
    readOnly: bool,
    device: optional(text),
    pid: optional(num),
    major: optional(num),
    minor: optional(num),
  },
  'lv-snapshot': {
    vg: text,
    lv: text,
    origin: text,
    persistent: bool,
    existed: bool,
    thin: bool,
    sizeMiB: optional(num),
  },
  'thin-pool': {
    pool: text,
    data: text,
    meta: text,
    created: optional(bool),
    major: optional(num),
    minor: optional(num),
  },
  thin: { pool: text, id: num, persistent: bool, key: text, existed: bool },
  'rbd-clone': {
    cluster,
    pool: text,
    image: text,
    parent: object<ImageSpec & { snap: string }>('an image (pool/image@snap)', { ...imageSpec, snap: anyString }),
    persistent: bool,
    existed: bool,
    incoming: bool,
  },
  'rbd-map': {
    cluster,
    spec: object<ImageSpec>('an image (pool/image, @snap or not)', imageSpec),
    readOnly: bool,
    noudev: bool,
    before: listOf(text),
    device: optional(text),
    major: optional(num),
    minor: optional(num),
  },
  'xen-block-lock': { path: text },
  'open-loop': { file: text, ...fileId, readOnly: bool, before: listOf(text), ...loopResult },
  partitions: {
    parent: text,
    majmin: text,
    prefix: text,
    readOnly: bool,
    disk: optional(text),
    domid: optional(nullable(num)),
    domain: optional(nullable(anyString)),
    vdev: optional(nullable(anyString)),
    hook: optional(text),
    image: optional(text),
    maps: optional(
      listOf(
        object<PartitionMapData>('partition maps ({name, major, minor, number, sectors})', {
          name: text,
          major: num,
          minor: num,
          number: num,
          sectors: num,
        }),
      ),
    ),
  },
};

export const STEP_KINDS = Object.keys(shapes) as StepKind[];

export function isStepKind(kind: unknown): kind is StepKind {
  return typeof kind === 'string' && Object.prototype.hasOwnProperty.call(shapes, kind);
}

/** What is wrong with `data` as the data of a `kind` step, in words; undefined when it is valid. */
export function stepDataProblem(kind: StepKind, data: unknown): string | undefined {
  if (!isObject(data)) return 'has data that is not an object';
  return shapeProblem(shapes[kind] as Shape<unknown>, data);
}

/**
 * What is wrong with `step` as a step record (read from disk), in words: its kind, its `done`,
 * its data for that kind. Undefined when it is a valid StepRecord.
 */
export function stepProblem(step: unknown): string | undefined {
  if (!isObject(step)) return 'is not an object';
  const { kind } = step;
  if (!isStepKind(kind)) return `has ${kind === undefined ? 'no kind' : `the unknown kind ${JSON.stringify(kind)}`}`;
  const why = bool(step.done)
    ? stepDataProblem(kind, step.data)
    : shapeProblem<{ done: boolean }>({ done: bool }, step);
  return why === undefined ? undefined : `("${kind}") ${why}`;
}
