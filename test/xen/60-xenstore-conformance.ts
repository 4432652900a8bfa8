/**
 * Our xenstore client against the REAL xenstored of dom0 (C xenstored 4.17), through its unix
 * socket and through the kernel's /dev/xen/xenbus device: the same conformance cases the host
 * tier runs against our in-process server. Bundled for node18 by scripts/xen/run.mjs and run
 * with Debian's node in dom0; prints `ok - …` / `not ok - …` lines and sets the exit code.
 */
import { connectXenstore } from '../../src/xenstore/client.js';
import { xenstoreConformance } from '../lib/xenstore-conformance.js';

const via: Array<[string, string]> = [
  ['socket', '/var/run/xenstored/socket'],
  ['xenbus device', '/dev/xen/xenbus'],
];

async function main(): Promise<number> {
  let failed = 0;
  for (const [label, path] of via) {
    const cases = xenstoreConformance(() => connectXenstore({ path, timeoutMs: 60_000 }), {
      base: `/xbh-conformance-${label.replace(/\W/g, '')}`,
    });
    for (const c of cases) {
      const t0 = Date.now();
      try {
        await c.run();
        console.log(`ok - real xenstored via ${label}: ${c.name}`);
      } catch (e) {
        failed++;
        console.log(`not ok - real xenstored via ${label}: ${c.name}`);
        for (const line of String((e as Error)?.stack ?? e)
          .split('\n')
          .slice(0, 12))
          console.log(`#   ${line}`);
      }
      console.log(`# (${Date.now() - t0} ms)`);
    }
  }
  return failed ? 1 : 0;
}

process.exitCode = await main();
