/**
 * The hand-off between a hook's wrapper (bash, packaging/wrapper.sh.in) and the resident service
 * (`xen-blockhooks serve`), spelled out once. Pure: parsing and formatting, no I/O.
 *
 * The channel is a directory only root may enter (0700, owned by root), so only root can hand
 * over an event. In it:
 *   - `in`, a FIFO the service reads: one line per event, the decimal slot number `K`;
 *   - `K.out` for K in 0..SLOTS-1, FIFOs made by the service: the reply of slot K;
 *   - `K.claim`, made by a wrapper with O_EXCL (bash noclobber) holding its pid: the slot is its
 *     own until the service deletes the claim, which it does only once that pid has ended;
 *   - `K.req`, the request, written by the wrapper after its claim: NUL-terminated fields
 *     (REQUEST_MAGIC, slot, wrapper pid, hook name, argc, the arguments, envc, NAME=VALUE
 *     entries, REQUEST_END). NUL is the one byte neither an argument nor the environment holds;
 *   - `pid`, the service's pid, for the wrapper's liveness check (`kill -0`).
 * The service takes a request by renaming `K.req` to `K.taken` (atomic): a wrapper that waited
 * too long for the `a` line revokes it by renaming it away first, and then exactly one of them
 * runs the event. The reply is whole lines, none lost: `a PID` taken by the service of that pid
 * (watched from then on), `h` heartbeat (every HEARTBEAT_MS while the event runs), `o TEXT` a
 * stdout line, `e TEXT` a stderr line, `x CODE` the exit code, last. A slot is freed only once
 * its event has ended and its wrapper too.
 */

export const SLOTS = 256;
export const REQUEST_MAGIC = 'XBH-EVENT-1';
export const REQUEST_END = 'END';
/** A request is a few hundred bytes; anything near this is not from a wrapper. */
export const MAX_REQUEST_BYTES = 64 * 1024;
export const MAX_ARGS = 16;
export const HEARTBEAT_MS = 1000;

/** Environment names the wrapper forwards (the rest of an event's environment is the service's). */
export const FORWARDED_ENV = /^(XEN\w*|DM_\w+|LVM_\w+|CEPH_\w+|PATH|script)$/;

export interface EventRequest {
  slot: number;
  /** The wrapper's pid (it holds the slot's claim). */
  pid: number;
  /** The hook's name as installed: block, block-cow, ... */
  hook: string;
  argv: string[];
  env: Record<string, string>;
}

export class ProtocolError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ProtocolError';
  }
}

const WHOLE = /^(0|[1-9]\d{0,9})$/;

function whole(s: string | undefined, what: string, max: number): number {
  if (s === undefined || !WHOLE.test(s) || Number(s) > max)
    throw new ProtocolError(`${what} is not a number up to ${max}`);
  return Number(s);
}

/** The slot named by one line of `in`, or undefined for anything else. */
export function parseSlotLine(line: string): number | undefined {
  return WHOLE.test(line) && Number(line) < SLOTS ? Number(line) : undefined;
}

/** A request file's bytes, checked field by field. `knownHook` says which hook names exist. */
export function parseRequest(bytes: Buffer, slot: number, knownHook: (name: string) => boolean): EventRequest {
  if (bytes.length > MAX_REQUEST_BYTES) throw new ProtocolError(`request of ${bytes.length} bytes is too large`);
  if (bytes.length === 0 || bytes[bytes.length - 1] !== 0) throw new ProtocolError('request does not end in NUL');
  const f = bytes
    .subarray(0, bytes.length - 1)
    .toString('utf8')
    .split('\0');
  let i = 0;
  const next = (): string | undefined => f[i++];
  if (next() !== REQUEST_MAGIC) throw new ProtocolError('not a request (no magic)');
  if (whole(next(), 'slot', SLOTS - 1) !== slot) throw new ProtocolError('request names another slot');
  const pid = whole(next(), 'pid', 2 ** 22);
  if (pid < 2) throw new ProtocolError('pid is not a process');
  const hook = next() ?? '';
  if (!knownHook(hook)) throw new ProtocolError(`unknown hook "${hook.slice(0, 40)}"`);
  const argc = whole(next(), 'argc', MAX_ARGS);
  const argv: string[] = [];
  for (let a = 0; a < argc; a++) {
    const v = next();
    if (v === undefined) throw new ProtocolError('request ends inside its arguments');
    argv.push(v);
  }
  const envc = whole(next(), 'envc', 256);
  const env: Record<string, string> = {};
  for (let a = 0; a < envc; a++) {
    const v = next();
    const eq = v?.indexOf('=') ?? -1;
    if (v === undefined || eq < 1) throw new ProtocolError('environment entry is not NAME=VALUE');
    const name = v.slice(0, eq);
    if (!FORWARDED_ENV.test(name)) throw new ProtocolError(`environment name "${name.slice(0, 40)}" is not forwarded`);
    if (Object.prototype.hasOwnProperty.call(env, name))
      throw new ProtocolError(`environment name ${name} given twice`);
    env[name] = v.slice(eq + 1);
  }
  if (next() !== REQUEST_END || i !== f.length) throw new ProtocolError('request does not end where it says');
  return { slot, pid, hook, argv, env };
}

/** A request as the wrapper writes it (tests, and `simulate`-style drivers). */
export function formatRequest(r: EventRequest): Buffer {
  const env = Object.entries(r.env).map(([k, v]) => `${k}=${v}`);
  const fields = [
    REQUEST_MAGIC,
    String(r.slot),
    String(r.pid),
    r.hook,
    String(r.argv.length),
    ...r.argv,
    String(env.length),
    ...env,
    REQUEST_END,
  ];
  return Buffer.from(fields.map((x) => `${x}\0`).join(''), 'utf8');
}

/** The reply lines for a block of output: one `o`/`e` line per line of text. */
export function outputLines(kind: 'o' | 'e', text: string): string {
  return text
    .split('\n')
    .map((l) => `${kind} ${l}\n`)
    .join('');
}
