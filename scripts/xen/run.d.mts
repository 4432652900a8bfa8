export interface XenTier {
  xen: string;
  vmlinux: string;
  dom0Initrd: string;
  domuInitrd: string;
  xenroot: string;
  modroot: string;
  kernelPackage: string;
  kernelVersion: string;
  nodeVersion: string;
  packages: string[];
}

export interface XenScenarioResult {
  name: string;
  file: string;
  /** dom0 recorded an exit status for it (false when dom0 stopped or the boot timed out first). */
  finished: boolean;
  exitCode: number | null;
  durationMs?: number;
  timedOut: boolean;
  /** TAP-style lines: `ok - …`, `not ok - …`, `# …`. */
  stdout: string;
  stderr: string;
  /** Domains, dm devices, loops or nbd devices it left behind (cleared before the next one). */
  leftovers: string;
  ok: boolean;
}

export interface XenRun {
  ok: boolean;
  /** dom0 ran every scenario and printed its end marker. */
  done: boolean;
  timedOut: boolean;
  setupError?: string;
  qemuExit: { code?: number | null; signal?: string | null; error?: string };
  /** Host milliseconds from the start of the run to dom0 ready (xenstored, xenconsoled up). */
  bootMs?: number;
  /** dom0 milliseconds from its stage 2 start to ready. */
  readyMs?: number;
  totalMs: number;
  /** /proc/loadavg of the host at the start and the end (the tier's speed depends on it). */
  hostLoad: string;
  consoleTail: string;
  /** /var/log/xen of dom0 (xl logs, the hotplug log, domU consoles under console/). */
  logs: Record<string, string>;
  results: XenScenarioResult[];
  tier: XenTier;
}

export const SCENARIO_DIR: string;
export const XEN_CMDLINE: string;
export const DOM0_CMDLINE: string;
export function listScenarios(dir?: string): string[];
export function runXenTier(opts?: {
  scenarios?: string[];
  timeoutMs?: number;
  scenarioTimeoutS?: number;
  onConsole?: (text: string) => void;
  log?: (message: string) => void;
  /** Leave the results share in /tmp (its path is logged). */
  keep?: boolean;
}): Promise<XenRun>;
export function describeFailure(r: XenScenarioResult, run: XenRun): string;
export function formatLogs(logs: Record<string, string>, maxPerLog?: number): string;
export const CPU: string;
