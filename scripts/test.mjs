// npm test: runs tap (all host tests, the guest tier included via test/host/guest-*.test.ts),
// streams its output, passes its exit code through and ends with one plain summary line.
import { spawn } from 'node:child_process';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const tap = join(root, 'node_modules', '.bin', 'tap');

/** `# { total: 9, pass: 7, fail: 1, skip: 1 }` → its numbers (tap's final count line). */
export function parseCounts(text) {
  const lines = text.split('\n').filter((l) => /^# \{ total: \d+/.test(l));
  const last = lines.at(-1);
  if (!last) return undefined;
  const counts = {};
  for (const m of last.matchAll(/(\w+): (\d+)/g)) counts[m[1]] = Number(m[2]);
  return counts;
}

function main(args) {
  return new Promise((resolve) => {
    const child = spawn(tap, args, { cwd: root, stdio: ['inherit', 'pipe', 'inherit'] });
    let tail = '';
    child.stdout.on('data', (d) => {
      process.stdout.write(d);
      tail = (tail + d.toString()).slice(-4096);
    });
    child.on('error', (e) => {
      console.error(`cannot run ${tap}: ${e.message} (run npm install)`);
      resolve(1);
    });
    child.on('close', (code, signal) => {
      const c = parseCounts(tail);
      if (c) {
        const skipped = c.skip ? `, ${c.skip} skipped` : '';
        console.log(`${c.pass ?? 0} passed, ${c.fail ?? 0} failed${skipped}`);
      } else {
        console.log(`tap printed no totals (exit ${code ?? signal})`);
      }
      resolve(code ?? 1);
    });
  });
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  process.exitCode = await main(process.argv.slice(2));
}
