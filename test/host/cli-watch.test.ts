import t from 'tap';
import { spawn } from 'node:child_process';
import { mkdirSync, unlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { defaultConfig } from '../../src/config/config.js';
import { cliMain } from '../../src/cli/main.js';
import { execRunner } from '../../src/devices/exec.js';
import { Journal } from '../../src/journal/journal.js';
import { memoryLogger } from '../../src/log/logger.js';

function deps(stateDir: string) {
  const out: string[] = [];
  const err: string[] = [];
  const config = { ...defaultConfig(), stateDir, storeDir: join(stateDir, 'stores'), logFile: '' };
  return {
    out,
    err,
    d: {
      out: (s: string) => out.push(s),
      err: (s: string) => err.push(s),
      config,
      run: execRunner(),
      logger: memoryLogger(),
    },
  };
}

t.test('watch --once over an empty journal: nothing to do, exit 0', async (t) => {
  const { out, d } = deps(t.testdir({}));
  t.equal(await cliMain(['watch', '--once'], {}, d), 0);
  t.match(out.join('\n'), /checked 0 disks, grew 0, 0 problems/);
});

t.test('watch --once reports an unreadable record as a problem: exit 1', async (t) => {
  const dir = t.testdir({ journal: { 'backend~vbd~3~51712.json': '{ broken' } });
  const { err, d } = deps(dir);
  t.equal(await cliMain(['watch', '--once'], {}, d), 1);
  t.match(err.join('\n'), /ERROR: .*cannot be read/);
  t.ok(new Journal(dir).list().unreadable.length, 'the record is left for a person to look at');
});

t.test('the running watch reports a problem once, not on every pass, and forgets a record that went', async (t) => {
  const dir = t.testdir({ journal: { 'backend~vbd~3~51712.json': '{ broken' } });
  const { err, d } = deps(dir);
  let stop!: () => void;
  const stopSignal = new Promise<void>((res) => {
    stop = res;
  });
  const running = cliMain(['watch', '--interval', '100'], {}, { ...d, stopSignal });
  const passes = () => d.logger.lines.filter((l) => /watch: started/.test(l.msg)).length;
  for (let i = 0; i < 200 && passes() === 0; i++) await new Promise((r) => setTimeout(r, 25));
  await new Promise((r) => setTimeout(r, 600)); // several passes
  t.equal(err.filter((l) => /^ERROR: .*cannot be read/.test(l)).length, 1, 'stderr: once');
  t.equal(d.logger.lines.filter((l) => l.level === 'error').length, 1, 'the log: once');
  unlinkSync(join(dir, 'journal', 'backend~vbd~3~51712.json'));
  await new Promise((r) => setTimeout(r, 300));
  mkdirSync(join(dir, 'journal'), { recursive: true });
  writeFileSync(join(dir, 'journal', 'backend~vbd~3~51712.json'), '{ broken again');
  const reported = () => err.filter((l) => /^ERROR: .*cannot be read/.test(l)).length;
  for (let i = 0; i < 200 && reported() < 2; i++) await new Promise((r) => setTimeout(r, 25));
  stop();
  t.equal(await running, 0);
  t.equal(reported(), 2, 'gone, then back broken: reported again');
});

t.test('a second watcher exits at once, naming the first', async (t) => {
  const dir = t.testdir({});
  const { err, d } = deps(dir);
  let stop!: () => void;
  const stopSignal = new Promise<void>((res) => {
    stop = res;
  });
  const first = cliMain(['watch', '--interval', '100'], {}, { ...d, stopSignal });
  // Wait until the first one holds its lock (it logs its start in the memory logger).
  for (let i = 0; i < 200 && !d.logger.lines.some((l) => /watch: started/.test(l.msg)); i++)
    await new Promise((r) => setTimeout(r, 25));
  const second = deps(dir);
  t.equal(await cliMain(['watch', '--once'], {}, second.d), 1, 'the second one fails');
  t.match(second.err.join('\n'), /already running|held by/i);
  stop();
  t.equal(await first, 0, 'the first stops cleanly on its signal');
  t.same(err, []);
});

t.test('bad usage', async (t) => {
  const { err, d } = deps(t.testdir({}));
  t.equal(await cliMain(['watch', '--interval', '5'], {}, d), 2);
  t.equal(await cliMain(['watch', 'extra'], {}, d), 2);
  t.match(err.join('\n'), /at least 100 ms/);
});

t.test('the bundled CLI has the command (the installer ships the unit only then)', async (t) => {
  const bundle = join(import.meta.dirname, '..', '..', 'dist', 'xen-blockhooks.mjs');
  const code = await new Promise<number | null>((res) => {
    const c = spawn(process.execPath, [bundle, 'watch', '--help'], { stdio: 'ignore' });
    c.on('exit', (code) => res(code));
  });
  t.equal(code, 0);
});
