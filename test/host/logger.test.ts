/**
 * The logger's close() (host tier): it resolves whatever became of the log file, so a hook's
 * exit code is never lost to an event loop that emptied while it waited.
 */
import t from 'tap';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createLogger } from '../../src/log/logger.js';
import { ROOT } from '../lib/block-harness.js';

const within = <T>(p: Promise<T>, ms: number) =>
  Promise.race([p.then(() => 'closed'), new Promise((r) => setTimeout(() => r('still waiting'), ms))]);

// A directory as the log file: the open fails (EISDIR) after createLogger returned, as EACCES
// does for a user who is not root (root itself passes permission checks).
const unwritable = () => mkdtempSync(join(tmpdir(), 'xbh-log-'));

t.test('close() after the log file failed to open resolves', async (t) => {
  const log = createLogger({ tag: 'test', file: unwritable(), stderr: false });
  log.info('a line nobody can write');
  await new Promise((r) => setTimeout(r, 200)); // the open's error has come and gone
  t.equal(await within(log.close(), 7000), 'closed');
});

t.test('close() while the failing open is still under way resolves too', async (t) => {
  const log = createLogger({ tag: 'test', file: unwritable(), stderr: false });
  log.error('at once');
  t.equal(await within(log.close(), 7000), 'closed');
});

t.test('close() of a good file resolves after its lines are written', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'xbh-log-'));
  const log = createLogger({ tag: 'test', file: join(dir, 'h.log'), stderr: false });
  log.info('written', { n: 1 });
  t.equal(await within(log.close(), 5000), 'closed');
  t.match(readFileSync(join(dir, 'h.log'), 'utf8'), /test\[\d+\] info written n=1\n$/);
});

t.test('a hook whose log cannot be written still exits with its own code', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'xbh-log-'));
  const r = spawnSync(process.execPath, [join(ROOT, 'dist', 'block.mjs'), 'add'], {
    encoding: 'utf8',
    env: {
      PATH: process.env.PATH,
      XENBUS_PATH: 'backend/vbd/5/51712',
      XENSTORED_PATH: join(dir, 'no-xenstored.sock'),
      XEN_BLOCKHOOKS_CONF: join(dir, 'no-such.conf'),
      XEN_BLOCKHOOKS_STATE_DIR: join(dir, 'state'),
      XEN_BLOCKHOOKS_LOG_FILE: unwritable(),
    },
  });
  t.equal(r.status, 1, `the failed add exits 1 (stderr: ${r.stderr})`);
  t.match(r.stderr, /cannot reach xenstore/);
});
