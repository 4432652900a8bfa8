/**
 * What our xenstore client must do against any xenstore daemon: the real xenstored in a dom0 or
 * our in-process server. Framework-neutral (node:assert only): each case is a name and an async
 * function, so tap (host tier) and node:test (guest tier) can both run them:
 *
 *   for (const c of xenstoreConformance(() => connectXenstore())) t.test(c.name, c.run);
 *
 * Every case works below its own fresh node under `base` (created and removed by the case) and
 * leaves the store as it found it.
 */
import assert from 'node:assert/strict';
import { XENSTORE_PAYLOAD_MAX, XsError } from '../../src/xenstore/types.js';
import type { WatchEvent, XenstoreClient } from '../../src/xenstore/types.js';

export interface ConformanceOptions {
  /** Absolute node under which the cases write (default `/xbh-conformance`). */
  base?: string;
  /** Where the daemon resolves relative paths for these connections (default `/local/domain/0`). */
  home?: string;
}

export interface ConformanceCase {
  name: string;
  run: () => Promise<void>;
}

export function xenstoreConformance(
  connect: () => Promise<XenstoreClient>,
  opts: ConformanceOptions = {},
): ConformanceCase[] {
  const base = opts.base ?? '/xbh-conformance';
  const home = opts.home ?? '/local/domain/0';
  let seq = 0;

  /** Run `body` with a connected client and a fresh directory; tidy up whatever happens. */
  const withDir = async (fn: (c: XenstoreClient, dir: string) => Promise<void>): Promise<void> => {
    const c = await connect();
    const dir = `${base}/c${process.pid}-${Date.now().toString(36)}-${seq++}`;
    try {
      await fn(c, dir);
    } finally {
      await c.rm(dir).catch(() => undefined);
      await c.rm(base).catch(() => undefined);
      await c.close();
    }
  };

  const rejectsWith = async (p: Promise<unknown>, errno: string, what: string): Promise<void> => {
    await assert.rejects(p, (e: unknown) => {
      assert.ok(e instanceof XsError, `${what}: expected an XsError, got ${String(e)}`);
      assert.equal(e.errno, errno, `${what}: errno`);
      return true;
    });
  };

  /** Collect watch events; `next()` waits for the next one (failing after a while rather than hanging). */
  const eventQueue = () => {
    const seen: WatchEvent[] = [];
    const waiters: Array<(ev: WatchEvent) => void> = [];
    return {
      push(ev: WatchEvent) {
        const w = waiters.shift();
        if (w) w(ev);
        else seen.push(ev);
      },
      next(ms = 2000): Promise<WatchEvent> {
        const ev = seen.shift();
        if (ev) return Promise.resolve(ev);
        return new Promise((resolve, reject) => {
          const timer = setTimeout(() => reject(new Error(`no watch event within ${ms} ms`)), ms);
          waiters.push((e) => {
            clearTimeout(timer);
            resolve(e);
          });
        });
      },
      get pending() {
        return seen.length;
      },
    };
  };

  return [
    {
      name: 'write, read, tryRead, rm',
      run: () =>
        withDir(async (c, dir) => {
          await c.write(`${dir}/k`, 'v1');
          assert.equal(await c.read(`${dir}/k`), 'v1');
          await c.write(`${dir}/k`, 'v2');
          assert.equal(await c.read(`${dir}/k`), 'v2');
          assert.equal(await c.tryRead(`${dir}/k`), 'v2');
          assert.equal(await c.tryRead(`${dir}/missing`), undefined);
          await rejectsWith(c.read(`${dir}/missing`), 'ENOENT', 'read of a missing node');
          await c.rm(`${dir}/k`);
          assert.equal(await c.tryRead(`${dir}/k`), undefined);
        }),
    },
    {
      name: 'write creates parents with empty values; directory lists children',
      run: () =>
        withDir(async (c, dir) => {
          await c.write(`${dir}/a/b/c`, 'x');
          assert.equal(await c.read(`${dir}/a`), '');
          assert.equal(await c.read(`${dir}/a/b`), '');
          await c.write(`${dir}/a/b2`, 'y');
          assert.deepEqual((await c.directory(`${dir}/a`)).sort(), ['b', 'b2']);
          assert.deepEqual(await c.directory(`${dir}/a/b/c`), []);
          await rejectsWith(c.directory(`${dir}/nope`), 'ENOENT', 'directory of a missing node');
        }),
    },
    {
      name: 'mkdir makes an empty node and is idempotent, keeping the value',
      run: () =>
        withDir(async (c, dir) => {
          await c.mkdir(`${dir}/m/n`);
          assert.equal(await c.read(`${dir}/m/n`), '');
          await c.write(`${dir}/m/n`, 'kept');
          await c.mkdir(`${dir}/m/n`);
          assert.equal(await c.read(`${dir}/m/n`), 'kept');
        }),
    },
    {
      name: 'rm is recursive; missing node with parent is fine; missing parent is ENOENT',
      run: () =>
        withDir(async (c, dir) => {
          await c.write(`${dir}/t/x/y`, '1');
          await c.write(`${dir}/t/z`, '2');
          await c.rm(`${dir}/t`);
          assert.equal(await c.tryRead(`${dir}/t`), undefined);
          assert.equal(await c.tryRead(`${dir}/t/x/y`), undefined);
          await c.mkdir(dir);
          await c.rm(`${dir}/never-was`);
          await rejectsWith(c.rm(`${dir}/no-parent/child`), 'ENOENT', 'rm below a missing parent');
        }),
    },
    {
      name: 'relative paths resolve under the home path; getDomainPath',
      run: async () => {
        const c = await connect();
        const rel = `xbh-conformance-rel-${process.pid}-${seq++}`;
        try {
          assert.equal(await c.getDomainPath(0), '/local/domain/0');
          assert.equal(await c.getDomainPath(7), '/local/domain/7');
          await c.write(`${rel}/k`, 'relative');
          assert.equal(await c.read(`${home}/${rel}/k`), 'relative');
          await c.write(`${home}/${rel}/j`, 'absolute');
          assert.equal(await c.read(`${rel}/j`), 'absolute');
          assert.deepEqual((await c.directory(rel)).sort(), ['j', 'k']);
          await c.rm(rel);
          assert.equal(await c.tryRead(`${home}/${rel}`), undefined);
        } finally {
          await c.rm(rel).catch(() => undefined);
          await c.close();
        }
      },
    },
    {
      name: 'values pass byte-exact: spaces, colons, UTF-8, newlines, empty',
      run: () =>
        withDir(async (c, dir) => {
          const values = [
            '/images/ün ïcode.img 30',
            'phy:/dev/vg0/disk one,xvda,w',
            'a\nb\tc\\d',
            '',
            '名前 🚀',
            '  leading and trailing  ',
          ];
          for (const [i, v] of values.entries()) {
            await c.write(`${dir}/v${i}`, v);
            assert.equal(await c.read(`${dir}/v${i}`), v, `value ${JSON.stringify(v)}`);
          }
        }),
    },
    {
      name: `payloads up to the connection's limit (${XENSTORE_PAYLOAD_MAX} bytes on the socket, 16 less on the xenbus device) pass; one byte more is E2BIG before sending`,
      run: () =>
        withDir(async (c, dir) => {
          const path = `${dir}/big`;
          const max = c.maxPayload;
          assert.ok(max === XENSTORE_PAYLOAD_MAX || max === XENSTORE_PAYLOAD_MAX - 16, `limit ${max}`);
          const fits = 'x'.repeat(max - Buffer.byteLength(path) - 1);
          await c.write(path, fits);
          assert.equal(await c.read(path), fits);
          await rejectsWith(c.write(path, `${fits}y`), 'E2BIG', 'write one byte over the limit');
          // the connection is still fine and nothing was written
          assert.equal(await c.read(path), fits);
          // UTF-8 counts in bytes, not characters
          const wide = 'ü'.repeat(Math.ceil((max - Buffer.byteLength(path)) / 2));
          await rejectsWith(c.write(path, wide), 'E2BIG', 'write of multi-byte characters over the limit');
        }),
    },
    {
      name: 'invalid paths are EINVAL',
      run: () =>
        withDir(async (c, dir) => {
          await rejectsWith(c.write(`${dir}//x`, '1'), 'EINVAL', 'double slash');
          await rejectsWith(c.write(`${dir}/x/`, '1'), 'EINVAL', 'trailing slash');
          await rejectsWith(c.write(`${dir}/sp ace`, '1'), 'EINVAL', 'space in a path');
          await rejectsWith(c.read(`${dir}/ü`), 'EINVAL', 'non-ASCII in a path');
        }),
    },
    {
      name: 'watch fires once on registration, then on changes at or below the path',
      run: () =>
        withDir(async (c, dir) => {
          await c.mkdir(dir);
          const q = eventQueue();
          await c.watch(`${dir}/w`, 'tok1', (ev) => q.push(ev));
          assert.deepEqual(await q.next(), { path: `${dir}/w`, token: 'tok1' });
          await c.write(`${dir}/w/deep/er`, '1');
          assert.deepEqual(await q.next(), { path: `${dir}/w/deep/er`, token: 'tok1' });
          await c.write(`${dir}/w`, '2');
          assert.deepEqual(await q.next(), { path: `${dir}/w`, token: 'tok1' });
          await c.write(`${dir}/other`, '3'); // not below the watch
          await c.rm(`${dir}/w/deep`);
          assert.deepEqual(await q.next(), { path: `${dir}/w/deep`, token: 'tok1' });
          await c.unwatch(`${dir}/w`, 'tok1');
          await c.write(`${dir}/w/after`, '4');
          await c.read(`${dir}/w/after`); // a round trip: any stray event would have arrived by now
          assert.equal(q.pending, 0, 'no events after unwatch');
        }),
    },
    {
      name: 'a relative watch reports relative paths',
      run: async () => {
        const c = await connect();
        const rel = `xbh-conformance-rw-${process.pid}-${seq++}`;
        try {
          await c.mkdir(rel);
          const q = eventQueue();
          await c.watch(rel, 'reltok', (ev) => q.push(ev));
          assert.deepEqual(await q.next(), { path: rel, token: 'reltok' });
          await c.write(`${home}/${rel}/k`, 'v');
          assert.deepEqual(await q.next(), { path: `${rel}/k`, token: 'reltok' });
          await c.unwatch(rel, 'reltok');
        } finally {
          await c.rm(rel).catch(() => undefined);
          await c.close();
        }
      },
    },
    {
      name: 'transaction: changes appear together at commit; watches fire only then',
      run: () =>
        withDir(async (c, dir) => {
          const other = await connect();
          try {
            await c.mkdir(dir);
            const q = eventQueue();
            await other.watch(dir, 'txw', (ev) => q.push(ev));
            assert.equal((await q.next()).path, dir);
            const result = await c.transaction(async (tx) => {
              assert.ok(tx.id > 0, 'transaction id');
              await tx.write(`${dir}/a`, '1');
              await tx.write(`${dir}/b`, '2');
              assert.equal(await tx.read(`${dir}/a`), '1', 'the transaction sees its own write');
              assert.equal(await other.tryRead(`${dir}/a`), undefined, 'others do not, before commit');
              await other.read(dir); // round trip for `other`: no event may have come yet
              assert.equal(q.pending, 0, 'no watch event before commit');
              return 'done';
            });
            assert.equal(result, 'done');
            assert.equal(await other.read(`${dir}/a`), '1');
            assert.equal(await other.read(`${dir}/b`), '2');
            const paths = [(await q.next()).path, (await q.next()).path].sort();
            assert.deepEqual(paths, [`${dir}/a`, `${dir}/b`]);
          } finally {
            await other.close();
          }
        }),
    },
    {
      name: 'transaction: a throwing body aborts, writes nothing and passes the error on',
      run: () =>
        withDir(async (c, dir) => {
          await c.mkdir(dir);
          await assert.rejects(
            c.transaction(async (tx) => {
              await tx.write(`${dir}/aborted`, 'no');
              throw new Error('body failed');
            }),
            /body failed/,
          );
          assert.equal(await c.tryRead(`${dir}/aborted`), undefined);
        }),
    },
    {
      name: 'transaction conflict: EAGAIN at commit reruns the body, final value right',
      run: () =>
        withDir(async (a, dir) => {
          const b = await connect();
          try {
            const key = `${dir}/counter`;
            await a.write(key, '0');
            let runsA = 0;
            let runsB = 0;
            const increment = async (tx: {
              read(p: string): Promise<string>;
              write(p: string, v: string): Promise<void>;
            }) => {
              const v = Number(await tx.read(key));
              await tx.write(key, String(v + 1));
            };
            await a.transaction(async (tx) => {
              runsA++;
              const v = Number(await tx.read(key));
              if (runsA === 1) {
                // a concurrent transaction on another connection commits the same node first
                await b.transaction(async (txb) => {
                  runsB++;
                  await increment(txb);
                });
              }
              await tx.write(key, String(v + 1));
            });
            assert.equal(runsB, 1, 'the other transaction committed at once');
            assert.equal(runsA, 2, 'the conflicting transaction was retried once');
            assert.equal(await a.read(key), '2');
          } finally {
            await b.close();
          }
        }),
    },
    {
      name: 'close() with a request in flight rejects it with ECLOSED; later requests too',
      run: async () => {
        const c = await connect();
        const inflight = c.read('/');
        await c.close();
        await rejectsWith(inflight, 'ECLOSED', 'request in flight at close');
        await rejectsWith(c.read('/'), 'ECLOSED', 'request after close');
      },
    },
  ];
}
