/**
 * The one place where the project runs an external command. Every device tool (losetup,
 * dmsetup, qemu-nbd, qemu-img, lvm, flock) goes through a `Runner`, so that tests can swap in a
 * recording runner and production has one set of defaults: argument arrays only (never a shell),
 * a fixed PATH and LANG=C so that output parses the same everywhere, a timeout well inside
 * libxl's 40 s hotplug limit, and errors as values with the tool's own stderr.
 */
export interface RunOptions {
  /** Milliseconds before the command is killed (default `DEFAULT_TIMEOUT_MS`). */
  timeoutMs?: number;
  /** Extra file descriptors to hand the child from fd 3 on (e.g. an fd to flock). */
  extraFds?: number[];
  /** Text fed to stdin. */
  input?: string;
}

export interface RunResult {
  /** The command as a person would type it, for messages and logs. */
  command: string;
  exitCode: number | undefined;
  signal: string | undefined;
  stdout: string;
  stderr: string;
  durationMs: number;
  failed: boolean;
  timedOut: boolean;
}

/** A command that failed: its result, and a one-line reason fit for a hotplug-error. */
export class CommandError extends Error {
  readonly result: RunResult;
  constructor(result: RunResult) {
    super(describeFailure(result));
    this.name = 'CommandError';
    this.result = result;
  }
}

export interface Runner {
  /**
   * Where the machine these commands act on has its sysfs, for the synchronous readers that go
   * with them (a device's size); /sys when absent. A recording runner that plays losetup and
   * dmsetup points it at its fake tree.
   */
  readonly sysRoot?: string;
  /** Run and return the result; throws CommandError when the command fails. */
  run(file: string, args: readonly string[], opts?: RunOptions): Promise<RunResult>;
  /** Run and return the result whether or not it failed (for probes: "does this exist?"). */
  probe(file: string, args: readonly string[], opts?: RunOptions): Promise<RunResult>;
}

export const DEFAULT_TIMEOUT_MS = 15_000;

/** `losetup: /x: failed to set up loop device: No such file` — the tool's own words, one line. */
export function describeFailure(r: RunResult): string {
  const why = r.timedOut
    ? `timed out after ${Math.round(r.durationMs)} ms`
    : r.signal
      ? `was killed by ${r.signal}`
      : r.exitCode === undefined
        ? 'could not be started'
        : `exited with status ${r.exitCode}`;
  // dmsetup ends every failure with a bare "Command failed."; the line before it says why.
  const err = r.stderr
    .trim()
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l !== '' && !/^Command failed\.?$/.test(l))
    .pop();
  return `${r.command} ${why}${err ? `: ${err}` : ''}`;
}
