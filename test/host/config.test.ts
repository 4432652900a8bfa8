import t from 'tap';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { ConfigError, defaultConfig, loadConfig, parseConfig } from '../../src/config/config.js';

t.test('a missing file gives the defaults', async (t) => {
  const c = loadConfig({ XEN_BLOCKHOOKS_CONF: '/nonexistent/blockhooks.conf' });
  t.same(c, defaultConfig());
});

t.test('the file is read, comments and blank lines ignored', async (t) => {
  const c = parseConfig(
    ['# stores', 'store_dir = /srv/cow/  # trailing slash dropped', '', 'image_dirs = /a /b', 'cow.chunk = 16K', 'thin.keep_pool = yes', 'watch.threshold = 70%'].join('\n'),
    'x.conf',
  );
  t.equal(c.storeDir, '/srv/cow');
  t.same(c.imageDirs, ['/a', '/b']);
  t.equal(c.cow.chunkKiB, 16);
  t.equal(c.thin.keepPool, true);
  t.equal(c.watch.thresholdPercent, 70);
});

t.test('bad lines name the file and line', async (t) => {
  t.throws(() => parseConfig('store_dir = relative/dir', 'x.conf'), /x\.conf:1: "relative\/dir" is not an absolute path/);
  t.throws(() => parseConfig('\nfrobnicate = 1', 'x.conf'), /x\.conf:2: unknown setting "frobnicate"/);
  t.throws(() => parseConfig('cow.chunk = 3K', 'x.conf'), /power of two/);
  t.throws(() => parseConfig('just words', 'x.conf'), ConfigError);
});

t.test('environment overrides the file', async (t) => {
  const dir = t.testdir({});
  const file = join(dir, 'b.conf');
  writeFileSync(file, 'store_dir = /from/file\ncow.chunk = 32K\n');
  const c = loadConfig({ XEN_BLOCKHOOKS_CONF: file, XEN_BLOCKHOOKS_STORE_DIR: '/from/env', XEN_BLOCKHOOKS_IMAGE_DIRS: '/x:/y' });
  t.equal(c.storeDir, '/from/env');
  t.equal(c.cow.chunkKiB, 32);
  t.same(c.imageDirs, ['/x', '/y']);
});

t.test('thin.data_device and thin.metadata_device: both or neither', async (t) => {
  const none = '/nonexistent/blockhooks.conf';
  const both = loadConfig({ XEN_BLOCKHOOKS_CONF: none, XEN_BLOCKHOOKS_THIN_DATA_DEVICE: '/dev/vg0/d', XEN_BLOCKHOOKS_THIN_METADATA_DEVICE: '/dev/vg0/m' });
  t.equal(both.thin.dataDevice, '/dev/vg0/d');
  t.equal(both.thin.metadataDevice, '/dev/vg0/m');
  t.throws(() => loadConfig({ XEN_BLOCKHOOKS_CONF: none, XEN_BLOCKHOOKS_THIN_DATA_DEVICE: '/dev/vg0/d' }), /go together/);
  t.throws(() => loadConfig({ XEN_BLOCKHOOKS_CONF: none, XEN_BLOCKHOOKS_THIN_METADATA_DEVICE: 'vg0/m' }), ConfigError, 'a relative path is refused');
  t.equal(loadConfig({ XEN_BLOCKHOOKS_CONF: none }).thin.dataDevice, '', 'default: files');
});
