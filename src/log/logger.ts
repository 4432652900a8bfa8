/**
 * One line per event, appended to the stock scripts' log (`/var/log/xen/xen-hotplug.log` by
 * default), e.g.
 *
 *     2026-11-25T19:44:24.123Z block-cow[4242] info add backend/vbd/5/51712: connected /dev/dm-3 (fd:3) ms=412
 *
 * Warnings and errors also go to stderr, which libxl passes on to the person running xl.
 * Lines are never lost on exit: `close()` ends the logger and waits until the file transport
 * has flushed (entry points await it before returning their exit code; nothing calls
 * process.exit()). Rotation is logrotate's job: several hook processes append to one file.
 */
import { WriteStream } from 'node:fs';
import winston from 'winston';

// winston loads its transports on first access, and Node its file streams: take them now, while
// the module loads, so that a hook's startup snapshot holds them ready (the file transport's
// zlib and write stream included) instead of compiling them on every run. The WriteStream line
// is that access; written as a bare `void WriteStream`, esbuild drops it as unused.
const { File: FileTransport, Console: ConsoleTransport } = winston.transports;
if (typeof WriteStream !== 'function') throw new Error('node:fs has no WriteStream');

export type Fields = Record<string, string | number | boolean | undefined>;

export interface Logger {
  debug(msg: string, fields?: Fields): void;
  info(msg: string, fields?: Fields): void;
  warn(msg: string, fields?: Fields): void;
  error(msg: string, fields?: Fields): void;
  /** Flush and close; safe to call twice. */
  close(): Promise<void>;
}

export interface LoggerOptions {
  /** Name shown on every line, e.g. `block-cow`. */
  tag: string;
  /** Log file; '' for none. */
  file: string;
  /** Also print warnings and errors to stderr (default true). */
  stderr?: boolean;
  /** Print every level to stderr (`--verbose`). */
  verbose?: boolean;
  /**
   * Where the stderr lines go instead of this process's stderr: the resident service relays
   * them to the wrapper whose event it runs.
   */
  stderrLine?: (line: string) => void;
}

function render(fields: Fields): string {
  return Object.entries(fields)
    .filter(([, v]) => v !== undefined)
    .map(([k, v]) => {
      const s = String(v);
      return `${k}=${/[\s"=]/.test(s) || s === '' ? JSON.stringify(s) : s}`;
    })
    .join(' ');
}

export function formatLine(
  time: Date,
  tag: string,
  pid: number,
  level: string,
  msg: string,
  fields: Fields = {},
): string {
  const f = render(fields);
  return `${time.toISOString()} ${tag}[${pid}] ${level} ${msg}${f ? ` ${f}` : ''}`;
}

export function createLogger(opts: LoggerOptions): Logger {
  const line = winston.format.printf((info) =>
    formatLine(new Date(), opts.tag, process.pid, info.level, String(info.message), (info.fields ?? {}) as Fields),
  );
  const transports: winston.transport[] = [];
  let file: winston.transports.FileTransportInstance | undefined;
  let fileFailed = false;
  if (opts.file) {
    file = new FileTransport({ filename: opts.file, format: line, options: { flags: 'a', mode: 0o640 } });
    // A log we cannot write must never fail the hook: the device matters more than the line.
    file.on('error', () => {
      fileFailed = true;
    });
    transports.push(file);
  }
  const relay = opts.stderr !== false ? opts.stderrLine : undefined;
  if (opts.stderr !== false && !relay) {
    const levels = ['error', 'warn', 'info', 'debug'];
    transports.push(
      new ConsoleTransport({
        level: opts.verbose ? 'debug' : 'warn',
        stderrLevels: levels,
        format: winston.format.printf((info) => `${opts.tag}: ${String(info.message)}`),
      }),
    );
  }
  const w = winston.createLogger({ level: 'debug', transports, exitOnError: false });
  // winston passes a transport's error on to the logger, where an 'error' event nobody listens to
  // ends the process: a log file we may not write (not root, a read-only /var/log) must not.
  w.on('error', () => {});
  let closed: Promise<void> | undefined;
  const relayed = new Set(opts.verbose ? ['error', 'warn', 'info', 'debug'] : ['error', 'warn']);
  const log = (level: string) => (msg: string, fields?: Fields) => {
    if (closed) return;
    w.log({ level, message: msg, fields });
    if (relay && relayed.has(level)) relay(`${opts.tag}: ${msg}`);
  };
  return {
    debug: log('debug'),
    info: log('info'),
    warn: log('warn'),
    error: log('error'),
    close() {
      closed ??= new Promise<void>((resolve) => {
        // A file that failed (EACCES at open: not root, a read-only /var/log) never finishes: its
        // error came before, and waiting for it would let the process end with nothing pending,
        // exit code 0, before the caller returned its own.
        if (!file || fileFailed) {
          w.end();
          resolve();
          return;
        }
        let done = false;
        const finish = () => {
          if (!done) {
            done = true;
            clearTimeout(bound);
            resolve();
          }
        };
        // And whatever else keeps it from finishing, the lines are given a few seconds, not forever.
        const bound = setTimeout(finish, 5000);
        file.once('finish', finish);
        file.once('error', finish);
        w.end();
      });
      return closed;
    },
  };
}

/** A logger that keeps lines in memory (tests, and `simulate` to show what a hook logged). */
export function memoryLogger(): Logger & { lines: { level: string; msg: string; fields: Fields }[] } {
  const lines: { level: string; msg: string; fields: Fields }[] = [];
  const log =
    (level: string) =>
    (msg: string, fields: Fields = {}) => {
      lines.push({ level, msg, fields });
    };
  return {
    lines,
    debug: log('debug'),
    info: log('info'),
    warn: log('warn'),
    error: log('error'),
    close: async () => {},
  };
}
