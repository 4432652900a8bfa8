/**
 * argv + environment → a request. Both dialects reach the same code:
 *
 *   libxl (xl):        block-cow add|remove      env XENBUS_PATH=backend/vbd/<domid>/<devid> (relative),
 *                                                XENBUS_TYPE=vbd, XENBUS_BASE_PATH=backend, script=<path>
 *   xend / LiveCD era: block-cow create|destroy  (and `block` dispatching on the backend's `type`);
 *                      an extra trailing argument (the old `$node`) is accepted and ignored.
 *
 * XENBUS_PATH is passed to xenstore unchanged: the daemon resolves a relative path under the
 * connection's home (/local/domain/0 in dom0, the driver domain's own home elsewhere).
 */
import { UsageError } from '../disk/errors.js';

import type { Action, Dialect, HotplugRequest } from '../disk/request.js';

export type { Action, Dialect, HotplugRequest } from '../disk/request.js';

export type ParsedArgs = { kind: 'help' } | { kind: 'version' } | { kind: 'request'; request: HotplugRequest };

const ACTIONS: Record<string, { action: Action; dialect: Dialect }> = {
  add: { action: 'add', dialect: 'libxl' },
  remove: { action: 'remove', dialect: 'libxl' },
  online: { action: 'add', dialect: 'xend' },
  offline: { action: 'remove', dialect: 'xend' },
  create: { action: 'add', dialect: 'xend' },
  destroy: { action: 'remove', dialect: 'xend' },
};

/**
 * A backend path we will write to: `backend/<type>/<domid>/<devid>`, relative as libxl gives it,
 * or absolute below some domain's home. Anything else (a frontend path, `..`, stray characters)
 * is refused before a single key is written.
 */
const BACKEND_PATH = /^(\/local\/domain\/\d+\/)?backend\/vbd3?\/\d+\/\d+$/;

export function checkBackendPath(p: string): string | undefined {
  if (p === '') return 'XENBUS_PATH is empty';
  if (p.split('/').includes('..')) return `XENBUS_PATH "${p}" contains ".."`;
  if (!BACKEND_PATH.test(p))
    return `XENBUS_PATH "${p}" is not a block backend path (expected backend/vbd/<domid>/<devid>)`;
  return undefined;
}

export function parseArgs(script: string, argv: readonly string[], env: NodeJS.ProcessEnv): ParsedArgs {
  let verbose = false;
  const words: string[] = [];
  for (const a of argv) {
    if (a === '-h' || a === '--help') return { kind: 'help' };
    if (a === '-V' || a === '--version') return { kind: 'version' };
    if (a === '-v' || a === '--verbose') verbose = true;
    else if (a.startsWith('-')) throw new UsageError(`unknown option ${a}`);
    else words.push(a);
  }
  const verb = words[0];
  if (verb === undefined) throw new UsageError('no action given (expected add or remove)');
  const act = ACTIONS[verb];
  if (!act) throw new UsageError(`unknown action "${verb}" (expected add, remove, create or destroy)`);
  if (words.length > 2) throw new UsageError(`too many arguments after ${verb}`);
  const xenbusPath = env.XENBUS_PATH;
  if (xenbusPath === undefined)
    throw new UsageError('XENBUS_PATH is not set (this script is run by xl/libxl for a disk)');
  return {
    kind: 'request',
    request: {
      script,
      ...act,
      xenbusPath,
      xenbusType: env.XENBUS_TYPE ?? 'vbd',
      verbose: verbose || env.XEN_BLOCKHOOKS_VERBOSE === '1',
    },
  };
}
