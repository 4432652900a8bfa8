// The real-kernel tier, one boot: test/guest files of the "qcow" group (test/lib/guest-fold.ts).
import { foldGuestShard } from '../lib/guest-fold.js';

await foldGuestShard('qcow');
