import t from 'tap';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import {
  CONFIG_KEYS,
  ConfigError,
  checkConfig,
  defaultConfig,
  loadConfig,
  parseConfig,
} from '../../src/config/config.js';

t.test('a missing file gives the defaults', async (t) => {
  const c = loadConfig({ XEN_BLOCKHOOKS_CONF: '/nonexistent/blockhooks.conf' });
  t.same(c, defaultConfig());
});

t.test('the file is read, comments and blank lines ignored', async (t) => {
  const c = parseConfig(
    [
      '# stores',
      'store_dir = /srv/cow/  # trailing slash dropped',
      '',
      'image_dirs = /a /b',
      'cow.chunk = 16K',
      'thin.keep_pool = yes',
      'watch.threshold = 70%',
    ].join('\n'),
    'x.conf',
  );
  t.equal(c.storeDir, '/srv/cow');
  t.same(c.imageDirs, ['/a', '/b']);
  t.equal(c.cow.chunkKiB, 16);
  t.equal(c.thin.keepPool, true);
  t.equal(c.watch.thresholdPercent, 70);
});

t.test('bad lines name the file and line', async (t) => {
  t.throws(
    () => parseConfig('store_dir = relative/dir', 'x.conf'),
    /x\.conf:1: "relative\/dir" is not an absolute path/,
  );
  t.throws(() => parseConfig('\nfrobnicate = 1', 'x.conf'), {
    message: `x.conf:2: unknown key \`frobnicate\` (known keys: ${CONFIG_KEYS.join(', ')})`,
  });
  t.throws(() => parseConfig('cow.chunk = 3K', 'x.conf'), /power of two/);
  t.throws(() => parseConfig('just words', 'x.conf'), ConfigError);
});

t.test('environment overrides the file', async (t) => {
  const dir = t.testdir({});
  const file = join(dir, 'b.conf');
  writeFileSync(file, 'store_dir = /from/file\ncow.chunk = 32K\n');
  const c = loadConfig({
    XEN_BLOCKHOOKS_CONF: file,
    XEN_BLOCKHOOKS_STORE_DIR: '/from/env',
    XEN_BLOCKHOOKS_IMAGE_DIRS: '/x:/y',
  });
  t.equal(c.storeDir, '/from/env');
  t.equal(c.cow.chunkKiB, 32);
  t.same(c.imageDirs, ['/x', '/y']);
});

t.test('thin.data_device and thin.metadata_device: both or neither', async (t) => {
  const none = '/nonexistent/blockhooks.conf';
  const both = loadConfig({
    XEN_BLOCKHOOKS_CONF: none,
    XEN_BLOCKHOOKS_THIN_DATA_DEVICE: '/dev/vg0/d',
    XEN_BLOCKHOOKS_THIN_METADATA_DEVICE: '/dev/vg0/m',
  });
  t.equal(both.thin.dataDevice, '/dev/vg0/d');
  t.equal(both.thin.metadataDevice, '/dev/vg0/m');
  t.throws(
    () => loadConfig({ XEN_BLOCKHOOKS_CONF: none, XEN_BLOCKHOOKS_THIN_DATA_DEVICE: '/dev/vg0/d' }),
    /go together/,
  );
  t.throws(
    () => loadConfig({ XEN_BLOCKHOOKS_CONF: none, XEN_BLOCKHOOKS_THIN_METADATA_DEVICE: 'vg0/m' }),
    ConfigError,
    'a relative path is refused',
  );
  t.equal(loadConfig({ XEN_BLOCKHOOKS_CONF: none }).thin.dataDevice, '', 'default: files');
});

t.test('a misspelled key is named with the key it most likely meant, not called a malformed line', async (t) => {
  const cases: [string, string][] = [
    ['store-dir', 'store_dir'],
    ['Store_Dir', 'store_dir'],
    ['data_size', 'thin.data_size'],
    ['chunk', 'cow.chunk'],
    ['cow.data_size', 'thin.data_size'],
    ['stor_dir', 'store_dir'],
    ['image_dir', 'image_dirs'],
    ['thin.keep-pool', 'thin.keep_pool'],
    ['watch.treshold', 'watch.threshold'],
    ['lock_timout_ms', 'lock_timeout_ms'],
  ];
  for (const [wrong, right] of cases) {
    t.throws(
      () => parseConfig(`# x\n${wrong} = 1`, '/etc/xen/blockhooks.conf'),
      { message: `/etc/xen/blockhooks.conf:2: unknown key \`${wrong}\`; did you mean \`${right}\`?` },
      `${wrong} → ${right}`,
    );
  }
  t.throws(
    () => parseConfig('colour = blue', 'x.conf'),
    { message: /^x\.conf:1: unknown key `colour` \(known keys: store_dir, / },
    'nothing close: the known keys are listed',
  );
  t.throws(
    () => parseConfig('dir = /x', 'x.conf'),
    { message: /^x\.conf:1: unknown key `dir` \(known keys: / },
    'a short word far from every key gets no guess',
  );
  t.throws(
    () => parseConfig('store dir = /x', 'x.conf'),
    { message: 'x.conf:1: expected "key = value", found "store dir = /x"' },
    'a line that is not key = value is still called so',
  );
});

t.test('checkConfig collects every problem of the file and the environment', async (t) => {
  const dir = t.testdir({});
  const file = join(dir, 'b.conf');
  writeFileSync(file, 'store-dir = /x\ncow.chunk = 3K\nstate_dir = /ok\njust words\n');
  const r = checkConfig({ XEN_BLOCKHOOKS_CONF: file, XEN_BLOCKHOOKS_LOCK_TIMEOUT_MS: 'soon' });
  t.same(r.problems, [
    `${file}:1: unknown key \`store-dir\`; did you mean \`store_dir\`?`,
    `${file}:2: chunk "3K" must be a power of two from 4K to 512K`,
    `${file}:4: expected "key = value", found "just words"`,
    'XEN_BLOCKHOOKS_LOCK_TIMEOUT_MS: "soon" is not a whole number ≥ 1',
  ]);
  t.equal(r.config.stateDir, '/ok', 'good lines still count');
  t.equal(r.found, true);
  t.same(checkConfig({ XEN_BLOCKHOOKS_CONF: join(dir, 'none.conf') }), {
    config: defaultConfig(),
    file: join(dir, 'none.conf'),
    found: false,
    problems: [],
  });
});
