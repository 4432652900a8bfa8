// npm test: runs tap (all host tests, the guest tier included via test/host/guest-*.test.ts),
// streams its output, passes its exit code through and ends with one plain summary line, preceded
// by a list of what failed (file › subtest › assertion, and the start of its diagnostics), so the
// last screen of a long run says which tests to look at.
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

/**
 * Follows tap's nested output line by line and keeps each failing leaf: the path of subtest names
 * down to it and the first lines of its YAML diagnostics. A parent's own `not ok` (which only says
 * that a child failed) is not kept twice.
 */
export class FailureCollector {
  constructor(diagLines = 16) {
    this.diagLines = diagLines;
    this.stack = [];
    this.failures = [];
    this.partial = '';
    this.diag = undefined;
    this.expectDiag = undefined;
  }

  push(chunk) {
    const lines = (this.partial + chunk).split('\n');
    this.partial = lines.pop() ?? '';
    for (const line of lines) this.line(line);
  }

  end() {
    if (this.partial) this.line(this.partial);
    this.partial = '';
  }

  line(line) {
    if (this.expectDiag) {
      const diag = this.expectDiag;
      this.expectDiag = undefined;
      if (/^\s*---\s*$/.test(line)) {
        this.diag = diag;
        return;
      }
    }
    if (this.diag) {
      if (/^\s*\.\.\.\s*$/.test(line)) {
        this.diag = undefined;
      } else {
        this.diag.push(line);
      }
      return;
    }
    const indent = line.length - line.trimStart().length;
    const level = Math.floor(indent / 4);
    const sub = /^\s*# Subtest: (.*)$/.exec(line);
    if (sub) {
      this.stack.length = level;
      this.stack[level] = sub[1];
      return;
    }
    const bad = /^\s*not ok \d+ - (.*?)(?: # time=[\d.]+m?s)?$/.exec(line);
    if (bad) {
      const path = [...this.stack.slice(0, level), bad[1]];
      const last = this.failures.at(-1);
      const parentOfLast = last && last.path.length > path.length && path.every((p, i) => last.path[i] === p);
      if (parentOfLast) return;
      const failure = { path, diag: [] };
      this.failures.push(failure);
      this.expectDiag = failure.diag;
      return;
    }
  }

  /** The telling part of a YAML diagnostic: no `at:` or `source:` block, two stack lines. */
  brief(diag) {
    const base = Math.min(...diag.filter((l) => l.trim()).map((l) => l.length - l.trimStart().length));
    const out = [];
    let key = '';
    let inKey = 0;
    for (const l of diag) {
      const depth = l.length - l.trimStart().length - base;
      if (depth === 0) {
        key = l.trim().split(':')[0];
        inKey = 0;
      } else {
        inKey += 1;
      }
      if (key === 'at' || key === 'source') continue;
      if (key === 'stack' && inKey > 2) continue;
      out.push(l.slice(base));
    }
    return out.slice(0, this.diagLines);
  }

  report(limit = 20) {
    const out = [];
    for (const f of this.failures.slice(0, limit)) {
      out.push(`not ok: ${f.path.join(' › ')}`);
      for (const d of this.brief(f.diag)) out.push(`    ${d}`);
    }
    if (this.failures.length > limit) out.push(`… and ${this.failures.length - limit} more failures`);
    return out.join('\n');
  }
}

function main(args) {
  return new Promise((resolve) => {
    const child = spawn(tap, args, { cwd: root, stdio: ['inherit', 'pipe', 'inherit'] });
    let tail = '';
    const failures = new FailureCollector();
    child.stdout.setEncoding('utf8');
    child.stdout.on('data', (d) => {
      process.stdout.write(d);
      tail = (tail + d).slice(-4096);
      failures.push(d);
    });
    child.on('error', (e) => {
      console.error(`cannot run ${tap}: ${e.message} (run npm install)`);
      resolve(1);
    });
    child.on('close', (code, signal) => {
      failures.end();
      if (failures.failures.length > 0) console.log(`\nwhat failed:\n${failures.report()}\n`);
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
