/**
 * A failure the hook reports to the toolstack: `hotplug-error` gets `message` (one sentence a
 * person can act on: what, which path, why, what to do) and `hotplug-status` gets `status`
 * (`busy` for a sharing conflict, as block-common.sh's ebusy(); `error` otherwise).
 */
export type FailureStatus = 'error' | 'busy';

export class HotplugError extends Error {
  readonly status: FailureStatus;
  constructor(message: string, status: FailureStatus = 'error', options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'HotplugError';
    this.status = status;
  }
}

/** A bad command line: one line on stderr, exit 2. */
export class UsageError extends Error {
  override name = 'UsageError';
}

/** Several teardown steps failed; each is kept, none hides another (os-brick's ExceptionChainer). */
export class TeardownError extends HotplugError {
  readonly failures: Error[];
  constructor(what: string, failures: Error[]) {
    super(`${what}: ${failures.map((f) => f.message).join('; ')}`);
    this.name = 'TeardownError';
    this.failures = failures;
  }
}

export function messageOf(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}
