/**
 * Folds one boot of the guest tier into the host run: runs the guest test files it is given
 * (test/guest/<prefix>*.test.ts) in one QEMU boot and mirrors each guest test point as one
 * assertion, so a failing assertion inside the guest fails `npm test` with its name and
 * diagnostics. A guest that cannot be built or booted is a failure, never a skip.
 *
 * The tier is cut into a few boots (test/host/guest-*.test.ts), each with its own time limit,
 * so a slow group cannot starve the others and tap runs two of them side by side.
 */
import t from 'tap';
import { basename } from 'node:path';
import { describeJobFailure } from '../../scripts/vm/run-guest.mjs';
import {
  guestMemoryMb,
  guestTestFiles,
  npmTestEnv,
  runGuestTests,
  type GuestTestRun,
} from '../../scripts/vm/run-guest-tests.mjs';
import { assertionPoints, errorSummary } from '../../scripts/vm/tap.mjs';
import { stockScriptsDir } from './stock-scripts.js';

/** Every guest file belongs to exactly one boot: these prefixes, one list per test/host/guest-*.test.ts. */
export const GUEST_SHARDS: Record<string, string[]> = {
  base: ['smoke', 'cli-'],
  cow: ['cow-'],
  fault: ['fault-'],
  qcow: ['qcow-'],
  thin: ['thin-', 'lvsnap-', 'watch-'],
  rbd: ['rbd-'],
  open: ['open-'],
};

function tail(text: string, lines = 40): string {
  return text.trimEnd().split('\n').slice(-lines).join('\n');
}

export async function foldGuestShard(shard: string): Promise<void> {
  const prefixes = GUEST_SHARDS[shard];
  if (!prefixes) throw new Error(`unknown guest shard ${shard}`);
  /** Hard limit for this boot (QEMU is killed after it), and for any one file in it. */
  const limitMs = Number(process.env.XEN_BLOCKHOOKS_GUEST_TIMEOUT_S ?? 1200) * 1000;
  const fileLimitMs = Number(process.env.XEN_BLOCKHOOKS_GUEST_FILE_TIMEOUT_S ?? 900) * 1000;
  t.setTimeout(limitMs + 120_000);
  if (guestTestFiles([], prefixes).length === 0) {
    t.fail(`no guest test files start with ${prefixes.join(' or ')}`);
    return;
  }
  // Debian's stock scripts, for the guest files that run them next to ours (fetched once into
  // .cache/stock, which the guest sees through the host's root). A failure here is reported by
  // the file that needs them.
  await stockScriptsDir().catch((e: Error) => t.comment(`stock scripts unavailable: ${e.message}`));
  let run: GuestTestRun | undefined;
  try {
    // The 64-way concurrency test (fault-concurrency) takes ~12 minutes of one emulated CPU at full
    // size: `npm test` runs it 16-way, `npm run reliability` (RELIABILITY.md) at full size.
    const env = npmTestEnv();
    run = await runGuestTests({
      prefixes,
      timeoutMs: limitMs,
      fileTimeoutMs: fileLimitMs,
      env,
      memoryMb: shard === 'fault' ? guestMemoryMb(Number(env.XBH_FAULT_CONCURRENCY)) : undefined,
    });
  } catch (e) {
    t.fail(`the guest tier could not run: ${(e as Error).message}`);
  }
  if (!run) return;
  const r0 = run;
  for (const r of r0.results) {
    t.test(`guest: ${basename(r.source)}`, async (st) => {
      const points = assertionPoints(r.points);
      for (const p of points) {
        if (p.skip || p.todo) st.pass(p.name, { [p.skip ? 'skip' : 'todo']: p.directive || true });
        else if (p.ok) st.pass(p.name);
        else {
          const why = errorSummary(p.diag);
          st.fail(`${p.name}${why ? `: ${why}` : ''}`, { guest: p.diag });
        }
      }
      const why = describeJobFailure(r, r0);
      if (why) {
        const leak = r.leftovers.length && !why.startsWith('left') ? ' and left devices behind' : '';
        st.fail(`${basename(r.source)} ${why.split('\n')[0]}${leak}`, {
          problem: why,
          stdoutTail: tail(r.stdout),
          stderrTail: tail(r.stderr),
          ...(r.finished ? {} : { consoleTail: r0.consoleTail }),
        });
      }
      if (points.length === 0 && !why)
        st.fail(`${basename(r.source)} printed no test points`, { stdoutTail: tail(r.stdout) });
    });
  }
  t.test(`the guest (${shard}) finished and powered off`, async (st) => {
    const problem = r0.timedOut ? `hit its ${limitMs} ms limit and was killed` : 'stopped before the agent finished';
    st.ok(
      r0.done,
      r0.done
        ? `ran ${r0.results.length} file(s) and powered off in ${Math.round(r0.totalMs / 1000)} s`
        : `the guest ${problem}`,
      r0.done ? {} : { consoleTail: r0.consoleTail },
    );
  });
}
