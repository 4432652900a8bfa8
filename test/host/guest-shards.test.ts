// Every guest test file runs in exactly one boot of the host run: none is left out, none twice.
import t from 'tap';
import { readdirSync, readFileSync } from 'node:fs';
import { basename, dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { guestTestFiles } from '../../scripts/vm/run-guest-tests.mjs';
import { GUEST_SHARDS } from '../lib/guest-fold.js';

const all = guestTestFiles().map((f) => basename(f));
for (const f of all) {
  const owners = Object.entries(GUEST_SHARDS)
    .filter(([, prefixes]) => prefixes.some((p) => f.startsWith(p)))
    .map(([s]) => s);
  t.equal(owners.length, 1, `${f} runs in one boot (${owners.join(', ') || 'none'})`);
}

// Every shard is run by its host fold file (test/host/guest-SHARD.test.ts calling foldGuestShard('SHARD')), and no
// fold file names a shard that does not exist.
const HOST_DIR = dirname(fileURLToPath(import.meta.url));
const folds = new Map<string, string>();
for (const f of readdirSync(HOST_DIR).filter((n) => /^guest-.*\.test\.ts$/.test(n) && n !== 'guest-shards.test.ts')) {
  const m = /foldGuestShard\('([\w-]+)'\)/.exec(readFileSync(join(HOST_DIR, f), 'utf8'));
  if (m) folds.set(m[1] as string, f);
}
for (const shard of Object.keys(GUEST_SHARDS))
  t.equal(folds.get(shard), `guest-${shard}.test.ts`, `shard ${shard} has its host fold file`);
for (const shard of folds.keys())
  t.ok(shard in GUEST_SHARDS, `${folds.get(shard)} folds a shard that exists (${shard})`);
