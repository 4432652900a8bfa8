/** `block-rbd add|remove`: copy-on-write disks on Ceph RBD layered clones (src/backends/rbd.ts). */
import { rbdBackend } from '../backends/rbd.js';
import { hookMain } from './hook.js';

hookMain(rbdBackend);
