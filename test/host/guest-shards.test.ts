// Every guest test file runs in exactly one boot of the host run: none is left out, none twice.
import t from 'tap';
import { basename } from 'node:path';
import { guestTestFiles } from '../../scripts/vm/run-guest-tests.mjs';
import { GUEST_SHARDS } from '../lib/guest-fold.js';

const all = guestTestFiles().map((f) => basename(f));
for (const f of all) {
  const owners = Object.entries(GUEST_SHARDS).filter(([, prefixes]) => prefixes.some((p) => f.startsWith(p))).map(([s]) => s);
  t.equal(owners.length, 1, `${f} runs in one boot (${owners.join(', ') || 'none'})`);
}
