/**
 * xenstore message framing (xs_wire.h): a 16-byte header of four little-endian u32 — type,
 * req_id, tx_id, len — followed by `len` payload bytes, at most XENSTORE_PAYLOAD_MAX.
 */
import { XENSTORE_PAYLOAD_MAX, XsError } from './types.js';
import type { XsErrno } from './types.js';

export const HEADER_SIZE = 16;

/** Operation codes (enum xsd_sockmsg_type). */
export const XsOp = {
  CONTROL: 0,
  DIRECTORY: 1,
  READ: 2,
  GET_PERMS: 3,
  WATCH: 4,
  UNWATCH: 5,
  TRANSACTION_START: 6,
  TRANSACTION_END: 7,
  INTRODUCE: 8,
  RELEASE: 9,
  GET_DOMAIN_PATH: 10,
  WRITE: 11,
  MKDIR: 12,
  RM: 13,
  SET_PERMS: 14,
  WATCH_EVENT: 15,
  ERROR: 16,
  IS_DOMAIN_INTRODUCED: 17,
  RESUME: 18,
  SET_TARGET: 19,
  RESET_WATCHES: 21,
  DIRECTORY_PART: 22,
  GET_FEATURE: 23,
  SET_FEATURE: 24,
  GET_QUOTA: 25,
  SET_QUOTA: 26,
  INVALID: 0xffff,
} as const;

const OP_NAMES = new Map<number, string>(Object.entries(XsOp).map(([name, code]) => [code, name]));

/** The name of an operation code, for messages (`OP_<n>` for codes we do not know). */
export function opName(type: number): string {
  return OP_NAMES.get(type) ?? `OP_${type}`;
}

/** The error names of xsd_errors[]; anything else in an ERROR reply is read as EINVAL (as libxenstore does). */
export const XS_ERRNOS: readonly XsErrno[] = [
  'EINVAL',
  'EACCES',
  'EEXIST',
  'EISDIR',
  'ENOENT',
  'ENOMEM',
  'ENOSPC',
  'EIO',
  'ENOTEMPTY',
  'ENOSYS',
  'EROFS',
  'EBUSY',
  'EAGAIN',
  'EISCONN',
  'E2BIG',
  'EPERM',
];

export function parseErrno(payload: Buffer): XsErrno {
  const name = cString(payload);
  return (XS_ERRNOS as readonly string[]).includes(name) ? (name as XsErrno) : 'EINVAL';
}

export interface Frame {
  type: number;
  reqId: number;
  txId: number;
  payload: Buffer;
}

/** Header + payload as one buffer; E2BIG (nothing is sent) when the payload is over the limit. */
export function encodeFrame(frame: Frame, path?: string, max: number = XENSTORE_PAYLOAD_MAX): Buffer {
  const len = frame.payload.length;
  if (len > max) {
    throw new XsError('E2BIG', opName(frame.type), path, `payload of ${len} bytes exceeds ${max}`);
  }
  const buf = Buffer.allocUnsafe(HEADER_SIZE + len);
  buf.writeUInt32LE(frame.type >>> 0, 0);
  buf.writeUInt32LE(frame.reqId >>> 0, 4);
  buf.writeUInt32LE(frame.txId >>> 0, 8);
  buf.writeUInt32LE(len, 12);
  frame.payload.copy(buf, HEADER_SIZE);
  return buf;
}

/** `s1\0s2\0…`: every argument NUL-terminated (paths, tokens, ids). */
export function nulStrings(...parts: string[]): Buffer {
  return Buffer.concat(parts.flatMap((p) => [Buffer.from(p, 'utf8'), ZERO]));
}

/** WRITE payload: `path\0` then the value bytes, not terminated. */
export function writePayload(path: string, value: string | Buffer): Buffer {
  return Buffer.concat([
    Buffer.from(path, 'utf8'),
    ZERO,
    typeof value === 'string' ? Buffer.from(value, 'utf8') : value,
  ]);
}

/** Split a reply of NUL-terminated strings, dropping the empty tail after the last NUL. */
export function splitStrings(payload: Buffer): string[] {
  if (payload.length === 0) return [];
  const parts = payload.toString('utf8').split('\0');
  if (parts[parts.length - 1] === '') parts.pop();
  return parts;
}

/** The text up to the first NUL (or all of it when there is none). */
export function cString(payload: Buffer): string {
  const nul = payload.indexOf(0);
  return payload.toString('utf8', 0, nul < 0 ? payload.length : nul);
}

const ZERO = Buffer.from([0]);

/**
 * Incremental decoder: feed it whatever the transport delivers (half a header, several frames
 * at once) and it returns the complete frames. A header announcing more than `maxPayload`
 * bytes is a protocol violation: `push` throws and the decoder is unusable afterwards.
 */
export class FrameDecoder {
  private buf: Buffer = Buffer.alloc(0);
  constructor(private readonly maxPayload: number = XENSTORE_PAYLOAD_MAX) {}

  push(chunk: Buffer): Frame[] {
    this.buf = this.buf.length === 0 ? chunk : Buffer.concat([this.buf, chunk]);
    const frames: Frame[] = [];
    let off = 0;
    while (this.buf.length - off >= HEADER_SIZE) {
      const len = this.buf.readUInt32LE(off + 12);
      if (len > this.maxPayload) {
        throw new FrameTooLargeError(len, this.maxPayload);
      }
      if (this.buf.length - off < HEADER_SIZE + len) break;
      frames.push({
        type: this.buf.readUInt32LE(off),
        reqId: this.buf.readUInt32LE(off + 4),
        txId: this.buf.readUInt32LE(off + 8),
        payload: Buffer.from(this.buf.subarray(off + HEADER_SIZE, off + HEADER_SIZE + len)),
      });
      off += HEADER_SIZE + len;
    }
    this.buf = off === 0 ? this.buf : Buffer.from(this.buf.subarray(off));
    return frames;
  }

  /** Bytes received that do not yet form a whole frame. */
  get pending(): number {
    return this.buf.length;
  }
}

export class FrameTooLargeError extends Error {
  constructor(
    readonly len: number,
    readonly max: number,
  ) {
    super(`xenstore frame announces ${len} payload bytes, more than ${max}`);
    this.name = 'FrameTooLargeError';
  }
}
