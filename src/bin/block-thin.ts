import { thinBackend } from '../backends/thin.js';
import { hookMain } from './hook.js';

hookMain(thinBackend);
