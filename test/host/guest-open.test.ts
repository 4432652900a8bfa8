// The real-kernel tier, one boot: test/guest files of the "open" group (test/lib/guest-fold.ts).
import { foldGuestShard } from '../lib/guest-fold.js';

await foldGuestShard('open');
