/**
 * An in-process xenstore daemon on a unix socket, for tests and `simulate`: it speaks the same
 * wire protocol as xenstored, so our client and Debian's xenstore-* tools (pointed at it with
 * XENSTORED_PATH) talk to it as they would to the real one.
 */
import fs from 'node:fs';
import net from 'node:net';
import { XsStore, XsStoreError } from './store.js';
import type { Change } from './store.js';
import { FrameDecoder, XsOp, encodeFrame, nulStrings, splitStrings } from './wire.js';
import type { Frame } from './wire.js';
import { XENSTORE_PAYLOAD_MAX } from './types.js';

export interface XenstoreServerOptions {
  socketPath: string;
  /** The domain whose home relative paths resolve under (default 0). */
  domid?: number;
  /** Called with every request handled (for debugging and tests). */
  onRequest?: (op: number, args: string[]) => void;
}

export interface XenstoreServer {
  socketPath: string;
  store: XsStore;
  close(): Promise<void>;
}

interface Watch {
  /** as the client gave it */
  path: string;
  /** absolute (or `@…`) */
  abs: string;
  token: string;
}

interface Conn {
  sock: net.Socket;
  decoder: FrameDecoder;
  watches: Watch[];
  txs: Set<number>;
}

export async function startXenstoreServer(opts: XenstoreServerOptions): Promise<XenstoreServer> {
  const store = new XsStore(opts.domid ?? 0);
  const conns = new Set<Conn>();

  const send = (c: Conn, frame: Frame): void => {
    if (!c.sock.destroyed) c.sock.write(encodeFrame(frame));
  };

  const relativeTo = (abs: string): string =>
    abs === store.home ? '' : abs.startsWith(`${store.home}/`) ? abs.slice(store.home.length + 1) : abs;

  const fire = (c: Conn, w: Watch, abs: string): void => {
    const path = w.path.startsWith('/') || w.path.startsWith('@') ? abs : relativeTo(abs);
    send(c, { type: XsOp.WATCH_EVENT, reqId: 0, txId: 0, payload: nulStrings(path, w.token) });
  };

  const unsubscribe = store.onChange((ch: Change) => {
    for (const c of conns) {
      for (const w of c.watches) {
        if (w.abs.startsWith('@')) continue;
        if (isAtOrBelow(ch.path, w.abs)) fire(c, w, ch.path);
        else if (ch.recursive && isAtOrBelow(w.abs, ch.path)) fire(c, w, w.abs);
      }
    }
  });

  const handle = (c: Conn, f: Frame): void => {
    const args = splitStrings(f.payload);
    opts.onRequest?.(f.type, args);
    const reply = (payload: Buffer): void => send(c, { type: f.type, reqId: f.reqId, txId: f.txId, payload });
    const ok = (): void => reply(nulStrings('OK'));
    const arg = (i: number): string => {
      const a = args[i];
      if (a === undefined) throw new XsStoreError('EINVAL', 'missing argument');
      return a;
    };
    try {
      const tx = f.txId;
      if (
        tx !== 0 &&
        f.type !== XsOp.WATCH &&
        f.type !== XsOp.UNWATCH &&
        !(c.txs.has(tx) && store.hasTransaction(tx))
      ) {
        throw new XsStoreError('ENOENT', `no transaction ${tx}`);
      }
      switch (f.type) {
        case XsOp.READ:
          reply(store.read(arg(0), tx));
          break;
        case XsOp.WRITE: {
          const nul = f.payload.indexOf(0);
          if (nul < 0) throw new XsStoreError('EINVAL', 'WRITE without value');
          store.write(f.payload.toString('utf8', 0, nul), Buffer.from(f.payload.subarray(nul + 1)), tx);
          ok();
          break;
        }
        case XsOp.MKDIR:
          store.mkdir(arg(0), tx);
          ok();
          break;
        case XsOp.RM:
          store.rm(arg(0), tx);
          ok();
          break;
        case XsOp.DIRECTORY: {
          const payload = nulStrings(...store.directory(arg(0), tx));
          if (payload.length > XENSTORE_PAYLOAD_MAX) throw new XsStoreError('E2BIG');
          reply(payload);
          break;
        }
        case XsOp.DIRECTORY_PART:
          reply(directoryPart(store, arg(0), Number(arg(1)), tx));
          break;
        case XsOp.GET_PERMS:
          reply(nulStrings(...store.getPerms(arg(0), tx)));
          break;
        case XsOp.SET_PERMS:
          store.setPerms(arg(0), args.slice(1), tx);
          ok();
          break;
        case XsOp.GET_DOMAIN_PATH: {
          const domid = arg(0);
          if (!/^\d+$/.test(domid)) throw new XsStoreError('EINVAL', `bad domid ${domid}`);
          reply(nulStrings(`/local/domain/${Number(domid)}`));
          break;
        }
        case XsOp.TRANSACTION_START: {
          if (tx !== 0) throw new XsStoreError('EBUSY', 'nested transaction');
          const id = store.startTransaction();
          c.txs.add(id);
          reply(nulStrings(String(id)));
          break;
        }
        case XsOp.TRANSACTION_END: {
          const how = arg(0);
          if (how !== 'T' && how !== 'F') throw new XsStoreError('EINVAL', `TRANSACTION_END ${how}`);
          c.txs.delete(tx);
          store.endTransaction(tx, how === 'T');
          ok();
          break;
        }
        case XsOp.WATCH: {
          const path = arg(0);
          const token = arg(1);
          const abs = store.canonical(path, true);
          if (c.watches.some((w) => w.path === path && w.token === token)) throw new XsStoreError('EEXIST');
          const w: Watch = { path, abs, token };
          c.watches.push(w);
          ok();
          send(c, { type: XsOp.WATCH_EVENT, reqId: 0, txId: 0, payload: nulStrings(path, token) });
          break;
        }
        case XsOp.UNWATCH: {
          const i = c.watches.findIndex((w) => w.path === arg(0) && w.token === arg(1));
          if (i < 0) throw new XsStoreError('ENOENT', 'no such watch');
          c.watches.splice(i, 1);
          ok();
          break;
        }
        case XsOp.RESET_WATCHES:
          c.watches = [];
          ok();
          break;
        case XsOp.IS_DOMAIN_INTRODUCED:
          reply(nulStrings(Number(arg(0)) === store.domid ? 'T' : 'F'));
          break;
        default:
          throw new XsStoreError('ENOSYS', `operation ${f.type}`);
      }
    } catch (e) {
      if (!(e instanceof XsStoreError)) throw e;
      send(c, { type: XsOp.ERROR, reqId: f.reqId, txId: f.txId, payload: nulStrings(e.errno) });
    }
  };

  const server = net.createServer((sock) => {
    const c: Conn = { sock, decoder: new FrameDecoder(XENSTORE_PAYLOAD_MAX), watches: [], txs: new Set() };
    conns.add(c);
    sock.on('data', (chunk: Buffer) => {
      let frames: Frame[];
      try {
        frames = c.decoder.push(chunk);
      } catch {
        sock.destroy(); // a client over the payload limit is cut off, as xenstored does
        return;
      }
      for (const f of frames) {
        if (sock.destroyed) break;
        handle(c, f);
      }
    });
    sock.on('error', () => sock.destroy());
    sock.on('close', () => {
      conns.delete(c);
      for (const id of c.txs) {
        if (store.hasTransaction(id)) store.endTransaction(id, false);
      }
    });
  });

  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(opts.socketPath, () => {
      server.off('error', reject);
      resolve();
    });
  });
  try {
    fs.chmodSync(opts.socketPath, 0o600);
  } catch {
    /* best effort, as for the daemon's own socket */
  }

  let closing: Promise<void> | undefined;
  return {
    socketPath: opts.socketPath,
    store,
    close() {
      closing ??= new Promise<void>((resolve) => {
        unsubscribe();
        for (const c of conns) c.sock.destroy();
        server.close(() => {
          fs.rm(opts.socketPath, { force: true }, () => resolve());
        });
      });
      return closing;
    },
  };
}

function isAtOrBelow(path: string, base: string): boolean {
  return path === base || base === '/' || path.startsWith(`${base}/`);
}

/**
 * DIRECTORY_PART as the C daemon answers it: `gencount\0`, then as many children (NUL-terminated)
 * from byte offset `off` of the child list as fit, and one more NUL when the list is complete.
 */
function directoryPart(store: XsStore, path: string, off: number, tx: number): Buffer {
  if (!Number.isInteger(off) || off < 0) throw new XsStoreError('EINVAL', 'bad offset');
  const { gen, children } = store.directoryWithGen(path, tx);
  const list = nulStrings(...children);
  const head = nulStrings(String(gen));
  if (off >= list.length) return Buffer.concat([head, Buffer.from([0])]);
  let end = off;
  while (end < list.length) {
    const next = list.indexOf(0, end) + 1;
    if (head.length + (next - off) + 1 > XENSTORE_PAYLOAD_MAX) break;
    end = next;
  }
  if (end === off) throw new XsStoreError('E2BIG');
  const parts = [head, list.subarray(off, end)];
  if (end === list.length) parts.push(Buffer.from([0]));
  return Buffer.concat(parts);
}
