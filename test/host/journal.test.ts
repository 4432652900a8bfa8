import t from 'tap';
import { existsSync, readdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { defaultConfig } from '../../src/config/config.js';
import {
  Journal,
  journalFileName,
  processAlive,
  recordsHolding,
  stepsHolding,
  type StepRecord,
} from '../../src/journal/journal.js';
import { Build, undoAll, type UndoRegistry } from '../../src/journal/steps.js';
import { memoryLogger } from '../../src/log/logger.js';
import type { Runner } from '../../src/devices/runner.js';

const noRun: Runner = {
  run: async () => {
    throw new Error('no commands expected');
  },
  probe: async () => {
    throw new Error('no commands expected');
  },
};
const disk = { params: '/img/base.img 30', mode: 'w' as const, frontendId: 5, vdev: 'xvda', domainName: 'web' };

function setup(t: { testdir: (f?: Record<string, never>) => string }) {
  const dir = t.testdir({});
  const journal = new Journal(dir);
  const config = { ...defaultConfig(), stateDir: dir };
  return { dir, journal, ctx: { run: noRun, config, log: memoryLogger(), journal, xs: undefined } };
}

t.test('file names are reversible and flat', async (t) => {
  t.equal(journalFileName('backend/vbd/5/51712'), 'backend~vbd~5~51712.json');
  t.equal(journalFileName('/local/domain/0/backend/vbd/5/51712'), 'local~domain~0~backend~vbd~5~51712.json');
});

t.test('each step is written before it runs and marked done after', async (t) => {
  const { journal } = setup(t);
  const entry = Journal.begin('block-cow', 'backend/vbd/5/51712', disk);
  journal.save(entry);
  const b = new Build(entry, journal);
  let seenDuring: unknown;
  const intent = { file: '/img/base.img', dev: '8:1', ino: '12', readOnly: false };
  await b.step(
    'loop',
    intent,
    async () => {
      seenDuring = journal.load('backend/vbd/5/51712')?.steps[0];
      return '/dev/loop7';
    },
    (dev) => ({ loop: dev, major: 7, minor: 7 }),
  );
  t.same(seenDuring, { kind: 'loop', data: intent, done: false }, 'intent recorded before the command');
  t.same(journal.load('backend/vbd/5/51712')?.steps[0], {
    kind: 'loop',
    data: { ...intent, loop: '/dev/loop7', major: 7, minor: 7 },
    done: true,
  });
});

t.test('note adds facts to the running step and saves them at once', async (t) => {
  const { journal } = setup(t);
  const entry = Journal.begin('block-qcow', 'backend/vbd/5/51713', disk);
  const b = new Build(entry, journal);
  const intent = { pidFile: '/run/x.pid', image: '/img/x.qcow2', format: 'qcow2', readOnly: false };
  await b.step('nbd', intent, async (note) => {
    note({ device: '/dev/nbd3' });
    t.same(journal.load('backend/vbd/5/51713')?.steps[0], {
      kind: 'nbd',
      data: { ...intent, device: '/dev/nbd3' },
      done: false,
    });
  });
  t.equal(journal.load('backend/vbd/5/51713')?.steps[0]?.done, true);
});

t.test('a failing step stays recorded, not done', async (t) => {
  const { journal } = setup(t);
  const entry = Journal.begin('block-cow', 'backend/vbd/5/1', disk);
  const b = new Build(entry, journal);
  await t.rejects(
    b.step('dm', { name: 'x', table: '0 8 zero', readOnly: false }, async () => {
      throw new Error('boom');
    }),
    /boom/,
  );
  t.same(journal.load('backend/vbd/5/1')?.steps, [
    { kind: 'dm', data: { name: 'x', table: '0 8 zero', readOnly: false }, done: false },
  ]);
});

t.test('undoAll goes newest first, keeps going past failures, keeps what failed', async (t) => {
  const { journal, ctx } = setup(t);
  const entry = Journal.begin('block-cow', 'backend/vbd/5/2', disk);
  const b = new Build(entry, journal);
  const order: string[] = [];
  await b.step('xen-block-lock', { path: 'a' }, async () => {});
  await b.step('store-owner', { path: 'b', backendPath: 'backend/vbd/5/2' }, async () => {});
  await b.step('dm', { name: 'c', table: '0 8 zero', readOnly: false }, async () => {});
  const registry: UndoRegistry = {
    'xen-block-lock': async (s) => {
      order.push(s.data.path);
    },
    'store-owner': async () => {
      order.push('b');
      throw new Error('b is busy');
    },
    dm: async (s) => {
      order.push(s.data.name);
    },
  };
  const failures = await undoAll(entry, registry, ctx);
  t.same(order, ['c', 'b', 'a']);
  t.same(
    failures.map((f) => f.message),
    ['b is busy'],
  );
  const left = journal.load('backend/vbd/5/2');
  t.equal(left?.phase, 'failed');
  t.same(
    left?.steps.map((s) => s.kind),
    ['store-owner'],
    'only the step that failed remains for gc',
  );
  registry['store-owner'] = async () => {
    order.push('b again');
  };
  t.same(await undoAll(left!, registry, ctx), []);
  t.equal(journal.load('backend/vbd/5/2'), undefined, 'record deleted when everything is undone');
});

t.test('a step kind its hook has no undoer for is a failure, not silently skipped', async (t) => {
  const { journal, ctx } = setup(t);
  const entry = Journal.begin('block-cow', 'backend/vbd/5/3', disk);
  await new Build(entry, journal).step('xen-block-lock', { path: '/run/lock' }, async () => 0);
  const failures = await undoAll(entry, {}, ctx);
  t.match(failures[0]?.message, /no undo known for step "xen-block-lock" recorded by block-cow/);
});

t.test('list reports unreadable records instead of hiding them', async (t) => {
  const { journal, dir } = setup(t);
  journal.save(Journal.begin('block-cow', 'backend/vbd/1/1', disk));
  writeFileSync(join(dir, 'journal', 'backend~vbd~1~2.json'), '{ not json');
  const { entries, unreadable } = journal.list();
  t.equal(entries.length, 1);
  t.equal(unreadable.length, 1);
  t.ok(existsSync(join(dir, 'journal')));
  t.notOk(
    readdirSync(join(dir, 'journal')).some((n) => n.endsWith('.tmp')),
    'no temporary files left',
  );
});

t.test('processAlive', async (t) => {
  t.equal(processAlive(process.pid), true);
  t.equal(processAlive(2 ** 22 + 12345), false);
});

t.test('stepsHolding / recordsHolding: who else holds a step of a kind with these values', async (t) => {
  const rec = (backendPath: string, steps: StepRecord[]) => ({
    ...Journal.begin('block-cow', backendPath, {
      params: 'x',
      mode: 'w',
      frontendId: 1,
      vdev: 'xvda',
      domainName: 'a',
    }),
    steps,
  });
  const loop = (ino: string, name?: string): StepRecord => ({
    kind: 'loop',
    data: { file: '/s/x.cow', dev: '7:1', ino, readOnly: false, ...(name ? { loop: name } : {}) },
    done: true,
  });
  const a = rec('backend/vbd/1/51712', [
    loop('12', '/dev/loop3'),
    { kind: 'dm', data: { name: 'x', table: '0 8 zero', readOnly: false }, done: true },
  ]);
  const b = rec('backend/vbd/2/51712', [loop('12', '/dev/loop4'), loop('12', '/dev/loop5')]);
  const c = rec('backend/vbd/3/51712', [loop('99')]);
  const all = [a, b, c];
  t.same(
    stepsHolding(all, 'loop', { dev: '7:1', ino: '12' }).map((h) => h.step.data.loop),
    ['/dev/loop3', '/dev/loop4', '/dev/loop5'],
    'every matching step, in order',
  );
  t.same(
    stepsHolding(all, 'loop', { dev: '7:1', ino: '12' }, a.backendPath).map((h) => h.entry.backendPath),
    [b.backendPath, b.backendPath],
    'the asking record left out',
  );
  t.same(
    recordsHolding(all, 'loop', { dev: '7:1', ino: '12' }).map((e) => e.backendPath),
    [a.backendPath, b.backendPath],
    'each record once',
  );
  t.same(recordsHolding(all, 'loop').length, 3, 'no values: every record with the kind');
  t.same(recordsHolding(all, 'dm', { name: 'y' }), [], 'a value that differs matches nothing');
  // A number where the record has a string (as a hand edit could give): no match.
  t.same(recordsHolding(all, 'loop', { ino: 12 } as never), [], 'values compare strictly: 12 is not "12"');
});
