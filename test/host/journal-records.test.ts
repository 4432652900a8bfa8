/**
 * Journal records as this version writes them (test/fixtures/journal/: a record of each hook and of
 * an open, attached or killed half-way, between them holding every step kind) read back whole and
 * are written back as the same JSON. A record with a step whose data is not what its kind's undoer
 * reads is reported as unreadable, exactly like one that is not JSON: status says so, gc leaves it.
 */
import t from 'tap';
import { copyFileSync, mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { cliMain } from '../../src/cli/main.js';
import { defaultConfig } from '../../src/config/config.js';
import type { Runner } from '../../src/devices/runner.js';
import { Journal, type JournalEntry } from '../../src/journal/journal.js';
import { STEP_KINDS } from '../../src/journal/step-data.js';

const FIX = fileURLToPath(new URL('../fixtures/journal/', import.meta.url));
const fixtures = readdirSync(FIX)
  .filter((n) => n.endsWith('.json'))
  .sort();
const fixture = (name: string): JournalEntry => JSON.parse(readFileSync(join(FIX, name), 'utf8')) as JournalEntry;

function journalWith(t: { testdir: (f?: Record<string, never>) => string }, files: Record<string, string>) {
  const dir = t.testdir({});
  mkdirSync(join(dir, 'journal'));
  for (const [name, text] of Object.entries(files)) writeFileSync(join(dir, 'journal', name), text);
  return { dir, journal: new Journal(dir) };
}

t.test('a record of every step kind, as this version writes it, reads back whole', async (t) => {
  const dir = t.testdir({});
  mkdirSync(join(dir, 'journal'));
  for (const n of fixtures) copyFileSync(join(FIX, n), join(dir, 'journal', n));
  const journal = new Journal(dir);
  const { entries, unreadable } = journal.list();
  t.same(unreadable, []);
  t.equal(entries.length, fixtures.length);
  for (const n of fixtures) {
    const want = fixture(n);
    t.equal(journal.file(want.backendPath), join(dir, 'journal', n), `${n} is where its key puts it`);
    t.strictSame(journal.load(want.backendPath), want, `${n} reads back as written`);
  }
  const kinds = new Set(entries.flatMap((e) => e.steps.map((s) => s.kind)));
  t.same(
    STEP_KINDS.filter((k) => !kinds.has(k)),
    [],
    'the fixtures hold every step kind',
  );
  // Saved again (as every step of an add or a remove does), a record is the same JSON but for its time.
  for (const e of entries) journal.save(e);
  for (const n of fixtures) {
    const text = readFileSync(join(dir, 'journal', n), 'utf8');
    const original = readFileSync(join(FIX, n), 'utf8');
    const noTime = (s: string) => s.replace(/"updated": "[^"]*"/, '"updated": ""');
    t.equal(noTime(text), noTime(original), `${n} is written back unchanged`);
  }
});

/** A fixture with one of its steps changed by `edit` (as a hand edit, an older version or a bug could). */
function spoilt(name: string, index: number, edit: (step: Record<string, unknown>) => void): string {
  const e = fixture(name) as unknown as { steps: Record<string, unknown>[] };
  edit(e.steps[index] as Record<string, unknown>);
  return `${JSON.stringify(e, null, 1)}\n`;
}

const data = (s: Record<string, unknown>) => s.data as Record<string, unknown>;

const cases: { what: string; text: string; why: RegExp }[] = [
  {
    what: 'an unknown kind',
    text: spoilt('backend~vbd~1~51712.json', 0, (s) => (s.kind = 'mystery')),
    why: /step 1 has the unknown kind "mystery"$/,
  },
  {
    what: 'a step without a kind',
    text: spoilt('backend~vbd~1~51712.json', 0, (s) => delete s.kind),
    why: /step 1 has no kind$/,
  },
  {
    what: 'a required field missing',
    text: spoilt('backend~vbd~1~51712.json', 3, (s) => delete data(s).name),
    why: /step 4 \("dm"\) has no "name"$/,
  },
  {
    what: 'a required field of the wrong type',
    text: spoilt('backend~vbd~5~51712.json', 2, (s) => (data(s).id = '3')),
    why: /step 3 \("thin"\) has "id" "3", not a number$/,
  },
  {
    what: 'an empty name',
    text: spoilt('backend~vbd~6~51712.json', 0, (s) => (data(s).lv = '')),
    why: /step 1 \("lv-snapshot"\) has "lv" "", not a non-empty string$/,
  },
  {
    what: 'a field learned after the fact, of the wrong type',
    text: spoilt('backend~vbd~1~51712.json', 2, (s) => (data(s).major = '7')),
    why: /step 3 \("loop"\) has "major" "7", not a number, or absent$/,
  },
  {
    what: 'a flag that is not true or false',
    text: spoilt('backend~vbd~3~51712.json', 0, (s) => (data(s).readOnly = 'no')),
    why: /step 1 \("block-loop"\) has "readOnly" "no", not true or false$/,
  },
  {
    what: 'a bad entry in a list',
    text: spoilt('backend~vbd~4~51712.json', 0, (s) => {
      (data(s).claims as Record<string, unknown>[])[1]!.role = 'rw';
    }),
    why: /step 1 \("qcow-use"\) has "claims" \[.*\], not a list of claims/,
  },
  {
    what: 'a nested object missing a field',
    text: spoilt('backend~vbd~7~51712.json', 0, (s) => delete (data(s).parent as Record<string, unknown>).snap),
    why: /step 1 \("rbd-clone"\) has "parent" \{.*\}, not an image/,
  },
  {
    what: 'data that is not an object',
    text: spoilt('open~srv~disk.img.json', 0, (s) => (s.data = ['/var/run/xen-hotplug/block'])),
    why: /step 1 \("xen-block-lock"\) has data that is not an object$/,
  },
  {
    what: 'no done',
    text: spoilt('open~srv~disk.img.json', 2, (s) => delete s.done),
    why: /step 3 \("partitions"\) has no "done"$/,
  },
  {
    what: 'a step that is not an object',
    text: spoilt('backend~vbd~6~51712.json', 0, (s) => {
      for (const k of Object.keys(s)) delete s[k];
    }).replace('{}', 'null'),
    why: /step 1 is not an object$/,
  },
];

t.test('a record whose step data does not validate is unreadable, like one that is not JSON', async (t) => {
  for (const c of cases) {
    const { dir, journal } = journalWith(t, {
      'backend~vbd~9~51712.json': c.text,
      'backend~vbd~3~51712.json': readFileSync(join(FIX, 'backend~vbd~3~51712.json'), 'utf8'),
    });
    const file = join(dir, 'journal', 'backend~vbd~9~51712.json');
    const { entries, unreadable } = journal.list();
    t.same(
      entries.map((e) => e.backendPath),
      ['backend/vbd/3/51712'],
      `${c.what}: the other record still reads`,
    );
    t.equal(unreadable.length, 1, `${c.what}: reported`);
    t.equal(unreadable[0]?.file, file);
    t.match(unreadable[0]?.error, `${file} is not a journal record this version understands: `);
    t.match(unreadable[0]?.error, c.why, c.what);
    t.throws(
      () => journal.load('backend/vbd/9/51712'),
      { message: unreadable[0]?.error ?? '' },
      `${c.what}: load throws`,
    );
  }
});

t.test('status shows a record whose step data does not validate, and gc leaves it alone', async (t) => {
  const text = spoilt('backend~vbd~2~51712.json', 1, (s) => delete data(s).backendPath);
  const { dir } = journalWith(t, { 'backend~vbd~2~51712.json': text });
  const config = { ...defaultConfig(), stateDir: dir, storeDir: join(dir, 'stores'), logFile: '' };
  const answer = async (f: string, a: readonly string[]) => ({
    command: [f, ...a].join(' '),
    exitCode: 0,
    signal: undefined,
    stdout: '',
    stderr: '',
    durationMs: 1,
    failed: false,
    timedOut: false,
  });
  const run: Runner = { run: answer, probe: answer };
  const out: string[] = [];
  const err: string[] = [];
  const deps = {
    config,
    run,
    isRoot: true,
    connect: async () => {
      throw new Error('no xenstore');
    },
    out: (s: string) => out.push(s),
    err: (s: string) => err.push(s),
  };
  const why =
    /unreadable record .*backend~vbd~2~51712\.json: .* is not a journal record this version understands: step 2 \("store-owner"\) has no "backendPath"/;
  t.equal(await cliMain(['status', '--noheadings'], {}, deps), 0);
  t.match(err, [why]);
  out.length = 0;
  err.length = 0;
  t.equal(await cliMain(['status'], {}, deps), 0);
  t.match(out.join('\n'), why);
  out.length = 0;
  t.equal(await cliMain(['gc', '--without-xenstore'], {}, deps), 0);
  t.match(out, ['Nothing to collect.']);
  t.equal(await cliMain(['gc', '--without-xenstore', '--apply'], {}, deps), 0);
  t.equal(readFileSync(join(dir, 'journal', 'backend~vbd~2~51712.json'), 'utf8'), text, 'the record is untouched');
});
