/**
 * Permission errors, said once for every command: a non-root user who runs a command that reads
 * the journal, takes a lock or drives device-mapper gets "must run as root (what: permission
 * denied)" instead of Node's `EACCES: permission denied, scandir '…'` or a tool's own words.
 */
import { CommandError } from '../devices/runner.js';

const DENIED = /permission denied|operation not permitted|must be (?:the )?super-?user|must be root/i;

/** Whether this process runs as root (effective uid 0). */
export function runningAsRoot(): boolean {
  return process.geteuid?.() === 0;
}

/** Something this process may not read or change, found where no exception was thrown (a journal record listed as unreadable). */
export class DeniedError extends Error {
  override name = 'DeniedError';
  constructor(
    readonly what: string,
    readonly why = 'permission denied',
  ) {
    super(`${what}: ${why}`);
  }
}

/** What was refused, e.g. `scandir /run/xen-blockhooks/journal` or `dmsetup remove xbh-…`, or undefined when `e` is no permission error. */
export function deniedWhat(e: unknown): { what: string; why: string } | undefined {
  if (e instanceof DeniedError) return { what: e.what, why: e.why };
  if (e instanceof CommandError) {
    const r = e.result;
    return r.exitCode !== undefined && DENIED.test(r.stderr)
      ? { what: r.command, why: 'permission denied' }
      : undefined;
  }
  const x = e as (NodeJS.ErrnoException & { dest?: string }) | undefined;
  if (!(x instanceof Error) || (x.code !== 'EACCES' && x.code !== 'EPERM')) return undefined;
  const why = x.code === 'EACCES' ? 'permission denied' : 'operation not permitted';
  return { what: [x.syscall, x.path, x.dest ? `→ ${x.dest}` : undefined].filter(Boolean).join(' ') || x.message, why };
}

/**
 * The sentence for a permission error, or undefined when `e` is none: "must run as root (…)" for
 * anyone but root; for root itself (a read-only or protected file, a missing capability in a
 * container) what was refused, without the advice.
 */
export function permissionSentence(e: unknown, isRoot: boolean): string | undefined {
  const d = deniedWhat(e);
  if (!d) return undefined;
  return isRoot ? `${d.what}: ${d.why}, although this runs as root` : `must run as root (${d.what}: ${d.why})`;
}

const NODE_DENIED =
  /\b(EACCES|EPERM): (?:permission denied|operation not permitted), (\w+) '([^']*)'(?: -> '([^']*)')?/;

/**
 * A permission error already turned into text (gc's failed removals): Node's `EACCES: permission
 * denied, mkdir '/run/…/locks'` becomes `mkdir /run/…/locks: permission denied` (`denied`), in the
 * text it stood in (`text`); a tool's own "Permission denied" is kept as it is. Undefined when the
 * text names no permission error.
 */
export function deniedInText(text: string): { denied: string; text: string } | undefined {
  const m = NODE_DENIED.exec(text);
  if (m) {
    const why = m[1] === 'EACCES' ? 'permission denied' : 'operation not permitted';
    const denied = `${[m[2], m[3], m[4] ? `→ ${m[4]}` : undefined].filter(Boolean).join(' ')}: ${why}`;
    return { denied, text: text.replace(m[0], denied) };
  }
  return DENIED.test(text) ? { denied: text, text } : undefined;
}
