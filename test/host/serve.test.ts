/**
 * The resident service and the installed wrapper (host tier, real loop devices, the drop-in
 * `block` on file: disks): events handed over and run by `xen-blockhooks serve` (the journal
 * record carries the service's pid), the same outcome with the service down, the service killed
 * at each device command of an add and of a remove (the wrapper runs the event itself, nothing
 * is left), a hung service (killed by the wrapper), a stop with an event in flight, hostile
 * messages on the channel, and a user who is not root.
 */
import t from 'tap';
import { spawn, spawnSync } from 'node:child_process';
import { chmodSync, existsSync, mkdirSync, readdirSync, readFileSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Journal } from '../../src/journal/journal.js';
import { formatRequest } from '../../src/serve/protocol.js';
import { MAX_RUNNING_EVENTS, parentOf } from '../../src/serve/service.js';
import { destroyNodes } from '../lib/backend-nodes.js';
import { harness, ROOT, runProcess, type BlockHarness } from '../lib/block-harness.js';
import { startServe as serveOn, writeWrapper, type Served } from '../lib/serve-harness.js';

t.setTimeout(600_000);

/** `xen-blockhooks serve` with the harness's environment (its configuration, state and log). */
function startServe(h: BlockHarness, dir: string, env: Record<string, string> = {}): Promise<Served> {
  return serveOn(dir, { ...h.env('backend/vbd/0/0'), ...env });
}

function recordPid(h: BlockHarness, be: string): number | undefined {
  return new Journal(h.stateDir).load(be)?.pid;
}

async function setup(t: { teardown(fn: () => unknown): void }) {
  const h = await harness(t);
  const dir = join(h.dir, 'serve');
  const wrapper = writeWrapper(h.dir, 'block');
  return { h, dir, wrapper, env: { XEN_BLOCKHOOKS_SERVE_DIR: dir } };
}

t.test('an event handed over is run by the service; with the service down, by the wrapper itself', async (t) => {
  const { h, dir, wrapper, env } = await setup(t);
  const s = await startServe(h, dir);
  t.teardown(() => s.stop());
  t.equal((readFileSync(join(dir, 'pid'), 'utf8') + '').trim(), String(s.pid), 'the pid file names the service');
  t.equal(spawnSync('stat', ['-c', '%a', dir]).stdout.toString().trim(), '700', 'the channel is 0700');

  const img = h.image('served.img');
  const be = await h.disk({ domid: 5, devid: 51712, params: img, mode: 'w' });
  const add = await h.run('add', be, env, wrapper);
  t.equal(add.code, 0, `add exits 0 (stderr: ${add.stderr})`);
  t.equal(add.stderr, '', 'nothing on stderr');
  t.equal(await h.read(`${be}/hotplug-status`), 'connected');
  const node = await h.read(`${be}/node`);
  t.match(node, /^\/dev\/loop\d+$/);
  t.equal(recordPid(h, be), s.pid, "the journal record is the service's: the event ran there");
  t.same(
    h.loopsOnImages().map((l) => l.name),
    [node],
    'one loop, the one reported',
  );
  const rm = await h.run('remove', be, env, wrapper);
  t.equal(rm.code, 0, `remove exits 0 (stderr: ${rm.stderr})`);
  t.same(h.loopsOnImages(), [], 'the loop is gone');
  t.same(readdirSync(join(h.stateDir, 'journal')), [], 'the record is gone');

  const missing = await h.disk({ domid: 8, devid: 51712, params: `${h.dir}/img/no-such.img`, mode: 'w' });
  const bad = await h.run('add', missing, env, wrapper);
  t.equal(bad.code, 1, 'a failed add exits 1 through the service');
  t.match(
    bad.stderr,
    /^block: add backend\/vbd\/8\/51712: /m,
    "the hook's error line is relayed to the wrapper's stderr",
  );
  t.match(await h.read(`${missing}/hotplug-error`), /no-such\.img/, 'and hotplug-error says why');
  const usage = await h.run('frobnicate', be, env, wrapper);
  t.equal(usage.code, 2, 'bad usage exits 2 through the service too');
  t.match(usage.stderr, /block: .*run "block --help" for usage/, "the hook's usage sentence is relayed to stderr");

  t.equal(await s.stop(), 0, 'SIGTERM stops the service, exit 0');
  t.notOk(existsSync(join(dir, 'pid')), 'its pid file goes with it');
  const be2 = await h.disk({ domid: 6, devid: 51712, params: h.image('alone.img'), mode: 'w' });
  const add2 = await h.run('add', be2, env, wrapper);
  t.equal(add2.code, 0, `with the service down, add exits 0 (stderr: ${add2.stderr})`);
  const pid2 = recordPid(h, be2);
  t.ok(pid2 !== undefined && pid2 !== s.pid, 'and the record is the hook process of its own');
  t.equal((await h.run('remove', be2, env, wrapper)).code, 0, 'remove too');
  t.same(h.loopsOnImages(), [], 'nothing left');
  t.same(
    readdirSync(dir).filter((n) => /\.(claim|req|taken|revoked)$/.test(n)),
    [],
    'every slot of the channel is free',
  );
});

t.test('XEN_BLOCKHOOKS_SERVE=0 runs the event in the wrapper even with the service up', async (t) => {
  const { h, dir, wrapper, env } = await setup(t);
  const s = await startServe(h, dir);
  t.teardown(() => s.stop());
  const be = await h.disk({ domid: 7, devid: 51712, params: h.image('local.img'), mode: 'w' });
  t.equal((await h.run('add', be, { ...env, XEN_BLOCKHOOKS_SERVE: '0' }, wrapper)).code, 0);
  t.not(recordPid(h, be), s.pid, 'not the service');
  t.equal((await h.run('remove', be, env, wrapper)).code, 0);
  t.same(h.loopsOnImages(), []);
});

for (const action of ['add', 'remove'] as const) {
  t.test(
    `the service killed at each device command of ${action}: the wrapper finishes the event, nothing is left`,
    async (t) => {
      const { h, dir, wrapper, env } = await setup(t);
      await (await startServe(h, dir)).stop(); // the channel's FIFOs exist: every command counted is the event's
      for (let n = 1; n <= 12; n++) {
        const img = h.image(`kill-${action}-${n}.img`);
        const be = await h.disk({ domid: 20 + n, devid: 51712, params: img, mode: 'w' });
        if (action === 'remove') {
          const first = await h.run('add', be, env, wrapper);
          t.equal(first.code, 0, `add before the remove (${first.stderr})`);
        }
        // Counted from the service's start: the event's n-th command kills it.
        const s = await startServe(h, dir, { XEN_BLOCKHOOKS_FAULT_KILL_AFTER: String(n) });
        const r = await h.run(action, be, env, wrapper);
        const died = s.child.exitCode === null && s.child.signalCode === null ? false : true;
        await s.stop();
        t.equal(r.code, 0, `kill after ${n}: ${action} exits 0 (stderr: ${r.stderr})`);
        if (action === 'add') {
          t.equal(await h.read(`${be}/hotplug-status`), 'connected', `kill after ${n}: connected`);
          t.equal(h.loopsOnImages().length, 1, `kill after ${n}: exactly one loop`);
          t.equal((await h.run('remove', be, env, wrapper)).code, 0);
        }
        t.same(h.loopsOnImages(), [], `kill after ${n}: no loop left`);
        t.same(readdirSync(join(h.stateDir, 'journal')), [], `kill after ${n}: no record left`);
        await destroyNodes(h.store.xs, { domid: 20 + n, devid: 51712 }); // as libxl does after a remove
        if (!died) {
          t.equal(r.stderr, '', `the ${action} needed fewer than ${n} commands: the service ran it whole`);
          break;
        }
        t.match(r.stderr, /xen-blockhooks serve \(pid \d+\) ended during the event; running it here/);
      }
    },
  );
}

t.test('a hung service is killed by the wrapper, which runs the event', async (t) => {
  const { h, dir, wrapper, env } = await setup(t);
  const s = await startServe(h, dir);
  process.kill(s.pid, 'SIGSTOP');
  const be = await h.disk({ domid: 40, devid: 51712, params: h.image('hung.img'), mode: 'w' });
  const add = await h.run('add', be, env, wrapper);
  t.equal(add.code, 0, `add exits 0 (stderr: ${add.stderr})`);
  t.equal(await h.read(`${be}/hotplug-status`), 'connected');
  t.not(recordPid(h, be), s.pid, 'run by the wrapper');
  // Not taken: the request was revoked, so the service, running again, never runs it.
  process.kill(s.pid, 'SIGCONT');
  await new Promise((r) => setTimeout(r, 1000));
  t.not(recordPid(h, be), s.pid, 'the resumed service did not run the revoked add');
  t.equal(h.loopsOnImages().length, 1, 'one loop: the add ran once');
  t.equal((await h.run('remove', be, env, wrapper)).code, 0);
  await s.stop();
  t.same(h.loopsOnImages(), [], 'nothing left');

  // Hung in the middle of an event: the service stops itself at its first command.
  const s2 = await startServe(h, dir, { XEN_BLOCKHOOKS_FAULT_STOP_AFTER: '1' });
  const be2 = await h.disk({ domid: 41, devid: 51712, params: h.image('hung2.img'), mode: 'w' });
  const add2 = await h.run('add', be2, env, wrapper);
  t.equal(add2.code, 0, `add exits 0 (stderr: ${add2.stderr})`);
  t.match(add2.stderr, /stopped answering; killing it and running the event here/);
  t.equal(await s2.exited, null, 'the service was killed');
  t.equal(s2.child.signalCode, 'SIGKILL');
  t.equal(await h.read(`${be2}/hotplug-status`), 'connected');
  t.equal(h.loopsOnImages().length, 1, 'one loop');
  t.equal((await h.run('remove', be2, env, wrapper)).code, 0);
  t.same(h.loopsOnImages(), [], 'nothing left');
});

t.test(
  "an add whose wrapper is killed (libxl's timeout) is abandoned: undone, nothing written to xenstore",
  async (t) => {
    const { h, dir, wrapper, env } = await setup(t);
    const s = await startServe(h, dir);
    t.teardown(() => s.stop());
    const be = await h.disk({ domid: 90, devid: 51712, params: h.image('abandoned.img'), mode: 'w' });
    // Another script holds Xen's block lock: the add waits for it, as a slow add would.
    mkdirSync(h.xenLockDir, { recursive: true });
    const holder = spawn(
      'flock',
      ['-x', join(h.xenLockDir, 'block'), process.execPath, '-e', "process.stdout.write('1'); process.stdin.resume()"],
      { stdio: ['pipe', 'pipe', 'ignore'] },
    );
    t.teardown(() => holder.kill());
    await new Promise((r) => holder.stdout.once('data', r));
    const w = spawn(wrapper, ['add'], { env: h.env(be, env), stdio: 'ignore' });
    const wExit = new Promise((r) => w.once('exit', r));
    // The service takes an event within milliseconds (a wrapper it has not answered in 2 s runs the
    // event itself, and that one, killed, would log nothing of the kind checked below).
    await new Promise((r) => setTimeout(r, 1000));
    w.kill('SIGKILL');
    await wExit;
    holder.stdin.end(); // the lock is free: the add goes on, and finds its caller gone
    const log = join(h.dir, 'hotplug.log');
    let abandoned = false;
    for (let i = 0; i < 200 && !abandoned; i++) {
      await new Promise((r) => setTimeout(r, 50));
      abandoned =
        existsSync(log) &&
        /add backend\/vbd\/90\/51712: stopped before step .*the event's caller is gone/.test(readFileSync(log, 'utf8'));
    }
    t.ok(abandoned, 'the hotplug log says the add was abandoned', {
      log: existsSync(log) ? readFileSync(log, 'utf8') : '',
    });
    for (const k of ['hotplug-status', 'hotplug-error', 'physical-device', 'node'])
      t.equal(await h.read(`${be}/${k}`), undefined, `no ${k} written`);
    t.same(h.loopsOnImages(), [], 'no loop');
    t.notOk(new Journal(h.stateDir).load(be), 'no record');
    // libxl's remove that follows: nothing to do.
    const rm = await h.run('remove', be, env, wrapper);
    t.equal(rm.code, 0, `remove exits 0 (${rm.stderr})`);
    await destroyNodes(h.store.xs, { domid: 90, devid: 51712 });
  },
);

t.test('more events at once than run at once: the others wait their turn and all are served', async (t) => {
  const { h, dir, wrapper, env } = await setup(t);
  const s = await startServe(h, dir);
  t.teardown(() => s.stop());
  const n = MAX_RUNNING_EVENTS + 4;
  const bes: string[] = [];
  for (let i = 0; i < n; i++)
    bes.push(await h.disk({ domid: 60 + i, devid: 51712, params: h.image(`burst-${i}.img`), mode: 'w' }));
  const adds = await Promise.all(bes.map((be) => h.run('add', be, env, wrapper)));
  for (const [i, r] of adds.entries()) t.equal(r.code, 0, `add ${i} exits 0 (stderr: ${r.stderr})`);
  for (const be of bes) t.equal(recordPid(h, be), s.pid, `${be}: the service ran it`);
  t.equal(new Set(await Promise.all(bes.map((be) => h.read(`${be}/node`)))).size, n, 'each its own loop');
  const removes = await Promise.all(bes.map((be) => h.run('remove', be, env, wrapper)));
  for (const [i, r] of removes.entries()) t.equal(r.code, 0, `remove ${i} exits 0 (stderr: ${r.stderr})`);
  t.same(h.loopsOnImages(), [], 'nothing left');
});

t.test('a stop with events in flight finishes them', async (t) => {
  const { h, dir, wrapper, env } = await setup(t);
  const s = await startServe(h, dir);
  const bes: string[] = [];
  for (let i = 0; i < 4; i++)
    bes.push(await h.disk({ domid: 50 + i, devid: 51712, params: h.image(`inflight-${i}.img`), mode: 'w' }));
  const runs = bes.map((be) => h.run('add', be, env, wrapper));
  // SIGTERM once the service has taken an event (its record names the service).
  for (let i = 0; i < 400 && !bes.some((be) => recordPid(h, be) === s.pid); i++)
    await new Promise((r) => setTimeout(r, 10));
  s.child.kill('SIGTERM');
  const results = await Promise.all(runs);
  t.equal(await s.exited, 0, 'the service exits 0');
  for (const [i, r] of results.entries()) t.equal(r.code, 0, `add ${i} exits 0 (stderr: ${r.stderr})`);
  for (const be of bes) t.equal(await h.read(`${be}/hotplug-status`), 'connected');
  t.ok(
    bes.some((be) => recordPid(h, be) === s.pid),
    'an event the service had taken when it was told to stop was finished there',
  );
  t.equal(h.loopsOnImages().length, 4, 'four loops');
  for (const be of bes) t.equal((await h.run('remove', be, env, wrapper)).code, 0);
  t.same(h.loopsOnImages(), []);
});

t.test('hostile messages on the channel are refused and change nothing; the service goes on', async (t) => {
  const { h, dir, wrapper, env } = await setup(t);
  const s = await startServe(h, dir);
  t.teardown(() => s.stop());
  const img = h.image('victim.img');
  const be = await h.disk({ domid: 60, devid: 51712, params: img, mode: 'w' });
  const send = (line: string) => writeFileSync(join(dir, 'in'), line, { flag: 'a' });
  const self = process.pid;
  const good = { slot: 7, pid: self, hook: 'block', argv: ['add'], env: { XENBUS_PATH: be } };
  const cases: [string, () => void][] = [
    ['a line that is no slot', () => send('../../etc/passwd\n')],
    ['a slot out of range', () => send('999\n')],
    ['an idle slot', () => send('3\n')],
    [
      'garbage in a request',
      () => {
        writeFileSync(join(dir, '7.claim'), `${self}\n`);
        writeFileSync(join(dir, '7.req'), 'hello\n');
        send('7\n');
      },
    ],
    [
      'a request for an unknown hook',
      () => {
        writeFileSync(join(dir, '7.claim'), `${self}\n`);
        writeFileSync(join(dir, '7.req'), formatRequest({ ...good, hook: '../../bin/sh' }));
        send('7\n');
      },
    ],
    [
      'an environment name that is not forwarded',
      () => {
        writeFileSync(join(dir, '7.claim'), `${self}\n`);
        writeFileSync(join(dir, '7.req'), formatRequest({ ...good, env: { ...good.env, LD_PRELOAD: '/tmp/x.so' } }));
        send('7\n');
      },
    ],
    [
      "a request whose pid is not the slot claim's",
      () => {
        writeFileSync(join(dir, '7.claim'), `${self}\n`);
        writeFileSync(join(dir, '7.req'), formatRequest({ ...good, pid: 2 }));
        send('7\n');
      },
    ],
    [
      'a request that is a symbolic link',
      () => {
        writeFileSync(join(dir, '7.claim'), `${self}\n`);
        writeFileSync(join(h.dir, 'elsewhere.req'), formatRequest(good));
        symlinkSync(join(h.dir, 'elsewhere.req'), join(dir, '7.req'));
        send('7\n');
      },
    ],
    ['a flood of noise', () => send('x'.repeat(100_000) + '\n')],
  ];
  for (const [what, act] of cases) {
    act();
    await new Promise((r) => setTimeout(r, 300));
    t.equal(s.child.exitCode, null, `${what}: the service still runs`);
    t.equal(await h.read(`${be}/hotplug-status`), undefined, `${what}: nothing was written to xenstore`);
    t.same(h.loopsOnImages(), [], `${what}: no device`);
    t.notOk(
      existsSync(join(h.stateDir, 'journal')) && readdirSync(join(h.stateDir, 'journal')).length,
      `${what}: no record`,
    );
  }
  const log = existsSync(join(h.dir, 'hotplug.log')) ? readFileSync(join(h.dir, 'hotplug.log'), 'utf8') : '';
  t.match(log, /serve: refused the request on slot 7: request does not end in NUL/, 'garbage is refused in the log');
  t.match(log, /unknown hook/, 'so is an unknown hook');
  t.match(log, /environment name "LD_PRELOAD" is not forwarded/, 'and a foreign environment name');
  t.match(log, /claim is not pid 2's/, 'and a pid that is not the claim');
  t.match(log, /request is not a plain file/, 'and a symbolic link');
  const add = await h.run('add', be, env, wrapper);
  t.equal(add.code, 0, `a real event afterwards works (stderr: ${add.stderr})`);
  t.equal(recordPid(h, be), s.pid, 'through the service');
  t.equal((await h.run('remove', be, env, wrapper)).code, 0);
  t.same(h.loopsOnImages(), []);
});

t.test('a user who is not root cannot hand over an event', async (t) => {
  const { h, dir, wrapper, env } = await setup(t);
  const s = await startServe(h, dir);
  t.teardown(() => s.stop());
  const be = await h.disk({ domid: 70, devid: 51712, params: h.image('nobody.img'), mode: 'w' });
  chmodSync(h.dir, 0o755);
  chmodSync(wrapper, 0o755);
  const r = await runProcess(
    'setpriv',
    ['--reuid=65534', '--regid=65534', '--clear-groups', wrapper, 'add'],
    h.env(be, env),
  );
  t.not(r.code, 0, `the add fails (exit ${r.code}, stderr: ${r.stderr})`);
  t.notMatch(r.stderr, /serve/, 'without reaching the service');
  t.not(recordPid(h, be), s.pid, 'the service ran nothing');
  t.equal(await h.read(`${be}/physical-device`), undefined, 'no device was reported');
  t.same(h.loopsOnImages(), [], 'no loop');
  const chan = readdirSync(dir).filter((n) => /\.(claim|req)$/.test(n));
  t.same(chan, [], 'nothing was written into the channel');
});

t.test("one service per channel; a verbose event's lines reach the wrapper", async (t) => {
  const { h, dir, wrapper, env } = await setup(t);
  const s = await startServe(h, dir);
  t.teardown(() => s.stop());
  const second = await runProcess(
    process.execPath,
    [join(ROOT, 'dist', 'xen-blockhooks.mjs'), 'serve', '--no-watch', '--dir', dir],
    h.env('backend/vbd/0/0'),
  );
  t.equal(second.code, 1, 'a second service on the channel exits 1');
  t.match(second.stderr, /xen-blockhooks serve is already running/);
  t.equal(readFileSync(join(dir, 'pid'), 'utf8').trim(), String(s.pid), "the first one's pid file stands");
  const be = await h.disk({ domid: 80, devid: 51712, params: h.image('verbose.img'), mode: 'w' });
  const add = await h.run('add', be, { ...env, XEN_BLOCKHOOKS_VERBOSE: '1' }, wrapper);
  t.equal(add.code, 0, `a verbose add through the service exits 0 (stderr: ${add.stderr.slice(-300)})`);
  t.equal(recordPid(h, be), s.pid, 'the service ran it');
  t.match(add.stderr, /^block: add backend\/vbd\/80\/51712: connected /m, 'its info lines are relayed');
  t.equal((await h.run('remove', be, env, wrapper)).code, 0);
  t.same(h.loopsOnImages(), []);
});

t.test("parentOf: a process's parent from /proc/PID/stat, whatever its command name holds", async (t) => {
  t.equal(parentOf(process.pid), process.ppid, 'this process');
  const proc = join(t.testdir(), 'proc');
  mkdirSync(join(proc, '42'), { recursive: true });
  writeFileSync(join(proc, '42', 'stat'), '42 (a) b (c) 7) S 1234 42 42 0 -1 4194560 0 0\n');
  t.equal(parentOf(42, proc), 1234, 'a name with spaces and parentheses');
  t.equal(parentOf(43, proc), undefined, 'no such process');
});
