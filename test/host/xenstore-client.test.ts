import t from 'tap';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { execFileSync, spawn } from 'node:child_process';
import { connectXenstore, xenstoreCandidates } from '../../src/xenstore/client.js';
import { startXenstoreServer } from '../../src/xenstore/server.js';
import { XsError } from '../../src/xenstore/types.js';
import { FrameDecoder, XsOp, encodeFrame, nulStrings, opName } from '../../src/xenstore/wire.js';
import { xenstoreConformance } from '../lib/xenstore-conformance.js';

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'xbh-xs-'));
t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
let n = 0;
const sockPath = (): string => path.join(dir, `s${n++}`);

const XS_ERR = /^Xs(Store)?Error$/;
const isXsError =
  (errno: string) =>
  (e: unknown): boolean =>
    e instanceof XsError && e.errno === errno;

t.test('conformance: our client against our server', async (t) => {
  const server = await startXenstoreServer({ socketPath: sockPath() });
  t.teardown(() => server.close());
  for (const c of xenstoreConformance(() => connectXenstore({ env: { XENSTORED_PATH: server.socketPath } }))) {
    t.test(c.name, async (t) => {
      await c.run();
      t.pass(c.name);
    });
  }
});

t.test('connect: candidates follow libxenstore', async (t) => {
  t.same(xenstoreCandidates({}), ['/var/run/xenstored/socket', '/dev/xen/xenbus', '/proc/xen/xenbus']);
  t.same(xenstoreCandidates({ XENSTORED_RUNDIR: '/run/x' }), ['/run/x/socket', '/dev/xen/xenbus', '/proc/xen/xenbus']);
  t.same(xenstoreCandidates({ XENSTORED_PATH: '/s', XENSTORED_RUNDIR: '/run/x' }), ['/s']);
});

t.test('connect: missing socket is ECONNECT naming the paths tried', async (t) => {
  const missing = path.join(dir, 'no-such-socket');
  const err = await connectXenstore({ env: { XENSTORED_PATH: missing } }).catch((e: unknown) => e);
  t.ok(err instanceof XsError);
  t.match(err, { name: XS_ERR, errno: 'ECONNECT' });
  t.match((err as Error).message, missing);
  t.match((err as Error).message, /ENOENT/);
  t.match((err as Error).message, /xenstored is probably not running/);

  // a socket file nobody listens on (daemon died) and a plain file are refused too
  const stale = sockPath();
  await leaveStaleSocket(stale);
  t.ok(fs.statSync(stale).isSocket(), 'a socket file without a listener');
  const err2 = await connectXenstore({ path: stale }).catch((e: unknown) => e);
  t.match(err2, { name: XS_ERR, errno: 'ECONNECT', message: /ECONNREFUSED|ENOENT/ });
  const plain = path.join(dir, 'plain');
  fs.writeFileSync(plain, '');
  const err3 = await connectXenstore({ path: plain }).catch((e: unknown) => e);
  t.match(err3, { name: XS_ERR, errno: 'ECONNECT', message: /not a socket or device/ });
});

/** A fake daemon: answers with `onFrame` (or not at all). */
async function fakeDaemon(
  onFrame: (sock: net.Socket, f: { type: number; reqId: number; txId: number; payload: Buffer }) => void,
) {
  const socketPath = sockPath();
  const conns = new Set<net.Socket>();
  const srv = net.createServer((sock) => {
    conns.add(sock);
    const d = new FrameDecoder();
    sock.on('data', (c: Buffer) => {
      for (const f of d.push(c)) onFrame(sock, f);
    });
    sock.on('error', () => {});
  });
  await new Promise<void>((r) => srv.listen(socketPath, r));
  return {
    socketPath,
    close: () =>
      new Promise<void>((r) => {
        for (const s of conns) s.destroy();
        srv.close(() => r());
      }),
  };
}

t.test('daemon closing the connection mid-request: ECLOSED for every pending request', async (t) => {
  let seen = 0;
  const fake = await fakeDaemon((sock) => {
    if (++seen === 3) sock.destroy();
  });
  t.teardown(fake.close);
  const c = await connectXenstore({ path: fake.socketPath });
  const results = await Promise.allSettled([c.read('/a'), c.write('/b', 'x'), c.directory('/c')]);
  t.same(
    results.map((r) => r.status),
    ['rejected', 'rejected', 'rejected'],
  );
  for (const r of results) t.ok(r.status === 'rejected' && isXsError('ECLOSED')(r.reason), 'ECLOSED');
  t.match((results[0] as PromiseRejectedResult).reason.message, /READ \/a failed: ECLOSED/);
  await t.rejects(c.read('/d'), { name: XS_ERR, errno: 'ECLOSED' }, 'later requests fail at once');
  await c.close();
});

t.test('a daemon that never answers: ETIMEDOUT, not a hang', async (t) => {
  const fake = await fakeDaemon(() => {});
  t.teardown(fake.close);
  const c = await connectXenstore({ path: fake.socketPath, timeoutMs: 150 });
  await t.rejects(c.read('/a'), { name: XS_ERR, errno: 'ETIMEDOUT' });
  await c.close();
});

t.test('replies are matched by req_id, in any order; errors carry the daemon errno', async (t) => {
  const held: Array<[net.Socket, { type: number; reqId: number; txId: number; payload: Buffer }]> = [];
  const fake = await fakeDaemon((sock, f) => {
    held.push([sock, f]);
    if (held.length < 3) return;
    // answer in reverse order, one of them with an error, and a watch event in between
    for (const [s, g] of held.reverse()) {
      const arg = g.payload.toString().split('\0')[0];
      if (arg === '/err')
        s.write(encodeFrame({ type: XsOp.ERROR, reqId: g.reqId, txId: 0, payload: nulStrings('EACCES') }));
      else s.write(encodeFrame({ type: g.type, reqId: g.reqId, txId: 0, payload: Buffer.from(`value of ${arg}`) }));
      s.write(encodeFrame({ type: XsOp.WATCH_EVENT, reqId: 0, txId: 0, payload: nulStrings('/w', 'unknown-token') }));
    }
  });
  t.teardown(fake.close);
  const c = await connectXenstore({ path: fake.socketPath });
  const [a, e, b] = await Promise.allSettled([c.read('/a'), c.read('/err'), c.read('/b')]);
  t.same(a, { status: 'fulfilled', value: 'value of /a' });
  t.same(b, { status: 'fulfilled', value: 'value of /b' });
  t.ok(e?.status === 'rejected' && isXsError('EACCES')(e.reason), 'EACCES passed on');
  await c.close();
});

t.test('kernel-device transport: frames through read/write on a non-socket fd (FIFO loopback)', async (t) => {
  // A FIFO opened O_RDWR hands our own requests back to us: each one looks like a reply with
  // the same type and req_id, so a READ answers with its own payload.
  const fifo = path.join(dir, 'fifo');
  execFileSync('mkfifo', ['--', fifo]);
  const c = await connectXenstore({ env: { XENSTORED_PATH: fifo } });
  const got = await Promise.all([c.read('/loop/a'), c.read('/loop/b'), c.directory('/loop/c')]);
  t.same(got, ['/loop/a\0', '/loop/b\0', ['/loop/c']]);
  await c.close();
  await t.rejects(c.read('/x'), { name: XS_ERR, errno: 'ECLOSED' });
});

t.test('server specifics', async (t) => {
  const requests: string[] = [];
  const server = await startXenstoreServer({
    socketPath: sockPath(),
    domid: 3,
    onRequest: (op) => requests.push(opName(op)),
  });
  t.teardown(() => server.close());
  const c = await connectXenstore({ path: server.socketPath });
  t.teardown(() => c.close());

  t.test('relative paths resolve under the configured domid', async (t) => {
    await c.write('rel/x', '1');
    t.equal(server.store.read('/local/domain/3/rel/x').toString(), '1');
    t.same(server.store.dump('/local/domain/3/rel'), [
      ['/local/domain/3/rel', ''],
      ['/local/domain/3/rel/x', '1'],
    ]);
  });

  t.test('path validation mirrors the daemon', async (t) => {
    const store = server.store;
    t.equal(store.canonical('a-b_c@d/E9'), '/local/domain/3/a-b_c@d/E9');
    t.equal(store.canonical('/'), '/');
    for (const bad of ['', '/a//b', '/a/', 'a b', '/a:b', `/${'x'.repeat(3072)}`, 'x'.repeat(2049)]) {
      t.throws(() => store.canonical(bad), { name: XS_ERR, errno: 'EINVAL' }, JSON.stringify(bad.slice(0, 20)));
    }
    t.equal(
      store.canonical(`/local/domain/3/${'x'.repeat(2048)}`).length,
      16 + 2048,
      'relative limit below /local/domain/N/',
    );
    t.throws(() => store.canonical(`/local/domain/3/${'x'.repeat(2049)}`), { name: XS_ERR, errno: 'EINVAL' });
    await t.rejects(c.rm('/'), { name: XS_ERR, errno: 'EINVAL' });
  });

  t.test('unknown operations are ENOSYS; a bad TRANSACTION_END is EINVAL; unknown tx is ENOENT', async (t) => {
    const raw = await rawConn(server.socketPath);
    t.match(await raw.ask(XsOp.INTRODUCE, 0, nulStrings('1', '2', '3')), { type: XsOp.ERROR, text: 'ENOSYS\0' });
    t.match(await raw.ask(99, 0, nulStrings('x')), { type: XsOp.ERROR, text: 'ENOSYS\0' });
    const start = await raw.ask(XsOp.TRANSACTION_START, 0, nulStrings(''));
    const id = Number(start.text.replace('\0', ''));
    t.ok(id > 0);
    t.match(await raw.ask(XsOp.TRANSACTION_END, id, nulStrings('X')), { type: XsOp.ERROR, text: 'EINVAL\0' });
    t.match(await raw.ask(XsOp.READ, 12345, nulStrings('/')), { type: XsOp.ERROR, text: 'ENOENT\0' });
    t.match(await raw.ask(XsOp.GET_PERMS, 0, nulStrings('/local')), { type: XsOp.GET_PERMS, text: 'n0\0' });
    t.match(await raw.ask(XsOp.SET_PERMS, 0, nulStrings('/local', 'n0', 'r5')), { type: XsOp.SET_PERMS, text: 'OK\0' });
    t.match(await raw.ask(XsOp.GET_PERMS, 0, nulStrings('/local')), { text: 'n0\0r5\0' });
    raw.close();
  });

  t.test('a client sending more than 4096 payload bytes is cut off', async (t) => {
    const raw = await rawConn(server.socketPath);
    const hdr = Buffer.alloc(16);
    hdr.writeUInt32LE(XsOp.WRITE, 0);
    hdr.writeUInt32LE(1, 4);
    hdr.writeUInt32LE(4097, 12);
    raw.sock.write(Buffer.concat([hdr, Buffer.alloc(4097, 0x41)]));
    await raw.closed;
    t.pass('connection closed by the server');
    t.equal(await c.read('rel/x'), '1', 'other clients are unaffected');
  });

  t.test('rm fires watches set below the removed node, with the watch path', async (t) => {
    await c.write('/tree/a/b', '1');
    const events: string[] = [];
    await c.watch('/tree/a/b', 'below', (ev) => events.push(ev.path));
    await c.rm('/tree');
    await c.read('/');
    t.same(events, ['/tree/a/b', '/tree/a/b']);
    await c.unwatch('/tree/a/b', 'below');
  });

  t.test('a big directory comes in parts (DIRECTORY E2BIG → DIRECTORY_PART)', async (t) => {
    const names = Array.from({ length: 150 }, (_, i) => `child-with-a-rather-long-name-${String(i).padStart(4, '0')}`);
    await c.transaction(async (tx) => {
      for (const nm of names) await tx.write(`/big/${nm}`, '');
    });
    requests.length = 0;
    t.same(await c.directory('/big'), names);
    t.ok(requests.filter((r) => r === 'DIRECTORY_PART').length >= 2, 'several DIRECTORY_PART requests');
  });

  t.test('a transaction that only reads still conflicts when what it read changed', async (t) => {
    await c.write('/ro', 'a');
    let runs = 0;
    const value = await c.transaction(async (tx) => {
      runs++;
      const v = await tx.read('/ro');
      if (runs === 1) server.store.write('/ro', 'b');
      return v;
    });
    t.equal(runs, 2);
    t.equal(value, 'b');
  });

  t.test('transaction retries are bounded', async (t) => {
    const c2 = await connectXenstore({ path: server.socketPath, transactionAttempts: 3 });
    let runs = 0;
    await t.rejects(
      c2.transaction(async (tx) => {
        runs++;
        await tx.read('/ro');
        server.store.write('/ro', String(runs));
        await tx.write('/ro2', 'x');
      }),
      { name: XS_ERR, errno: 'EAGAIN' },
    );
    t.equal(runs, 3);
    t.equal(server.store.exists('/ro2'), false);
    await c2.close();
  });

  t.test('store changes made directly fire watches of clients', async (t) => {
    const events: string[] = [];
    await c.watch('rel', 'direct', (ev) => events.push(ev.path));
    server.store.write('/local/domain/3/rel/y', 'z');
    await c.read('/');
    t.same(events, ['rel', 'rel/y']);
  });
});

t.test('server close removes its socket and drops clients', async (t) => {
  const server = await startXenstoreServer({ socketPath: sockPath() });
  const c = await connectXenstore({ path: server.socketPath });
  await c.write('/x', '1');
  await server.close();
  t.notOk(fs.existsSync(server.socketPath), 'socket file removed');
  await t.rejects(c.read('/x'), { name: XS_ERR, errno: 'ECLOSED' });
});

t.test('a process that connects and closes exits by itself', async (t) => {
  const server = await startXenstoreServer({ socketPath: sockPath() });
  t.teardown(() => server.close());
  await connectXenstore({ path: server.socketPath }).then((c) => c.write('/exit', 'before'));
  const script = [
    `import { connectXenstore } from ${JSON.stringify(new URL('../../src/xenstore/client.ts', import.meta.url).href)};`,
    `const c = await connectXenstore({ path: ${JSON.stringify(server.socketPath)} });`,
    `await c.watch('/exit', 'tok', () => {});`,
    `await c.write('/exit', 'child');`,
    `await c.close();`,
  ].join('\n');
  // run the child through the same TypeScript loader tap uses
  const loader = process.execArgv.find((a) => a.includes('@tapjs/typescript'));
  const code = await new Promise<number | null>((resolve) => {
    const child = spawn(process.execPath, [...(loader ? [loader] : []), '--input-type=module', '-e', script], {
      stdio: 'inherit',
    });
    const timer = setTimeout(() => child.kill('SIGKILL'), 15000);
    child.on('exit', (code) => {
      clearTimeout(timer);
      resolve(code);
    });
  });
  t.equal(code, 0, 'child exited on its own');
  t.equal(server.store.read('/exit').toString(), 'child');
});

async function rawConn(socketPath: string) {
  const sock = net.connect(socketPath);
  await new Promise<void>((r) => sock.once('connect', () => r()));
  const d = new FrameDecoder();
  const waiting = new Map<number, (f: { type: number; text: string }) => void>();
  sock.on('data', (ch: Buffer) => {
    for (const f of d.push(ch)) waiting.get(f.reqId)?.({ type: f.type, text: f.payload.toString() });
  });
  sock.on('error', () => {});
  const closed = new Promise<void>((r) => sock.once('close', () => r()));
  let id = 100;
  return {
    sock,
    closed,
    ask(type: number, txId: number, payload: Buffer) {
      const reqId = id++;
      return new Promise<{ type: number; text: string }>((resolve) => {
        waiting.set(reqId, resolve);
        sock.write(encodeFrame({ type, reqId, txId, payload }));
      });
    },
    close: () => sock.destroy(),
  };
}
/** A unix socket file whose listener died without removing it (as after a daemon crash). */
async function leaveStaleSocket(p: string): Promise<void> {
  const script = `require('net').createServer().listen(${JSON.stringify(p)}, () => process.stdout.write('up'))`;
  const child = spawn(process.execPath, ['-e', script], { stdio: ['ignore', 'pipe', 'inherit'] });
  await new Promise<void>((r) => child.stdout.once('data', () => r()));
  const exited = new Promise<void>((r) => child.once('exit', () => r()));
  child.kill('SIGKILL');
  await exited;
}
