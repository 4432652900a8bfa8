/**
 * A xenstore client speaking the wire protocol directly, connected the way libxenstore's
 * `xs_open()` does: the daemon's unix socket if there is one, else the xenbus device.
 * One connection per process is plenty; requests may be in flight concurrently and replies are
 * matched by req_id, with watch events interleaved.
 */
import fs from 'node:fs';
import net from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { XENSTORE_PAYLOAD_MAX, XsError } from './types.js';
import type { WatchEvent, XenstoreClient, XsOps, XsTransaction } from './types.js';
import {
  FrameDecoder,
  HEADER_SIZE,
  XsOp,
  cString,
  encodeFrame,
  nulStrings,
  opName,
  parseErrno,
  splitStrings,
  writePayload,
} from './wire.js';
import type { Frame } from './wire.js';

export interface ConnectOptions {
  /** Connect to this socket or device only, instead of searching as libxenstore does. */
  path?: string;
  /** Environment to read XENSTORED_PATH / XENSTORED_RUNDIR from (default process.env). */
  env?: NodeJS.ProcessEnv;
  /** Limit for connecting and for each reply, in milliseconds (default 30000). */
  timeoutMs?: number;
  /** How often `transaction()` runs its body before giving up on EAGAIN (default 50). */
  transactionAttempts?: number;
}

const DEFAULT_TIMEOUT_MS = 30_000;
const DEFAULT_TX_ATTEMPTS = 50;

/**
 * The paths libxenstore would try, in order: `XENSTORED_PATH` alone when set; otherwise the
 * daemon socket (`$XENSTORED_RUNDIR/socket`, default /var/run/xenstored/socket), then the
 * kernel device (/dev/xen/xenbus, or /proc/xen/xenbus on xenfs).
 */
export function xenstoreCandidates(env: NodeJS.ProcessEnv = process.env): string[] {
  const explicit = env['XENSTORED_PATH'];
  if (explicit) return [explicit];
  const rundir = env['XENSTORED_RUNDIR'] || '/var/run/xenstored';
  return [`${rundir}/socket`, '/dev/xen/xenbus', '/proc/xen/xenbus'];
}

export async function connectXenstore(opts: ConnectOptions = {}): Promise<XenstoreClient> {
  const timeoutMs = opts.timeoutMs ?? DEFAULT_TIMEOUT_MS;
  const candidates = opts.path !== undefined ? [opts.path] : xenstoreCandidates(opts.env ?? process.env);
  const tried: string[] = [];
  for (const path of candidates) {
    let st: fs.Stats;
    try {
      st = await fs.promises.stat(path);
    } catch (e) {
      tried.push(`${path} (${errCode(e)})`);
      continue;
    }
    try {
      const client = new Client(opts.transactionAttempts ?? DEFAULT_TX_ATTEMPTS, timeoutMs);
      let transport: Transport;
      if (st.isSocket()) transport = await openSocket(path, timeoutMs, client);
      else if (st.isCharacterDevice() || st.isFIFO()) transport = await openDevice(path, client);
      else throw Object.assign(new Error('not a socket or device'), { code: 'not a socket or device' });
      client.attach(transport);
      return client;
    } catch (e) {
      tried.push(`${path} (${errCode(e)})`);
    }
  }
  throw new XsError(
    'ECONNECT',
    'connect',
    undefined,
    `cannot reach xenstore; tried ${tried.join(', ')}; xenstored is probably not running`,
  );
}

function errCode(e: unknown): string {
  const err = e as NodeJS.ErrnoException;
  return err?.code ?? err?.message ?? String(e);
}

/** What the client needs from a connection. */
interface Transport {
  /** The longest payload this transport carries. */
  maxPayload: number;
  send(buf: Buffer): void;
  /** Called when requests or watches become outstanding or all are settled. */
  setActive(active: boolean): void;
  close(): void;
}

interface Sink {
  onData(chunk: Buffer): void;
  onClosed(reason: string): void;
}

function openSocket(path: string, timeoutMs: number, sink: Sink): Promise<Transport> {
  return new Promise((resolve, reject) => {
    const sock = net.connect({ path });
    const timer = setTimeout(() => {
      sock.destroy();
      reject(Object.assign(new Error('connect timed out'), { code: 'ETIMEDOUT' }));
    }, timeoutMs);
    timer.unref();
    const onError = (e: Error): void => {
      clearTimeout(timer);
      sock.destroy();
      reject(e);
    };
    sock.once('error', onError);
    sock.once('connect', () => {
      clearTimeout(timer);
      sock.off('error', onError);
      sock.setNoDelay?.(true);
      let closeReason = 'connection to xenstored closed';
      sock.on('data', (chunk: Buffer) => sink.onData(chunk));
      sock.on('error', (e: NodeJS.ErrnoException) => {
        closeReason = `connection to xenstored failed: ${e.code ?? e.message}`;
      });
      sock.on('close', () => sink.onClosed(closeReason));
      resolve({
        maxPayload: XENSTORE_PAYLOAD_MAX,
        send: (buf) => {
          sock.write(buf);
        },
        setActive: () => {},
        close: () => {
          sock.destroy();
        },
      });
    });
  });
}

/**
 * The xenbus device: framed messages written with write(2) (the kernel buffers partial ones),
 * replies and watch events read back with read(2). It is opened non-blocking and polled while
 * anything is outstanding, so no thread-pool read ever blocks and the process can always exit.
 */
async function openDevice(path: string, sink: Sink): Promise<Transport> {
  const fd = await new Promise<number>((resolve, reject) => {
    fs.open(path, fs.constants.O_RDWR | fs.constants.O_NONBLOCK, (err, fd) => (err ? reject(err) : resolve(fd)));
  });
  const buf = Buffer.allocUnsafe(65536);
  let closed = false;
  let active = false;
  let reading = false;
  let timer: NodeJS.Timeout | undefined;
  let idleDelay = 0;

  const schedule = (): void => {
    if (closed || !active || reading || timer) return;
    timer = setTimeout(() => {
      timer = undefined;
      readOnce();
    }, idleDelay);
  };
  const readOnce = (): void => {
    if (closed || reading) return;
    reading = true;
    fs.read(fd, buf, 0, buf.length, null, (err, n) => {
      reading = false;
      if (closed) return;
      if (err) {
        const code = (err as NodeJS.ErrnoException).code;
        if (code === 'EAGAIN' || code === 'EWOULDBLOCK' || code === 'EINTR') {
          idleDelay = Math.min(Math.max(1, idleDelay * 2), 50);
          schedule();
          return;
        }
        shutdown(`read from ${path} failed: ${code ?? err.message}`);
        return;
      }
      if (n === 0) {
        shutdown(`${path} reached end of file`);
        return;
      }
      idleDelay = 0;
      sink.onData(Buffer.from(buf.subarray(0, n)));
      schedule();
    });
  };
  const shutdown = (reason: string): void => {
    if (closed) return;
    closed = true;
    if (timer) clearTimeout(timer);
    fs.close(fd, () => {});
    sink.onClosed(reason);
  };
  return {
    // The kernel's xenbus device buffers a whole message, header included, in
    // XENSTORE_PAYLOAD_MAX bytes (drivers/xen/xenbus/xenbus_dev_frontend.c): 16 bytes less payload.
    maxPayload: XENSTORE_PAYLOAD_MAX - HEADER_SIZE,
    send: (msg) => {
      let off = 0;
      while (off < msg.length) off += fs.writeSync(fd, msg, off, msg.length - off);
      idleDelay = 0;
      if (timer) {
        clearTimeout(timer);
        timer = undefined;
      }
      schedule();
    },
    setActive: (a) => {
      active = a;
      if (a) schedule();
      else if (timer) {
        clearTimeout(timer);
        timer = undefined;
      }
    },
    close: () => shutdown('closed'),
  };
}

interface Pending {
  type: number;
  op: string;
  path: string | undefined;
  resolve(payload: Buffer): void;
  reject(err: XsError): void;
  timer: NodeJS.Timeout | undefined;
}

class Client implements XenstoreClient, Sink {
  private transport: Transport | undefined;
  get maxPayload(): number {
    return this.transport?.maxPayload ?? XENSTORE_PAYLOAD_MAX;
  }
  private readonly decoder = new FrameDecoder();
  private readonly pending = new Map<number, Pending>();
  /** token → (watch path → callback) */
  private readonly watches = new Map<string, Map<string, (ev: WatchEvent) => void>>();
  private nextReqId = 1;
  private closed: string | undefined;

  private readonly base: XsOps;

  constructor(
    private readonly txAttempts: number,
    private readonly timeoutMs: number,
  ) {
    this.base = this.ops(0);
  }

  attach(t: Transport): void {
    this.transport = t;
  }

  // ---- Sink ----
  onData(chunk: Buffer): void {
    let frames: Frame[];
    try {
      frames = this.decoder.push(chunk);
    } catch (e) {
      this.shutdown(`protocol error: ${(e as Error).message}`, 'EPROTO');
      return;
    }
    for (const f of frames) this.dispatch(f);
  }

  onClosed(reason: string): void {
    this.shutdown(reason, 'ECLOSED');
  }

  private dispatch(f: Frame): void {
    if (f.type === XsOp.WATCH_EVENT) {
      const [path, token] = splitStrings(f.payload);
      if (path === undefined || token === undefined) return;
      const byPath = this.watches.get(token);
      if (!byPath) return;
      for (const cb of [...byPath.values()]) cb({ path, token });
      return;
    }
    const p = this.pending.get(f.reqId);
    if (!p) return; // a reply to a request that already timed out
    this.settle(f.reqId, p);
    if (f.type === XsOp.ERROR) p.reject(new XsError(parseErrno(f.payload), p.op, p.path));
    else if (f.type !== p.type) p.reject(new XsError('EPROTO', p.op, p.path, `reply of type ${opName(f.type)}`));
    else p.resolve(f.payload);
  }

  private settle(reqId: number, p: Pending): void {
    if (p.timer) clearTimeout(p.timer);
    this.pending.delete(reqId);
    this.updateActive();
  }

  private updateActive(): void {
    this.transport?.setActive(this.pending.size > 0 || this.watches.size > 0);
  }

  private shutdown(reason: string, errno: 'ECLOSED' | 'EPROTO'): void {
    if (this.closed !== undefined) return;
    this.closed = reason;
    for (const [id, p] of [...this.pending]) {
      this.settle(id, p);
      p.reject(new XsError(errno, p.op, p.path, reason));
    }
    this.watches.clear();
    this.transport?.close();
  }

  // ---- requests ----
  request(type: number, txId: number, payload: Buffer, path?: string): Promise<Buffer> {
    const op = opName(type);
    return new Promise<Buffer>((resolve, reject) => {
      if (this.closed !== undefined || !this.transport) {
        reject(new XsError('ECLOSED', op, path, this.closed ?? 'not connected'));
        return;
      }
      let reqId = this.nextReqId;
      while (reqId === 0 || this.pending.has(reqId)) reqId = (reqId + 1) >>> 0;
      this.nextReqId = (reqId + 1) >>> 0;
      let frame: Buffer;
      try {
        frame = encodeFrame({ type, reqId, txId, payload }, path, this.transport.maxPayload);
      } catch (e) {
        reject(e as XsError);
        return;
      }
      const p: Pending = { type, op, path, resolve, reject, timer: undefined };
      if (this.timeoutMs > 0 && Number.isFinite(this.timeoutMs)) {
        p.timer = setTimeout(() => {
          this.settle(reqId, p);
          reject(new XsError('ETIMEDOUT', op, path, `no reply from xenstore within ${this.timeoutMs} ms`));
        }, this.timeoutMs);
        p.timer.unref();
      }
      this.pending.set(reqId, p);
      this.updateActive();
      try {
        this.transport.send(frame);
      } catch (e) {
        this.shutdown(`write failed: ${errCode(e)}`, 'ECLOSED');
      }
    });
  }

  private ops(txId: number): XsOps {
    const request = (op: number, payload: Buffer, path: string) => this.request(op, txId, payload, path);
    const directoryPart = (path: string) => this.directoryPart(txId, path);
    return {
      async read(path) {
        return (await request(XsOp.READ, nulStrings(path), path)).toString('utf8');
      },
      async tryRead(path) {
        try {
          return (await request(XsOp.READ, nulStrings(path), path)).toString('utf8');
        } catch (e) {
          if (e instanceof XsError && e.errno === 'ENOENT') return undefined;
          throw e;
        }
      },
      async write(path, value) {
        await request(XsOp.WRITE, writePayload(path, value), path);
      },
      async mkdir(path) {
        await request(XsOp.MKDIR, nulStrings(path), path);
      },
      async rm(path) {
        await request(XsOp.RM, nulStrings(path), path);
      },
      async directory(path) {
        try {
          return splitStrings(await request(XsOp.DIRECTORY, nulStrings(path), path));
        } catch (e) {
          if (e instanceof XsError && e.errno === 'E2BIG') return directoryPart(path);
          throw e;
        }
      },
    };
  }

  /** A directory too big for one reply, fetched in parts (as libxenstore's xs_directory_part). */
  private async directoryPart(txId: number, path: string): Promise<string[]> {
    for (let restart = 0; restart < 100; restart++) {
      let gen: string | undefined;
      let off = 0;
      const names: string[] = [];
      for (;;) {
        const reply = await this.request(XsOp.DIRECTORY_PART, txId, nulStrings(path, String(off)), path);
        const g = cString(reply);
        if (gen === undefined) gen = g;
        else if (g !== gen) break; // the directory changed under us: start again
        const body = reply.subarray(Buffer.byteLength(g, 'utf8') + 1);
        const last = body.length < 2 || (body[body.length - 1] === 0 && body[body.length - 2] === 0);
        names.push(...splitStrings(body).filter((n) => n !== ''));
        if (last) return names;
        off += body.length;
      }
    }
    throw new XsError('EAGAIN', 'DIRECTORY_PART', path, 'directory kept changing');
  }

  read(path: string): Promise<string> {
    return this.base.read(path);
  }
  tryRead(path: string): Promise<string | undefined> {
    return this.base.tryRead(path);
  }
  write(path: string, value: string): Promise<void> {
    return this.base.write(path, value);
  }
  mkdir(path: string): Promise<void> {
    return this.base.mkdir(path);
  }
  rm(path: string): Promise<void> {
    return this.base.rm(path);
  }
  directory(path: string): Promise<string[]> {
    return this.base.directory(path);
  }

  async transaction<T>(body: (tx: XsTransaction) => Promise<T>): Promise<T> {
    for (let attempt = 1; ; attempt++) {
      const id = Number(cString(await this.request(XsOp.TRANSACTION_START, 0, nulStrings(''))));
      if (!Number.isInteger(id) || id <= 0) {
        throw new XsError('EPROTO', 'TRANSACTION_START', undefined, 'daemon answered no transaction id');
      }
      const tx: XsTransaction = { id, ...this.ops(id) };
      let result: T;
      try {
        result = await body(tx);
      } catch (e) {
        await this.request(XsOp.TRANSACTION_END, id, nulStrings('F')).catch(() => undefined);
        if (isEagain(e) && attempt < this.txAttempts) {
          await backoff(attempt);
          continue;
        }
        throw e;
      }
      try {
        await this.request(XsOp.TRANSACTION_END, id, nulStrings('T'));
        return result;
      } catch (e) {
        if (isEagain(e) && attempt < this.txAttempts) {
          await backoff(attempt);
          continue;
        }
        throw e;
      }
    }
  }

  async watch(path: string, token: string, onEvent: (ev: WatchEvent) => void): Promise<void> {
    let byPath = this.watches.get(token);
    if (!byPath) this.watches.set(token, (byPath = new Map()));
    const had = byPath.get(path);
    byPath.set(path, onEvent);
    this.updateActive();
    try {
      await this.request(XsOp.WATCH, 0, nulStrings(path, token), path);
    } catch (e) {
      if (had) byPath.set(path, had);
      else this.dropWatch(path, token);
      throw e;
    }
  }

  async unwatch(path: string, token: string): Promise<void> {
    try {
      await this.request(XsOp.UNWATCH, 0, nulStrings(path, token), path);
    } finally {
      this.dropWatch(path, token);
    }
  }

  private dropWatch(path: string, token: string): void {
    const byPath = this.watches.get(token);
    byPath?.delete(path);
    if (byPath && byPath.size === 0) this.watches.delete(token);
    this.updateActive();
  }

  async getDomainPath(domid: number): Promise<string> {
    return cString(await this.request(XsOp.GET_DOMAIN_PATH, 0, nulStrings(String(domid))));
  }

  async close(): Promise<void> {
    this.shutdown('client closed', 'ECLOSED');
  }
}

function isEagain(e: unknown): boolean {
  return e instanceof XsError && e.errno === 'EAGAIN';
}

function backoff(attempt: number): Promise<void> {
  const ms = Math.min(2 * attempt, 50) * (0.5 + Math.random());
  return sleep(ms, undefined, { ref: true });
}
