/**
 * Hostile and broken input against the drop-in `block`, run as libxl runs it (the bundle as a
 * child process, real loop devices on this machine): every case must end with exit 1,
 * hotplug-status error|busy, a hotplug-error sentence, no loop device over anything, no journal
 * record, the images unchanged, no file created outside the state folder, and nothing written to
 * xenstore but hotplug-status/-error. Rows go to RELIABILITY.md (`npm run reliability`).
 */
import t, { type Test } from 'tap';
import { execFileSync } from 'node:child_process';
import { chmodSync, readdirSync, statSync, symlinkSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { harness, loops, type BlockHarness } from '../lib/block-harness.js';
import { checked, sha256, snapshotTree, treeChanges } from '../lib/fault-lib.js';

t.setTimeout(300_000);

const HOOK = 'block';

interface Case {
  name: string;
  /** params, or a function making it (may create files under h.dir). */
  params: string | ((h: BlockHarness) => string);
  mode?: 'r' | 'w';
  re: RegExp;
  status?: 'error' | 'busy';
}

function ls(p: string): string[] {
  try {
    return readdirSync(p);
  } catch {
    return [];
  }
}

async function refused(t: Test, h: BlockHarness, c: Case, domid: number): Promise<void> {
  const params = typeof c.params === 'string' ? c.params : c.params(h);
  const img = join(h.dir, 'img', 'golden.img');
  const sum = sha256(img);
  const mtime = statSync(img).mtimeMs;
  // Other test files attach loops over their own images in the temporary folder while this one
  // runs (tap runs two files at once): those are not this case's. Any other new loop is, unless
  // it goes again within a few seconds (a loop of another file seen half set up or half torn
  // down, without its backing file); a loop the hook leaked stays.
  const theirs = (f: string) => f.startsWith(`${tmpdir()}/`) && !f.startsWith(`${h.dir}/`);
  const ours = () =>
    loops()
      .filter((l) => !theirs(l.backFile))
      .map((l) => `${l.name} ${l.backFile}`)
      .sort();
  const loopsBefore = ours();
  const newLoops = async (): Promise<string[]> => {
    let added = ours().filter((l) => !loopsBefore.includes(l));
    for (let i = 0; i < 20 && added.length > 0; i++) {
      await new Promise((r) => setTimeout(r, 150));
      added = ours().filter((l) => !loopsBefore.includes(l));
    }
    return added;
  };
  const be = await h.disk({ domid, devid: 51712, params, mode: c.mode ?? 'w' });
  const storeBefore = new Map(h.store.server.store.dump('/'));
  const tree = snapshotTree(h.dir);
  const r = await h.run('add', be);
  const f0 = t.counts.fail;
  await checked(
    HOOK,
    `hostile input: ${c.name}`,
    `exit 1, hotplug-status=${c.status ?? 'error'}, readable hotplug-error, no loop device, no record, images unchanged, no file outside the state folder`,
    async () => {
      t.equal(r.code, 1, `${c.name}: exit 1 (${r.stderr.trim()})`);
      t.equal(await h.read(`${be}/hotplug-status`), c.status ?? 'error', `${c.name}: hotplug-status`);
      const msg = (await h.read(`${be}/hotplug-error`)) ?? '';
      t.ok(msg.length >= 20, `${c.name}: hotplug-error is a sentence (${JSON.stringify(msg)})`);
      t.notMatch(
        msg,
        /\n\s+at |\[object |undefined|failed unexpectedly|TypeError|ERR_[A-Z_]+/,
        `${c.name}: no stack, no catch-all`,
      );
      t.match(msg, c.re, `${c.name}: says why`);
      t.equal(await h.read(`${be}/physical-device`), undefined, `${c.name}: no physical-device`);
      t.same(await newLoops(), [], `${c.name}: no loop device attached`);
      t.same(ls(join(h.stateDir, 'journal')), [], `${c.name}: no journal record`);
      t.equal(sha256(img), sum, `${c.name}: image checksum unchanged`);
      t.equal(statSync(img).mtimeMs, mtime, `${c.name}: image mtime unchanged`);
      const log = join(h.dir, 'hotplug.log');
      t.same(
        treeChanges(tree, snapshotTree(h.dir), [h.stateDir, h.xenLockDir]).filter(
          (l) => l !== `changed ${log}` && l !== `created ${log} (file)`,
        ),
        [],
        `${c.name}: no file created or changed outside the state folder (the log aside)`,
      );
      const abs = `/local/domain/0/${be}`;
      const written = h.store.server.store
        .dump('/')
        .filter(([p, v]) => storeBefore.get(p) !== v)
        .map(([p]) => p);
      t.same(
        written.filter((p) => p !== `${abs}/hotplug-status` && p !== `${abs}/hotplug-error`),
        [],
        `${c.name}: only hotplug-status/-error written`,
      );
      if (t.counts.fail > f0) throw new Error(`${c.name}: ${msg}`);
    },
    () => t.counts.fail,
  ).catch(() => {});
  await h.store.xs.rm(be);
}

t.test('block: hostile and broken params', async (t) => {
  const h = await harness(t);
  h.image('golden.img');
  const ro = h.image('readonly.img');
  chmodSync(ro, 0o444);
  const cases: Case[] = [
    { name: 'missing file', params: (h) => join(h.dir, 'img', 'nope.img'), re: /does not exist/ },
    {
      name: 'relative name that is no device',
      params: 'no-such-disk-xbh',
      re: /\/dev\/no-such-disk-xbh does not exist/,
    },
    { name: 'empty params', params: '', re: /params|empty|no disk/i },
    { name: 'a directory', params: (h) => join(h.dir, 'img'), re: /is a directory/ },
    {
      name: 'a FIFO',
      params: (h) => {
        const p = join(h.dir, 'fifo');
        execFileSync('mkfifo', [p]);
        return p;
      },
      re: /is a FIFO/,
    },
    {
      name: 'a character device',
      params: (h) => {
        const p = join(h.dir, 'chardev');
        execFileSync('mknod', [p, 'c', '1', '5']);
        return p;
      },
      re: /is a character device/,
    },
    { name: 'a socket', params: (h) => h.store.socketPath, re: /is a socket/ },
    {
      name: 'dangling symlink',
      params: (h) => {
        const p = join(h.dir, 'dangling.img');
        symlinkSync(join(h.dir, 'gone.img'), p);
        return p;
      },
      re: /does not exist/,
    },
    {
      name: 'symlink loop',
      params: (h) => {
        const a = join(h.dir, 'la');
        const b = join(h.dir, 'lb');
        symlinkSync(b, a);
        symlinkSync(a, b);
        return a;
      },
      re: /does not exist \(ELOOP\)/,
    },
    { name: 'params starting with -', params: '-rf', re: /\/dev\/-rf does not exist/ },
    {
      name: 'params starting with -- and a path',
      params: (h) => `--${join(h.dir, 'img', 'golden.img')}`,
      re: /does not exist/,
    },
    {
      name: 'shell metacharacters',
      params: (h) => `${join(h.dir, 'img', 'golden.img')}; touch ${join(h.dir, 'pwned')}`,
      re: /does not exist/,
    },
    { name: 'command substitution', params: (h) => `$(touch ${join(h.dir, 'pwned2')})`, re: /does not exist/ },
    {
      name: 'newline in params',
      params: (h) => `${join(h.dir, 'img', 'golden.img')}\n/etc/passwd`,
      re: /does not exist/,
    },
    { name: 'terminal escape sequence', params: (h) => join(h.dir, 'img', '\u001b[2Jx.img'), re: /does not exist/ },
    {
      name: 'very long path (3000 bytes)',
      params: (h) => join(h.dir, 'img', `${'x'.repeat(3000)}.img`),
      re: /does not exist|ENAMETOOLONG/,
    },
    {
      name: 'w on a read-only file',
      params: () => ro,
      re: /is read-only, and so I will not mount it read-write/,
      status: 'busy',
    },
  ];
  let domid = 40;
  for (const c of cases) await refused(t, h, c, domid++);
  t.same(
    ls(h.dir).filter((f) => f.startsWith('pwned')),
    [],
    'no shell ever ran: no pwned file',
  );
});

t.test('block: hostile XENBUS_PATH is refused before any xenstore write', async (t) => {
  const h = await harness(t);
  h.image('golden.img');
  for (const [name, path] of [
    ['absolute path elsewhere (a frontend)', '/local/domain/5/device/vbd/51712'],
    ['.. in the path', 'backend/vbd/5/../../../vm'],
    ['not a vbd backend', 'backend/vif/5/0'],
  ] as const) {
    const before = new Map(h.store.server.store.dump('/'));
    const r = await h.run('add', path);
    await checked(
      HOOK,
      `hostile XENBUS_PATH: ${name}`,
      'exit 1, one line on stderr, xenstore untouched',
      async () => {
        t.equal(r.code, 1, `${name}: exit 1`);
        t.match(r.stderr, /refusing to touch xenstore/, `${name}: says it refuses`);
        t.same(
          h.store.server.store.dump('/').filter(([p, v]) => before.get(p) !== v),
          [],
          `${name}: nothing written`,
        );
      },
      () => t.counts.fail,
    );
  }
  const missing = await h.run('add', '');
  t.not(missing.code, 0, 'XENBUS_PATH empty: refused');
});

t.test('block: non-UTF-8 bytes in params', async (t) => {
  const h = await harness(t);
  h.image('golden.img');
  await refused(
    t,
    h,
    {
      name: 'non-UTF-8 bytes (replacement characters)',
      params: `${join(h.dir, 'img')}/\ufffd\ufffd.img`,
      re: /does not exist/,
    },
    90,
  );
});
