/**
 * Every hook the project ships, by the name it is installed under. The CLI finds a record's
 * undoers here (`gc`), `simulate` finds the hook to run, and `install` installs a wrapper for
 * each bundle. A new hook is one line in HOOKS.
 */
import type { Backend } from './types.js';
import { blockBackend } from './block.js';
import { cowBackend } from './cow.js';
import { qcowBackend } from './qcow.js';
import { thinBackend } from './thin.js';
import { lvsnapBackend } from './lvsnap.js';
import { rbdBackend } from './rbd.js';

export const HOOKS: Readonly<Record<string, Backend>> = {
  block: blockBackend as Backend,
  'block-cow': cowBackend as Backend,
  'block-qcow': qcowBackend as Backend,
  'block-thin': thinBackend as Backend,
  'block-lvsnap': lvsnapBackend as Backend,
  'block-rbd': rbdBackend as Backend,
};

/**
 * Device-mapper names the hooks give their devices start with one of these; a dm device named so
 * that no journal record mentions is reported as leaked (and `gc` removes it).
 */
export const DM_NAME_PREFIXES: readonly string[] = ['xbh-'];

export function hookNamed(script: string): Backend | undefined {
  const base = script.slice(script.lastIndexOf('/') + 1);
  return Object.prototype.hasOwnProperty.call(HOOKS, base) ? HOOKS[base] : undefined;
}

/**
 * What a disk's params read from (its base, image, origin or snapshot), as its hook's grammar
 * parses them, so a path with spaces is shown whole; the params as given when the hook is
 * unknown or they do not parse.
 */
export function paramsSource(script: string, params: string): string {
  return hookNamed(script)?.source?.(params) ?? params.trim();
}
