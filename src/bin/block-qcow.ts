/** `block-qcow add|remove`: qcow2 and other qemu images through qemu-nbd (src/backends/qcow.ts). */
import { qcowBackend } from '../backends/qcow.js';
import { hookMain } from './hook.js';

hookMain(qcowBackend);
