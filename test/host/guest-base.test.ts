// The real-kernel tier, one boot: test/guest files of the "base" group (test/lib/guest-fold.ts).
import { foldGuestShard } from '../lib/guest-fold.js';

await foldGuestShard('base');
