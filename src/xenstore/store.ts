/**
 * The xenstore database behind our in-process server: a tree of nodes (value, ordered
 * children, permissions, generation count), path rules as the C daemon checks them, and
 * transactions that work on a copy of the tree and are checked for conflicts at commit by the
 * generation counts of every node they read or changed (EAGAIN when another change got there first).
 */
import type { XsErrno } from './types.js';

export const XENSTORE_ABS_PATH_MAX = 3072;
export const XENSTORE_REL_PATH_MAX = 2048;

export class XsStoreError extends Error {
  constructor(
    readonly errno: XsErrno,
    detail?: string,
  ) {
    super(detail ? `${errno}: ${detail}` : errno);
    this.name = 'XsStoreError';
  }
}

interface Node {
  value: Buffer;
  children: Map<string, Node>;
  perms: string[];
  gen: number;
}

function newNode(gen: number): Node {
  return { value: Buffer.alloc(0), children: new Map(), perms: ['n0'], gen };
}

function cloneNode(n: Node): Node {
  const children = new Map<string, Node>();
  for (const [k, c] of n.children) children.set(k, cloneNode(c));
  return { value: n.value, children, perms: n.perms, gen: n.gen };
}

/** A change to report to watchers: `path` changed; `recursive` when everything below it went too. */
export interface Change {
  path: string;
  recursive: boolean;
}

type Mutation =
  | { op: 'write'; path: string; value: Buffer }
  | { op: 'mkdir'; path: string }
  | { op: 'rm'; path: string }
  | { op: 'setPerms'; path: string; perms: string[] };

interface Transaction {
  id: number;
  root: Node;
  /** absolute path → generation seen at first access (-1: did not exist) */
  accessed: Map<string, number>;
  log: Mutation[];
}

const VALID = /^[A-Za-z0-9\-/_@]*$/;

function segments(abs: string): string[] {
  return abs === '/' ? [] : abs.slice(1).split('/');
}

function parentOf(abs: string): string {
  const i = abs.lastIndexOf('/');
  return i <= 0 ? '/' : abs.slice(0, i);
}

export class XsStore {
  private root: Node;
  private counter = 0;
  private nextTxId = 1;
  private readonly txs = new Map<number, Transaction>();
  private readonly listeners = new Set<(c: Change) => void>();
  /** `/local/domain/<domid>`: where relative paths resolve. */
  readonly home: string;

  constructor(readonly domid = 0) {
    this.home = `/local/domain/${domid}`;
    this.root = newNode(this.counter++);
    for (const p of ['/tool', '/local/domain', this.home]) this.applyMkdir(this.root, p);
  }

  /** Subscribe to committed changes; returns the unsubscribe function. */
  onChange(cb: (c: Change) => void): () => void {
    this.listeners.add(cb);
    return () => this.listeners.delete(cb);
  }

  /**
   * The absolute form of `path`, checked as the C daemon's is_valid_nodename() does: relative
   * paths resolve under the home path; allowed characters A-Za-z0-9-/_@, no `//`, no trailing
   * `/`, total length ≤ 3072 and ≤ 2048 below /local/domain/<id>/. `@…` names only when `special`.
   */
  canonical(path: string, special = false): string {
    if (special && path.startsWith('@')) {
      if (!VALID.test(path) || path.length > XENSTORE_ABS_PATH_MAX)
        throw new XsStoreError('EINVAL', `invalid path ${JSON.stringify(path)}`);
      return path;
    }
    const abs = path.startsWith('/') ? path : `${this.home}/${path}`;
    const bad = (why: string): never => {
      throw new XsStoreError('EINVAL', `${why}: ${JSON.stringify(path)}`);
    };
    if (!VALID.test(abs)) bad('invalid character in path');
    if (abs.includes('//')) bad('empty path component');
    if (abs.length > 1 && abs.endsWith('/')) bad('trailing slash');
    if (abs.length > XENSTORE_ABS_PATH_MAX) bad('path too long');
    const local = /^\/local\/domain\/\d{1,5}\//.exec(abs);
    if (abs.length - (local ? local[0].length : 0) > XENSTORE_REL_PATH_MAX) bad('path too long');
    return abs;
  }

  // ---- transactions ----

  startTransaction(): number {
    const id = this.nextTxId++;
    this.txs.set(id, { id, root: cloneNode(this.root), accessed: new Map(), log: [] });
    return id;
  }

  hasTransaction(id: number): boolean {
    return this.txs.has(id);
  }

  /** Commit (or abort) transaction `id`; EAGAIN when a node it used changed meanwhile. */
  endTransaction(id: number, commit: boolean): void {
    const tx = this.txs.get(id);
    if (!tx) throw new XsStoreError('ENOENT', `no transaction ${id}`);
    this.txs.delete(id);
    if (!commit) return;
    for (const [path, gen] of tx.accessed) {
      const now = this.lookup(this.root, path)?.gen ?? -1;
      if (now !== gen) throw new XsStoreError('EAGAIN', `${path} changed during transaction ${id}`);
    }
    for (const m of tx.log) this.mutate(m);
  }

  // ---- operations (tx 0 = outside any transaction) ----

  read(path: string, tx = 0): Buffer {
    return this.need(tx, this.canonical(path)).value;
  }

  exists(path: string, tx = 0): boolean {
    const abs = this.canonical(path);
    this.touch(tx, abs);
    return this.lookup(this.rootOf(tx), abs) !== undefined;
  }

  directory(path: string, tx = 0): string[] {
    return [...this.need(tx, this.canonical(path)).children.keys()];
  }

  /** The gencount and child list of `path` (for DIRECTORY_PART). */
  directoryWithGen(path: string, tx = 0): { gen: number; children: string[] } {
    const n = this.need(tx, this.canonical(path));
    return { gen: n.gen, children: [...n.children.keys()] };
  }

  getPerms(path: string, tx = 0): string[] {
    return this.need(tx, this.canonical(path)).perms;
  }

  write(path: string, value: string | Buffer, tx = 0): void {
    const abs = this.canonical(path);
    this.change(tx, { op: 'write', path: abs, value: typeof value === 'string' ? Buffer.from(value, 'utf8') : value });
  }

  mkdir(path: string, tx = 0): void {
    this.change(tx, { op: 'mkdir', path: this.canonical(path) });
  }

  rm(path: string, tx = 0): void {
    const abs = this.canonical(path);
    if (abs === '/') throw new XsStoreError('EINVAL', 'cannot remove the root');
    this.change(tx, { op: 'rm', path: abs });
  }

  setPerms(path: string, perms: string[], tx = 0): void {
    const abs = this.canonical(path);
    if (perms.length === 0 || !perms.every((p) => /^[wrbn]\d+$/.test(p))) {
      throw new XsStoreError('EINVAL', `invalid permissions ${perms.join(',')}`);
    }
    this.change(tx, { op: 'setPerms', path: abs, perms });
  }

  /** Every node with its value, depth-first in child order (for tests and `simulate`). */
  dump(path = '/'): Array<[string, string]> {
    const abs = this.canonical(path);
    const out: Array<[string, string]> = [];
    const walk = (p: string, n: Node): void => {
      out.push([p, n.value.toString('utf8')]);
      for (const [k, c] of n.children) walk(p === '/' ? `/${k}` : `${p}/${k}`, c);
    };
    const n = this.lookup(this.root, abs);
    if (n) walk(abs, n);
    return out;
  }

  // ---- internals ----

  private txOf(id: number): Transaction {
    const tx = this.txs.get(id);
    if (!tx) throw new XsStoreError('ENOENT', `no transaction ${id}`);
    return tx;
  }

  private rootOf(tx: number): Node {
    return tx === 0 ? this.root : this.txOf(tx).root;
  }

  private lookup(root: Node, abs: string): Node | undefined {
    let n: Node | undefined = root;
    for (const s of segments(abs)) {
      n = n.children.get(s);
      if (!n) return undefined;
    }
    return n;
  }

  /** Remember the generation a transaction first saw at `abs`. */
  private touch(tx: number, abs: string): void {
    if (tx === 0) return;
    const t = this.txOf(tx);
    if (!t.accessed.has(abs)) t.accessed.set(abs, this.lookup(t.root, abs)?.gen ?? -1);
  }

  private need(tx: number, abs: string): Node {
    this.touch(tx, abs);
    const n = this.lookup(this.rootOf(tx), abs);
    if (!n) throw new XsStoreError('ENOENT', abs);
    return n;
  }

  private change(tx: number, m: Mutation): void {
    if (tx === 0) {
      this.mutate(m);
      return;
    }
    const t = this.txOf(tx);
    // Record every node this mutation depends on or alters, before altering it.
    this.touch(tx, m.path);
    if (m.op === 'rm') {
      this.touch(tx, parentOf(m.path));
    } else {
      let p = m.path;
      while (p !== '/' && !this.lookup(t.root, p)) {
        p = parentOf(p);
        this.touch(tx, p);
      }
    }
    this.apply(t.root, m);
    t.log.push(m);
  }

  private mutate(m: Mutation): void {
    const change = this.apply(this.root, m);
    if (change) for (const cb of [...this.listeners]) cb(change);
  }

  /** Apply a mutation to a tree; the change to report, if any. */
  private apply(root: Node, m: Mutation): Change | undefined {
    switch (m.op) {
      case 'write': {
        const n = this.applyMkdir(root, m.path);
        n.value = m.value;
        n.gen = this.counter++;
        return { path: m.path, recursive: false };
      }
      case 'mkdir': {
        if (this.lookup(root, m.path)) return undefined;
        this.applyMkdir(root, m.path);
        return { path: m.path, recursive: false };
      }
      case 'setPerms': {
        const n = this.lookup(root, m.path);
        if (!n) throw new XsStoreError('ENOENT', m.path);
        n.perms = m.perms;
        n.gen = this.counter++;
        return { path: m.path, recursive: false };
      }
      case 'rm': {
        const parent = this.lookup(root, parentOf(m.path));
        if (!parent) throw new XsStoreError('ENOENT', `${parentOf(m.path)} (parent of ${m.path})`);
        const name = m.path.slice(m.path.lastIndexOf('/') + 1);
        if (!parent.children.has(name)) return undefined;
        parent.children.delete(name);
        parent.gen = this.counter++;
        return { path: m.path, recursive: true };
      }
    }
  }

  /** The node at `abs`, created with any missing parents. */
  private applyMkdir(root: Node, abs: string): Node {
    let n = root;
    for (const s of segments(abs)) {
      let c = n.children.get(s);
      if (!c) {
        c = newNode(this.counter++);
        n.children.set(s, c);
        n.gen = this.counter++;
      }
      n = c;
    }
    return n;
  }
}
