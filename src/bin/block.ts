/** `/etc/xen/scripts/block`: phy: and file: disks, and xend's dispatch to block-<type>. */
import { blockBackend } from '../backends/block.js';
import { hookMain } from './hook.js';

hookMain(blockBackend, { typeDispatch: true });
