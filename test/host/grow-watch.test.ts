/**
 * watchOnce and growStore over a real journal and a real store file, with a recorded runner that
 * answers `dmsetup status` with the guest kernel's own captured lines: a snapshot past the
 * threshold is grown (file enlarged, `losetup --set-capacity` on its loop, action logged); an
 * Invalid one is reported at error level and left alone; an unknown script is refused. With a
 * memory (the long-running watch), a problem is logged once and a recovery once.
 */
import t from 'tap';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, truncateSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { defaultConfig, type Config } from '../../src/config/config.js';
import { execRunner } from '../../src/devices/exec.js';
import type { RunOptions, RunResult, Runner } from '../../src/devices/runner.js';
import { decodeDev } from '../../src/devices/sysfs.js';
import { growStore, watchOnce, WatchMemory } from '../../src/grow/index.js';
import { Journal } from '../../src/journal/journal.js';
import { memoryLogger } from '../../src/log/logger.js';

const FIX = fileURLToPath(new URL('../fixtures/', import.meta.url));
const MiB = 1048576;

function ok(file: string, args: readonly string[], stdout: string): RunResult {
  return {
    command: [file, ...args].join(' '),
    exitCode: 0,
    signal: undefined,
    stdout,
    stderr: '',
    durationMs: 1,
    failed: false,
    timedOut: false,
  };
}

/** Answers dmsetup status and losetup --list from `answers`; runs flock for real; records everything. */
function recorder(answers: { status: string; loops: string }): Runner & { calls: string[] } {
  const calls: string[] = [];
  const real = execRunner();
  const answer = (file: string, args: readonly string[]): RunResult => {
    if (file === 'dmsetup' && args[0] === 'status') return ok(file, args, answers.status);
    if (file === 'losetup' && args[0] === '--list') return ok(file, args, answers.loops);
    if (file === 'losetup' && args[0] === '--set-capacity') return ok(file, args, '');
    throw new Error(`unexpected command ${file} ${args.join(' ')}`);
  };
  return {
    calls,
    async run(file: string, args: readonly string[], o?: RunOptions) {
      if (file === 'flock') return real.run(file, args, o);
      calls.push([file, ...args].join(' '));
      return answer(file, args);
    },
    async probe(file: string, args: readonly string[], o?: RunOptions) {
      if (file === 'flock') return real.probe(file, args, o);
      calls.push([file, ...args].join(' '));
      return answer(file, args);
    },
  };
}

function setup(t: { teardown: (f: () => void) => void }): {
  config: Config;
  journal: Journal;
  store: string;
  loops: string;
} {
  const dir = mkdtempSync(join(tmpdir(), 'grow-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const config = {
    ...defaultConfig(),
    stateDir: join(dir, 'state'),
    storeDir: join(dir, 'store'),
    logFile: '',
    watch: { thresholdPercent: 20, stepPercent: 50, intervalMs: 1000 },
  };
  mkdirSync(config.storeDir, { recursive: true });
  const store = join(config.storeDir, 'transient-1-51712.cow');
  writeFileSync(store, '');
  truncateSync(store, 4 * MiB);
  const st = statSync(store, { bigint: true });
  const d = decodeDev(st.dev);
  const loops = JSON.stringify({
    loopdevices: [
      {
        name: '/dev/loop7',
        'back-file': store,
        'back-ino': Number(st.ino),
        'back-maj:min': `${d.major}:${d.minor}`,
        'maj:min': '7:7',
        ro: false,
        sizelimit: 0,
        offset: 0,
        autoclear: false,
        dio: false,
      },
    ],
  });
  const journal = new Journal(config.stateDir);
  const entry = Journal.begin('block-cow', 'backend/vbd/1/51712', {
    params: '/srv/xen/base.img 4',
    mode: 'w',
    frontendId: 1,
    vdev: 'xvda',
    domainName: 'alpha',
  });
  entry.phase = 'ready';
  entry.device = { path: '/dev/dm-3', major: 254, minor: 3 };
  entry.steps.push(
    {
      kind: 'base-ref',
      data: { key: '1:2:3', file: '/srv/xen/base.img', dev: '1:2', ino: '3', counted: true, loop: '/dev/loop6' },
      done: true,
    },
    { kind: 'store-file', data: { path: store, persistent: false }, done: true },
    {
      kind: 'loop',
      data: {
        file: store,
        dev: `${d.major}:${d.minor}`,
        ino: st.ino.toString(),
        readOnly: false,
        loop: '/dev/loop7',
        major: 7,
        minor: 7,
      },
      done: true,
    },
    {
      kind: 'dm',
      data: { name: 'xbh-cow-alpha-xvda-51712', table: '0 8192 snapshot 7:6 7:7 N 8', readOnly: false },
      done: true,
    },
  );
  journal.save(entry);
  return { config, journal, store, loops };
}

t.test('a snapshot past the threshold is grown by the step, online, and logged', async (t) => {
  const { config, store, loops } = setup(t);
  const run = recorder({
    status: readFileSync(join(FIX, 'dmsetup-1.02.185-k6.1-status-snapshot-used.txt'), 'utf8'),
    loops,
  });
  const log = memoryLogger();
  const r = await watchOnce(config, run, log);
  t.equal(r.checked, 1);
  t.same(r.problems, []);
  t.equal(r.grown.length, 1);
  t.match(r.grown[0], { kind: 'cow-store', target: store, beforeBytes: 4 * MiB, afterBytes: 6 * MiB });
  t.equal(statSync(store).size, 6 * MiB, 'the file really grew');
  t.ok(run.calls.includes('losetup --set-capacity /dev/loop7'), run.calls.join('\n'));
  t.ok(
    log.lines.some(
      (l) =>
        l.level === 'info' &&
        /grow backend\/vbd\/1\/51712 \(alpha\/xvda\): store .* 4 MiB → 6 MiB, \/dev\/loop7 re-read/.test(l.msg),
    ),
  );
  t.equal(r.findings[0]?.usedPercent, 25.78);
});

t.test('below the threshold nothing changes', async (t) => {
  const { config, store, loops } = setup(t);
  const run = recorder({
    status: readFileSync(join(FIX, 'dmsetup-1.02.185-k6.1-status-snapshot-fresh.txt'), 'utf8'),
    loops,
  });
  const r = await watchOnce(config, run, memoryLogger());
  t.same(r.grown, []);
  t.equal(r.findings[0]?.state, 'ok');
  t.equal(statSync(store).size, 4 * MiB);
});

t.test('an Invalid snapshot is reported loudly and never grown', async (t) => {
  const { config, store, loops, journal } = setup(t);
  const run = recorder({
    status: readFileSync(join(FIX, 'dmsetup-1.02.185-k6.1-status-snapshot-invalid.txt'), 'utf8'),
    loops,
  });
  const log = memoryLogger();
  const r = await watchOnce(config, run, log);
  t.same(r.grown, []);
  t.equal(r.problems.length, 1);
  t.match(r.problems[0], { state: 'invalid', device: 'xbh-cow-alpha-xvda-51712', backendPath: 'backend/vbd/1/51712' });
  t.match(r.problems[0]?.message, /is Invalid: .* overflowed .* Remove and add the disk again/);
  t.ok(log.lines.some((l) => l.level === 'error' && /Invalid/.test(l.msg)));
  t.equal(statSync(store).size, 4 * MiB, 'nothing grown');
  const entry = journal.load('backend/vbd/1/51712')!;
  await t.rejects(
    growStore(entry, { relative: true, bytes: MiB }, { config, run, log }),
    /Invalid: .* growing cannot bring it back/,
  );
  t.equal(statSync(store).size, 4 * MiB);
});

t.test('growStore refuses what it cannot grow', async (t) => {
  const { config, loops, journal } = setup(t);
  const run = recorder({
    status: readFileSync(join(FIX, 'dmsetup-1.02.185-k6.1-status-snapshot-used.txt'), 'utf8'),
    loops,
  });
  const entry = journal.load('backend/vbd/1/51712')!;
  await t.rejects(
    growStore({ ...entry, script: 'block' }, undefined, { config, run, log: memoryLogger() }),
    /not supported for block/,
  );
  await t.rejects(
    growStore({ ...entry, phase: 'adding' }, undefined, { config, run, log: memoryLogger() }),
    /adding, not ready/,
  );
  await t.rejects(
    growStore(entry, { relative: false, bytes: 2 * MiB }, { config, run, log: memoryLogger() }),
    /not larger \(stores never shrink\)/,
  );
  const g = await growStore(entry, { relative: false, bytes: 10 * MiB }, { config, run, log: memoryLogger() });
  t.equal(g.afterBytes, 10 * MiB);
});

t.test('with a memory a problem is logged once, again only on a change, and a recovery once', async (t) => {
  const { config, loops } = setup(t);
  const status = (n: string) => readFileSync(join(FIX, `dmsetup-1.02.185-k6.1-status-snapshot-${n}.txt`), 'utf8');
  const answers = { status: status('invalid'), loops };
  const run = recorder(answers);
  const log = memoryLogger();
  const memory = new WatchMemory();
  const errors = () => log.lines.filter((l) => l.level === 'error').map((l) => l.msg);
  const pass = () => watchOnce(config, run, log, { memory });

  const first = await pass();
  t.equal(first.news.length, 1, 'the first pass reports the Invalid snapshot');
  t.equal(errors().length, 1);
  for (let i = 0; i < 3; i++) {
    const again = await pass();
    t.equal(again.problems.length, 1, 'it is still a problem');
    t.same(again.news, [], 'but not news');
  }
  t.equal(errors().length, 1, 'logged once over four passes');

  answers.status = status('overflow');
  const changed = await pass();
  t.equal(changed.news.length, 0, 'Overflow is the same finding state (invalid) as Invalid: not news');

  answers.status = status('fresh');
  const back = await pass();
  t.equal(back.recovered.length, 1, 'a recovery is reported');
  t.match(back.recovered[0], { was: 'invalid', finding: { state: 'ok', backendPath: 'backend/vbd/1/51712' } });
  t.equal(
    log.lines.filter(
      (l) =>
        l.level === 'info' &&
        /xbh-cow-alpha-xvda-51712 \(backend\/vbd\/1\/51712\) recovered \(was invalid\)/.test(l.msg),
    ).length,
    1,
  );
  const still = await pass();
  t.same(still.recovered, [], 'and only once');

  answers.status = status('invalid');
  t.equal((await pass()).news.length, 1, 'broken again: reported again');
  t.equal(errors().length, 2);

  const plain = memoryLogger();
  await watchOnce(config, run, plain);
  await watchOnce(config, run, plain);
  t.equal(plain.lines.filter((l) => l.level === 'error').length, 2, 'without a memory (--once) every pass reports');
});
