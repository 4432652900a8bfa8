/**
 * xend's `type` dispatch: the generic `block` script, given a backend whose `type` node names
 * something it does not handle itself (`cow`, `qcow`, `drbd`…), runs `<xen script dir>/block-<type>`
 * with the same arguments and environment, as `create_block_device` did ("falls through to a script
 * with a name of the form block-[type]"). Under xl the type is always `phy`, so this never fires.
 *
 * This is the one place that starts a program with the caller's full environment and inherited
 * stdio rather than through the device Runner: the next script needs XENBUS_PATH and friends, and
 * its output belongs to the toolstack.
 */
import { spawn } from 'node:child_process';
import { accessSync, constants } from 'node:fs';
import { join } from 'node:path';

/** Types the drop-in `block` handles itself. */
export const OWN_TYPES = new Set(['phy', 'file', '']);

/** The script a `type` value dispatches to, or undefined when there is none to run. */
export function dispatchTarget(type: string | undefined, scriptDir: string): string | undefined {
  if (type === undefined || OWN_TYPES.has(type)) return undefined;
  if (!/^[a-z0-9][a-z0-9_-]*$/.test(type)) return undefined;
  const file = join(scriptDir, `block-${type}`);
  try {
    accessSync(file, constants.X_OK);
  } catch {
    return undefined;
  }
  return file;
}

export function runScript(file: string, argv: readonly string[], env: NodeJS.ProcessEnv): Promise<number> {
  return new Promise((resolve) => {
    const child = spawn(file, [...argv], { env, stdio: ['ignore', 'inherit', 'inherit'] });
    child.on('error', () => resolve(1));
    child.on('exit', (code, signal) => resolve(signal ? 1 : (code ?? 1)));
  });
}
