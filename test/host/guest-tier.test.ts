/**
 * Folds the guest tier into the host run: boots the QEMU guest once, runs every
 * test/guest/*.test.ts there, and mirrors each guest test point as one assertion here, so a
 * failing assertion inside the guest fails `npm test` with its name and diagnostics.
 * A guest that cannot be built or booted is a failure, never a skip.
 */
import t from 'tap';
import { basename } from 'node:path';
import { describeJobFailure } from '../../scripts/vm/run-guest.mjs';
import { runGuestTests, type GuestTestRun } from '../../scripts/vm/run-guest-tests.mjs';
import { assertionPoints, errorSummary } from '../../scripts/vm/tap.mjs';

/** Hard limit for the one boot that runs every guest file (QEMU is killed after it). */
const GUEST_LIMIT_MS = Number(process.env.XEN_BLOCKHOOKS_GUEST_TIMEOUT_S ?? 540) * 1000;
t.setTimeout(GUEST_LIMIT_MS + 60_000);

function tail(text: string, lines = 40): string {
  return text.trimEnd().split('\n').slice(-lines).join('\n');
}

let run: GuestTestRun | undefined;
try {
  run = await runGuestTests({ timeoutMs: GUEST_LIMIT_MS });
} catch (e) {
  t.fail(`the guest tier could not run: ${(e as Error).message}`);
}

if (run) {
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
          problem: why, stdoutTail: tail(r.stdout), stderrTail: tail(r.stderr),
          ...(r.finished ? {} : { consoleTail: r0.consoleTail }),
        });
      }
      if (points.length === 0 && !why) st.fail(`${basename(r.source)} printed no test points`, { stdoutTail: tail(r.stdout) });
    });
  }
  t.test('the guest finished and powered off', async (st) => {
    const problem = r0.timedOut ? `hit its ${GUEST_LIMIT_MS} ms limit and was killed` : 'stopped before the agent finished';
    st.ok(r0.done, r0.done ? 'the guest ran every file and powered off' : `the guest ${problem}`, r0.done ? {} : { consoleTail: r0.consoleTail });
  });
}
