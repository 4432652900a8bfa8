/**
 * The claim of a persistent store by one host (src/lock/store-owner.ts), on this machine's
 * filesystem, with host identities given (a second host is played). Tier: host, real files.
 */
import t from 'tap';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, utimesSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  claimStore,
  dropClaim,
  ownerDir,
  releaseStore,
  staleClaims,
  type HostIdentity,
} from '../../src/lock/store-owner.js';

const A: HostIdentity = { machine: 'aaaa', host: 'dom0-a', boot: 'boot-1' };
const B: HostIdentity = { machine: 'bbbb', host: 'dom0-b', boot: 'boot-9' };

function dir(t: { teardown(f: () => void): void }): string {
  const d = mkdtempSync(join(tmpdir(), 'xbh-owner-'));
  t.teardown(() => rmSync(d, { recursive: true, force: true }));
  return d;
}

t.test('one host at a time: the other host is refused with who holds it; release lets it in', async (t) => {
  const store = join(dir(t), 'web-xvda.cow');
  t.same(claimStore('block-cow', store, 'backend/vbd/3/51712', A), { ours: true });
  const o = JSON.parse(readFileSync(join(ownerDir(store), 'owner.json'), 'utf8'));
  t.match(o, { machine: 'aaaa', host: 'dom0-a', boot: 'boot-1', backendPath: 'backend/vbd/3/51712' });
  t.throws(
    () => claimStore('block-cow', store, 'backend/vbd/7/51712', B),
    /held by host dom0-a \(since .*, disk backend\/vbd\/3\/51712\); a store serves one host at a time.*remove the directory .*web-xvda\.cow\.owner/,
  );
  releaseStore(store, 'backend/vbd/7/51712', B);
  t.ok(existsSync(ownerDir(store)), 'another host cannot release it');
  releaseStore(store, 'backend/vbd/3/51712', A);
  t.notOk(existsSync(ownerDir(store)), 'released by its holder');
  t.same(claimStore('block-cow', store, 'backend/vbd/7/51712', B), { ours: true }, 'now the other host gets it');
});

t.test('the same host: a restart takes its own claim over; another disk of this boot does not own it', async (t) => {
  const store = join(dir(t), 's.cow');
  claimStore('block-cow', store, 'backend/vbd/3/51712', A);
  t.same(
    claimStore('block-cow', store, 'backend/vbd/4/51712', A),
    { ours: false },
    "same boot, another disk: the loop check decides, and the claim stays the first disk's",
  );
  releaseStore(store, 'backend/vbd/4/51712', A);
  t.ok(existsSync(ownerDir(store)), 'not released by the other disk');
  t.same(
    claimStore('block-cow', store, 'backend/vbd/3/51712', A),
    { ours: true },
    'the same disk again (an add after a killed one)',
  );
  const restarted = { ...A, boot: 'boot-2' };
  t.same(
    claimStore('block-cow', store, 'backend/vbd/9/51712', restarted),
    { ours: true },
    'after a restart of the same host',
  );
  releaseStore(store, 'backend/vbd/9/51712', restarted);
  t.notOk(existsSync(ownerDir(store)));
});

t.test('a claim cut between mkdir and owner.json: busy for a minute, then taken over', async (t) => {
  const store = join(dir(t), 's.cow');
  mkdirSync(ownerDir(store));
  t.throws(() => claimStore('block-cow', store, 'backend/vbd/3/51712', B), /is being claimed right now/);
  const old = Date.now() / 1000 - 120;
  utimesSync(ownerDir(store), old, old);
  t.same(claimStore('block-cow', store, 'backend/vbd/3/51712', B), { ours: true });
  writeFileSync(join(ownerDir(store), '.owner.123.tmp'), 'x');
  t.doesNotThrow(
    () => releaseStore(store, 'backend/vbd/3/51712', B),
    'a leftover temporary file does not make the release fail',
  );
});

t.test(
  "gc's view: this host's claims from an earlier boot or for an unknown disk are stale; other hosts' never",
  async (t) => {
    const d = dir(t);
    const [old, unknown, live, foreign] = ['old.cow', 'unknown.cow', 'live.cow', 'foreign.cow'].map((n) =>
      join(d, n),
    ) as [string, string, string, string];
    claimStore('block-cow', old, 'backend/vbd/1/51712', { ...A, boot: 'boot-0' });
    claimStore('block-cow', unknown, 'backend/vbd/2/51712', A);
    claimStore('block-cow', live, 'backend/vbd/3/51712', A);
    claimStore('block-cow', foreign, 'backend/vbd/4/51712', B);
    const stale = staleClaims([old, unknown, live, foreign], (bp) => bp === 'backend/vbd/3/51712', A);
    t.same(
      stale.map((s) => s.store),
      [old, unknown],
    );
    for (const s of stale) dropClaim(s.store, s.owner);
    t.notOk(existsSync(ownerDir(old)));
    t.notOk(existsSync(ownerDir(unknown)));
    t.ok(existsSync(ownerDir(live)), "a recorded disk's claim stays");
    t.ok(existsSync(ownerDir(foreign)), "another host's claim stays");
  },
);

t.test('a cloned dom0 (same machine-id, another host name) is another host', async (t) => {
  const store = join(dir(t), 's.cow');
  claimStore('block-cow', store, 'backend/vbd/3/51712', A);
  t.throws(
    () => claimStore('block-cow', store, 'backend/vbd/3/51712', { ...A, host: 'dom0-clone', boot: 'boot-5' }),
    /held by host dom0-a/,
  );
});
