import t from 'tap';
import { checkBackendPath, parseArgs } from '../../src/hotplug/request.js';
import { UsageError } from '../../src/disk/errors.js';
import { canonicalMode, safeName } from '../../src/disk/spec.js';

const env = { XENBUS_PATH: 'backend/vbd/5/51712', XENBUS_TYPE: 'vbd' };

t.test('libxl dialect: add and remove', async (t) => {
  for (const verb of ['add', 'remove'] as const) {
    const p = parseArgs('block-cow', [verb], env);
    t.equal(p.kind, 'request');
    if (p.kind !== 'request') return;
    t.equal(p.request.action, verb);
    t.equal(p.request.dialect, 'libxl');
    t.equal(p.request.xenbusPath, 'backend/vbd/5/51712', 'the relative path is passed through unchanged');
  }
});

t.test('xend dialect: create/destroy are add/remove, a trailing node argument is accepted', async (t) => {
  const c = parseArgs('block-cow', ['create'], env);
  const d = parseArgs('block-cow', ['destroy', '/dev/loop3'], env);
  t.match(c, { kind: 'request', request: { action: 'add', dialect: 'xend' } });
  t.match(d, { kind: 'request', request: { action: 'remove', dialect: 'xend' } });
});

t.test('help and version win over everything else', async (t) => {
  t.same(parseArgs('block-cow', ['--help'], {}), { kind: 'help' });
  t.same(parseArgs('block-cow', ['add', '-h'], {}), { kind: 'help' });
  t.same(parseArgs('block-cow', ['--version'], {}), { kind: 'version' });
});

t.test('usage errors', async (t) => {
  t.throws(() => parseArgs('block-cow', [], env), UsageError);
  t.throws(() => parseArgs('block-cow', ['attach'], env), /unknown action "attach"/);
  t.throws(() => parseArgs('block-cow', ['add', '--frobnicate'], env), /unknown option --frobnicate/);
  t.throws(() => parseArgs('block-cow', ['add', 'a', 'b'], env), /too many arguments/);
  t.throws(() => parseArgs('block-cow', ['add'], {}), /XENBUS_PATH is not set/);
});

t.test('backend path shape', async (t) => {
  t.equal(checkBackendPath('backend/vbd/5/51712'), undefined);
  t.equal(checkBackendPath('/local/domain/0/backend/vbd/5/51712'), undefined, 'absolute under a domain home');
  t.equal(checkBackendPath('backend/vbd3/5/768'), undefined);
  t.match(checkBackendPath(''), /empty/);
  t.match(checkBackendPath('backend/vbd/5/../../../x'), /contains "\.\."/);
  t.match(checkBackendPath('/local/domain/5/device/vbd/51712'), /not a block backend path/);
  t.match(checkBackendPath('backend/vif/5/0'), /not a block backend path/);
  t.match(checkBackendPath('backend/vbd/5/51712/params'), /not a block backend path/);
  t.match(checkBackendPath('backend/vbd/5/51712\n'), /not a block backend path/);
});

t.test('mode canonicalisation', async (t) => {
  t.equal(canonicalMode('r', 'p'), 'r');
  t.equal(canonicalMode('ro', 'p'), 'r');
  t.equal(canonicalMode('w', 'p'), 'w');
  t.equal(canonicalMode('rw', 'p'), 'w');
  t.throws(() => canonicalMode('w!', 'p'), /not supported/);
  t.throws(() => canonicalMode('x', 'p'), /neither r nor w/);
  t.throws(() => canonicalMode('', 'p'), /neither r nor w/);
});

t.test('names are reduced to safe characters', async (t) => {
  t.equal(safeName('web server #1'), 'web_server_1');
  t.equal(safeName('../../etc'), 'etc');
  t.equal(safeName('ünïcode'), 'n_code');
  t.equal(safeName('a'.repeat(100)).length, 48);
});
