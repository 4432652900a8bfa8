import type { GuestJobResult, GuestRun } from './run-guest.mjs';
import type { TapPoint } from './tap.mjs';

export const GUEST_TEST_DIR: string;
export const BUNDLE_DIR: string;
export interface GuestTestResult extends GuestJobResult {
  source: string;
  points: TapPoint[];
}
export interface GuestTestRun extends GuestRun {
  results: GuestTestResult[];
}
export function guestTestFiles(filters?: string[], prefixes?: string[]): string[];
/** The guest variables `npm test` runs with (XBH_FAULT_CONCURRENCY, 16 unless set). */
export function npmTestEnv(): Record<string, string>;
export function bundleGuestTests(files: string[], outDir: string): Promise<string[]>;
export function runGuestTests(options?: {
  filters?: string[];
  prefixes?: string[];
  timeoutMs?: number;
  fileTimeoutMs?: number;
  onConsole?: (chunk: string) => void;
  log?: (message: string) => void;
  shell?: boolean;
  /** Variables for the test files in the guest. */
  env?: Record<string, string>;
  /** The guest's memory (default 2048 MiB). */
  memoryMb?: number;
}): Promise<GuestTestRun>;
/** The guest's memory for a file's shard: every block-cow hook of fault-concurrency is a process of its own. */
export function guestMemoryMb(concurrency: number): number;
