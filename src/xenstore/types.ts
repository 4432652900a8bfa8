/**
 * The xenstore operations every part of the project uses. Two implementations stand behind it:
 * `client.ts` (the wire protocol over the xenstored socket or /dev/xen/xenbus) and, for tests and
 * `simulate`, the same client talking to our own in-process `server.ts`.
 *
 * Paths are passed through exactly as given: a relative path such as `backend/vbd/5/51712`
 * is resolved by the daemon under the connection's home (`/local/domain/0` in dom0), never by us.
 */

/** Error names the daemon sends back in an XS_ERROR reply (xs_wire.h `xsd_errors[]`). */
export type XsErrno =
  | 'EINVAL'
  | 'EACCES'
  | 'EEXIST'
  | 'EISDIR'
  | 'ENOENT'
  | 'ENOMEM'
  | 'ENOSPC'
  | 'EIO'
  | 'ENOTEMPTY'
  | 'ENOSYS'
  | 'EROFS'
  | 'EBUSY'
  | 'EAGAIN'
  | 'EISCONN'
  | 'E2BIG'
  | 'EPERM';

/** A failed xenstore request: `errno` is the daemon's answer, `op` and `path` what we asked. */
export class XsError extends Error {
  readonly errno: XsErrno | 'ECONNECT' | 'ECLOSED' | 'EPROTO' | 'ETIMEDOUT';
  readonly op: string;
  readonly path: string | undefined;
  constructor(errno: XsError['errno'], op: string, path?: string, detail?: string) {
    super(`xenstore ${op}${path === undefined ? '' : ` ${path}`} failed: ${errno}${detail ? ` (${detail})` : ''}`);
    this.name = 'XsError';
    this.errno = errno;
    this.op = op;
    this.path = path;
  }
}

/** Operations valid both outside and inside a transaction. */
export interface XsOps {
  /** The value at `path`; throws XsError ENOENT when there is none. */
  read(path: string): Promise<string>;
  /** The value at `path`, or undefined when the node does not exist. */
  tryRead(path: string): Promise<string | undefined>;
  /** Write a value (creating missing parents, as the daemon does). */
  write(path: string, value: string): Promise<void>;
  /** Create an empty node (no error if it exists). */
  mkdir(path: string): Promise<void>;
  /** Remove a node and everything below it; no error if it does not exist but its parent does. */
  rm(path: string): Promise<void>;
  /** The names of the children of `path`; throws ENOENT when `path` does not exist. */
  directory(path: string): Promise<string[]>;
}

export interface XsTransaction extends XsOps {
  readonly id: number;
}

export interface WatchEvent {
  path: string;
  token: string;
}

export interface XenstoreClient extends XsOps {
  /**
   * Run `body` in a transaction and commit it. On EAGAIN at commit the whole body is run again
   * (as libxenstore's clients do), up to a bounded number of attempts. If `body` throws, the
   * transaction is aborted and the error passed on.
   */
  transaction<T>(body: (tx: XsTransaction) => Promise<T>): Promise<T>;
  /** Register a watch; `onEvent` is called for every WATCH_EVENT with this token (first once at once). */
  watch(path: string, token: string, onEvent: (ev: WatchEvent) => void): Promise<void>;
  unwatch(path: string, token: string): Promise<void>;
  /** The longest payload this connection carries: 4096 over the socket, 16 less over /dev/xen/xenbus. */
  readonly maxPayload: number;
  /** `/local/domain/<domid>` as the daemon answers it. */
  getDomainPath(domid: number): Promise<string>;
  close(): Promise<void>;
}

/** The longest payload the daemon accepts in either direction (xs_wire.h XENSTORE_PAYLOAD_MAX). */
export const XENSTORE_PAYLOAD_MAX = 4096;
