import t from 'tap';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { projectRoot } from '../lib/project-root.js';
// @ts-expect-error scripts/test.mjs is plain JavaScript without types
import { FailureCollector, parseCounts } from '../../scripts/test.mjs';

// Real tap 21 output of a file with a failing assertion two subtests deep and one a level up.
const recorded = readFileSync(join(projectRoot(), 'test/fixtures/tap21-nested-failures.txt'), 'utf8');

t.test('the failing leaves are named by their subtest path, parents not repeated', async (t) => {
  const c = new FailureCollector();
  c.push(recorded);
  c.end();
  t.same(
    c.failures.map((f: { path: string[] }) => f.path.join(' › ')),
    ['test/host/zz-fail.test.ts › outer › inner › one is two', 'test/host/zz-fail.test.ts › outer › plain false'],
  );
  const report = c.report();
  t.match(report, /-2\n\s+\+1/, 'the diff of the failed equal is kept');
  t.notMatch(report, /source:|lineNumber/, 'source and location blocks are left out');
  t.same(parseCounts(recorded), { total: 4, pass: 2, fail: 2 });
});

t.test('output split anywhere, even inside a line, gives the same result', async (t) => {
  const whole = new FailureCollector();
  whole.push(recorded);
  whole.end();
  for (const size of [1, 7, 64]) {
    const c = new FailureCollector();
    for (let i = 0; i < recorded.length; i += size) c.push(recorded.slice(i, i + size));
    c.end();
    t.equal(c.report(), whole.report(), `chunks of ${size}`);
  }
});

t.test('a passing run reports nothing; many failures are cut at the limit', async (t) => {
  const ok = new FailureCollector();
  ok.push('TAP version 14\n# Subtest: a\n    ok 1 - fine\n    1..1\nok 1 - a\n');
  ok.end();
  t.equal(ok.failures.length, 0);
  const many = new FailureCollector();
  for (let i = 1; i <= 30; i++) many.push(`not ok ${i} - case ${i}\n`);
  many.end();
  t.equal(many.failures.length, 30);
  t.match(many.report(5), /case 5\n… and 25 more failures$/);
});
