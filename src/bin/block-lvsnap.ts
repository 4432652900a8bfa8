import { lvsnapBackend } from '../backends/lvsnap.js';
import { hookMain } from './hook.js';

hookMain(lvsnapBackend);
