import { cowBackend } from '../backends/cow.js';
import { hookMain } from './hook.js';

hookMain(cowBackend);
