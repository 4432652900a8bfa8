import t from 'tap';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { dmRemove, isNoSuchDevice } from '../../src/devices/dmsetup.js';
import type { RunResult, Runner } from '../../src/devices/runner.js';

const FIX = join(import.meta.dirname, '..', 'fixtures');
const noDm = readFileSync(join(FIX, 'dmsetup-1.02.185-no-kernel-dm.txt'), 'utf8');

t.test('a kernel without device-mapper holds no dm device: removing one finds nothing', async (t) => {
  t.ok(isNoSuchDevice(noDm), 'the "no device-mapper driver" answer means "not there"');
  const result: RunResult = {
    command: 'dmsetup remove x',
    exitCode: 1,
    signal: undefined,
    stdout: '',
    stderr: noDm,
    durationMs: 1,
    failed: true,
    timedOut: false,
  };
  const run: Runner = { run: async () => result, probe: async () => result };
  await t.resolves(dmRemove(run, 'xbh-cow-x', 0), 'dmRemove finds nothing to remove, no error');
});

t.test('a real failure is still a failure', async (t) => {
  t.notOk(isNoSuchDevice('device-mapper: remove ioctl on x failed: Device or resource busy\nCommand failed.'));
  t.notOk(isNoSuchDevice('device-mapper: create ioctl on x failed: Invalid argument'));
});
