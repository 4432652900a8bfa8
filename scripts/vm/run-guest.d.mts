export interface GuestJobResult {
  label: string;
  argv: string[];
  /** The agent recorded a result for this job (false when the guest stopped first). */
  finished: boolean;
  exitCode: number | null;
  signal: string | null;
  error?: string;
  timedOut: boolean;
  durationMs?: number;
  stdout: string;
  stderr: string;
  /** Device state (dmsetup ls, losetup -a, connected nbd) the job left behind: a failure. */
  leftovers: string[];
  resetFailed: string[];
  scratchLeft: string[];
  ok: boolean;
}

export interface GuestRun {
  ok: boolean;
  /** The agent finished every job and the guest powered off by itself. */
  done: boolean;
  timedOut: boolean;
  qemuExit: { code?: number | null; signal?: string | null; error?: string };
  readyMs?: number;
  totalMs: number;
  consoleTail: string;
  results: GuestJobResult[];
}

export interface RunInGuestOptions {
  files?: string[];
  commands?: string[][];
  env?: Record<string, string>;
  timeoutMs?: number;
  fileTimeoutMs?: number;
  onConsole?: (chunk: string) => void;
  shell?: boolean;
  cwd?: string;
  memoryMb?: number;
  log?: (message: string) => void;
}

export function runInGuest(options?: RunInGuestOptions): Promise<GuestRun>;
export function describeJobFailure(result: GuestJobResult, run: GuestRun): string;
