/**
 * The real-Xen tier in the host run: boots Debian's Xen 4.17 with a PV dom0 under QEMU once,
 * runs every scenario of test/xen/ there with real xl, xenstored and blkback, and mirrors each
 * scenario's `ok` / `not ok` lines as assertions here. On any failure the serial console tail
 * and dom0's Xen logs (xl, hotplug, domU consoles) are attached. A tier that cannot be built or
 * booted is a failure, never a skip.
 */
import t from 'tap';
import { basename } from 'node:path';
import { listScenarios, runXenTier, describeFailure, formatLogs, type XenRun } from '../../scripts/xen/run.mjs';

const BOOT_LIMIT_MS = 2_100_000;
t.setTimeout(BOOT_LIMIT_MS + 60_000);

interface Point {
  ok: boolean;
  name: string;
  skip?: string;
  diag: string[];
}

/** `ok - NAME`, `not ok - NAME`, `ok - NAME # SKIP WHY`, with the `#   ` lines after a point as its detail. */
function points(stdout: string): Point[] {
  const out: Point[] = [];
  for (const line of stdout.split('\n')) {
    const m = /^(not ok|ok) - (.*)$/.exec(line);
    if (m) {
      const [name, skip] = (m[2] ?? '').split(/ # SKIP /);
      out.push({ ok: m[1] === 'ok', name: name ?? '', ...(skip !== undefined ? { skip } : {}), diag: [] });
    } else if (line.startsWith('#   ') && out.length) out.at(-1)?.diag.push(line.slice(4));
  }
  return out;
}

function tail(text: string, lines = 40): string {
  return text.trimEnd().split('\n').slice(-lines).join('\n');
}

// XBH_XEN_SCENARIOS=00,40 runs only the scenarios whose file names contain one of the words.
const only = (process.env['XBH_XEN_SCENARIOS'] ?? '')
  .split(',')
  .map((w) => w.trim())
  .filter(Boolean);
const scenarios = listScenarios().filter((f) => !only.length || only.some((w) => basename(f).includes(w)));

let run: XenRun | undefined;
try {
  run = await runXenTier({ scenarios, timeoutMs: BOOT_LIMIT_MS });
} catch (e) {
  t.fail(`the Xen tier could not run: ${(e as Error).message}`);
}

if (run) {
  const r0 = run;
  const logs = () => formatLogs(r0.logs);
  t.comment(`Xen tier: dom0 ready after ${r0.bootMs ?? '?'} ms, whole run ${r0.totalMs} ms, host load ${r0.hostLoad}`);
  for (const r of r0.results) {
    t.test(`xen: ${r.name}`, async (st) => {
      st.comment(`${r.name}: ${r.durationMs ?? '?'} ms in dom0`);
      const ps = points(r.stdout);
      for (const p of ps) {
        if (p.skip !== undefined) st.pass(p.name, { skip: p.skip || true });
        else if (p.ok) st.pass(p.name);
        else st.fail(p.name, { detail: p.diag.join('\n'), consoleTail: tail(r0.consoleTail), logs: logs() });
      }
      const why = describeFailure(r, r0);
      if (why) {
        st.fail(`${r.name}: ${why.split('\n')[0]}`, {
          problem: why,
          stdoutTail: tail(r.stdout),
          stderrTail: tail(r.stderr),
          consoleTail: tail(r0.consoleTail),
          logs: logs(),
        });
      }
      if (ps.length === 0 && !why)
        st.fail(`${r.name} printed no assertions`, { stdoutTail: tail(r.stdout), stderrTail: tail(r.stderr) });
    });
  }
  t.test('dom0 came up and ran every scenario', async (st) => {
    st.notOk(
      r0.setupError,
      r0.setupError ? `dom0 setup failed: ${r0.setupError}` : 'dom0 setup (xenstored, xen-init-dom0, xenconsoled)',
      {
        consoleTail: tail(r0.consoleTail, 80),
        logs: logs(),
      },
    );
    const problem = r0.timedOut
      ? `hit its ${BOOT_LIMIT_MS} ms limit and QEMU was killed`
      : 'stopped before the end marker';
    st.ok(
      r0.done,
      r0.done ? 'dom0 ran every scenario' : `the boot ${problem}`,
      r0.done ? {} : { consoleTail: tail(r0.consoleTail, 80), logs: logs() },
    );
    st.ok(r0.results.length > 0, `${r0.results.length} scenarios in test/xen/`);
  });
}
