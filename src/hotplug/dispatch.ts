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

export function runScript(
  file: string,
  argv: readonly string[],
  env: NodeJS.ProcessEnv,
  io?: { out: (line: string) => void; err: (line: string) => void },
): Promise<number> {
  return new Promise((resolve) => {
    // Its output is ours: inherited by a hook process, relayed line by line by the service.
    const child = spawn(file, [...argv], { env, stdio: ['ignore', io ? 'pipe' : 'inherit', io ? 'pipe' : 'inherit'] });
    const relay = (stream: NodeJS.ReadableStream | null, to: (line: string) => void) => {
      let rest = '';
      stream?.setEncoding('utf8');
      stream?.on('data', (s: string) => {
        const lines = (rest + s).split('\n');
        rest = lines.pop() ?? '';
        for (const l of lines) to(l);
      });
      stream?.on('end', () => {
        if (rest) to(rest);
      });
    };
    if (io) {
      relay(child.stdout, io.out);
      relay(child.stderr, io.err);
    }
    child.on('error', () => resolve(1));
    // Its exit decides; its output is waited for a second at most (a daemon it started may hold the pipes).
    child.on('exit', (code, signal) => {
      const done = () => resolve(signal ? 1 : (code ?? 1));
      if (!io) return done();
      const t = setTimeout(done, 1000);
      child.once('close', () => {
        clearTimeout(t);
        done();
      });
    });
  });
}
