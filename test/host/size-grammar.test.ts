/**
 * The one size grammar (src/units/size.ts) and the places that read it: the config file's size
 * keys and `grow`'s SIZE (each hook's params: cow-params, thin-units, lvsnap-units). Exact values
 * and exact messages: the same word means the same size everywhere.
 */
import t from 'tap';
import { parseCowParams } from '../../src/backends/cow-params.js';
import { parseGrowSize } from '../../src/cli/grow.js';
import { parseConfig } from '../../src/config/config.js';
import { notASize, sizeBytes, sizeKiB, sizeMiB } from '../../src/units/size.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;
const TiB = 1024 * GiB;
const GRAMMAR = 'a number with an optional unit K, M, G or T (e.g. 512M, 1.5G, 2T); a bare number is MiB';

t.test('words → bytes: units K M G T, any case, optional B or iB, decimals; a bare number is MiB', async (t) => {
  const cases: [string, number][] = [
    ['512', 512 * MiB],
    ['512M', 512 * MiB],
    ['512m', 512 * MiB],
    ['512MB', 512 * MiB],
    ['512MiB', 512 * MiB],
    ['512mib', 512 * MiB],
    ['64K', 64 * KiB],
    ['64k', 64 * KiB],
    ['1.5G', 1.5 * GiB],
    ['1.5gb', 1.5 * GiB],
    ['2T', 2 * TiB],
    ['2TiB', 2 * TiB],
    ['.5G', GiB / 2],
    ['1.', MiB],
    ['0.3K', 308],
    ['0', 0],
  ];
  for (const [w, b] of cases) t.equal(sizeBytes(w), b, w);
  for (const w of [
    '',
    'G',
    'B',
    '512B',
    '1.5.5G',
    '1,5G',
    '-1G',
    '+1G',
    '1e3',
    '0x10',
    '1 G',
    ' 1G',
    '1GG',
    '1Gi',
    '1P',
    'thirty',
  ])
    t.equal(sizeBytes(w), undefined, `"${w}" is not a size`);
  t.equal(sizeBytes('64', { bare: 'K' }), 64 * KiB, 'a place whose bare unit is KiB');
  t.equal(sizeBytes('64', { bare: null }), undefined, 'a place that takes no bare number');
});

t.test('MiB and KiB places round up, never down', async (t) => {
  t.equal(sizeMiB('1.3G'), 1332, '1331.2 MiB → 1332');
  t.equal(sizeMiB('512K'), 1, 'half a MiB → 1');
  t.equal(sizeMiB('1T'), 1048576);
  t.equal(sizeMiB('0'), 0);
  t.equal(sizeKiB('1.5K', { bare: 'K' }), 2);
  t.equal(sizeKiB('1M', { bare: null }), 1024);
});

t.test('the message names the word and the grammar', async (t) => {
  t.equal(notASize('64X'), `"64X" is not a size: ${GRAMMAR}`);
  t.equal(
    notASize('3', { bare: 'K' }),
    '"3" is not a size: a number with an optional unit K, M, G or T (e.g. 512M, 1.5G, 2T); a bare number is KiB',
  );
  t.equal(notASize('64', { bare: null }), '"64" is not a size: a number with a unit K, M, G or T (e.g. 16K, 64K)');
});

t.test('config: the size keys read the same grammar, with the same message', async (t) => {
  const c = parseConfig(
    [
      'cow.default_size = 1.5G',
      'thin.data_size = 1T',
      'thin.metadata_size = 100',
      'cow.chunk = 16KiB',
      'thin.block = 128',
    ].join('\n'),
    'x.conf',
  );
  t.equal(c.cow.defaultSizeMiB, 1536);
  t.equal(c.thin.dataMiB, 1048576);
  t.equal(c.thin.metadataMiB, 100, 'a bare number is MiB, as it was');
  t.equal(c.cow.chunkKiB, 16);
  t.equal(c.thin.blockKiB, 128, 'a bare chunk or block size is KiB, as it was');
  t.equal(parseConfig('cow.default_size = 1.3G', 'x.conf').cow.defaultSizeMiB, 1332, 'rounded up to whole MiB');
  const refused: [string, string][] = [
    ['cow.default_size = 64X', `x.conf:1: "64X" is not a size: ${GRAMMAR}`],
    ['thin.data_size = 2 G', `x.conf:1: "2 G" is not a size: ${GRAMMAR}`],
    ['thin.metadata_size = 0', 'x.conf:1: "0" must be at least 1 MiB'],
    [
      'cow.chunk = 16X',
      'x.conf:1: "16X" is not a size: a number with an optional unit K, M, G or T (e.g. 512M, 1.5G, 2T); a bare number is KiB',
    ],
    ['thin.block = 0K', 'x.conf:1: "0K" must be more than zero'],
  ];
  for (const [line, message] of refused) t.throws(() => parseConfig(line, 'x.conf'), { message }, line);
});

t.test('grow: [+]SIZE in the same grammar; the same word is the same size as in params', async (t) => {
  t.same(parseGrowSize('1T'), { relative: false, bytes: TiB });
  t.same(parseGrowSize('+1.5G'), { relative: true, bytes: 1.5 * GiB });
  t.same(parseGrowSize('+512'), { relative: true, bytes: 512 * MiB }, 'a bare number is MiB');
  t.same(parseGrowSize('+0.3K'), { relative: true, bytes: 308 }, 'rounded up to a whole byte');
  t.equal(
    parseGrowSize('1.5G').bytes,
    (parseCowParams('/i/b.img 1.5G').sizeMiB as number) * MiB,
    '1.5G in grow = 1.5G in params',
  );
  const refused: [string, string][] = [
    ['64X', `"64X" is not a size: ${GRAMMAR}; a + in front adds it to the current size (+512M)`],
    ['+-1G', `"+-1G" is not a size: ${GRAMMAR}; a + in front adds it to the current size (+512M)`],
    ['++1G', `"++1G" is not a size: ${GRAMMAR}; a + in front adds it to the current size (+512M)`],
    ['+0', '"+0" must be more than zero'],
    ['0M', '"0M" must be more than zero'],
  ];
  for (const [w, message] of refused) t.throws(() => parseGrowSize(w), { message }, w);
});
